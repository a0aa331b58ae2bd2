"""LLM clients against real loopback HTTP servers (scripted per call) and the real tiny engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from automem_jax.agent.types import ChatRequest, Completion
from automem_jax.llm.client import EngineClient, OpenAIClient, RouterClient, make_client


def req(content: str, role: str = "policy", **kw) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": content}], "plan", role, **kw)


def ok_body(text: str, model: str = "served-model", prompt_tokens: int = 11, completion_tokens: int = 3) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class FakeAPI:
    """A loopback /v1/chat/completions whose answer to call k is `script(k, body, headers)`:
    (status, JSON object or raw bytes[, extra headers[, delay_s]]). Records every call."""

    def __init__(self, script, idle_timeout: float | None = None):
        self.script = script
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.release = threading.Event()  # set at close: ends every pending delay at once
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_timeout

            def log_message(self, *a):
                pass

            def do_POST(self):
                t0 = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    k = len(fake.calls)
                    # The parsed headers, looked up case-insensitively (httpx2 sends lowercase names).
                    rec = {"body": body, "headers": self.headers, "start": t0, "port": self.client_address[1]}
                    fake.calls.append(rec)
                    fake.in_flight += 1
                    fake.peak = max(fake.peak, fake.in_flight)
                try:
                    status, obj, *rest = fake.script(k, body, self.headers)
                    extra = rest[0] if rest else {}
                    if len(rest) > 1 and rest[1]:
                        fake.release.wait(rest[1])
                    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for h, v in extra.items():
                        self.send_header(h, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                        rec["end"] = time.monotonic()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_api():
    servers = []

    def make(script, **kw):
        s = FakeAPI(script, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def echo(prefix=""):
    def script(k, body, headers):
        return 200, ok_body(prefix + body["messages"][-1]["content"])
    return script


def client(server, **kw) -> OpenAIClient:
    kw.setdefault("api_key_env", None)
    kw.setdefault("timeout", 10)
    kw.setdefault("backoff", 0.01)
    return OpenAIClient(server.base_url, "served-model", **kw)


# ---- OpenAIClient ----------------------------------------------------------------------------

def test_request_body_usage_and_model(fake_api):
    srv = fake_api(lambda k, b, h: (200, ok_body("fine", model="m-7", prompt_tokens=42, completion_tokens=5)))
    with client(srv, temperature=0.3, top_p=0.9, max_tokens=64, extra_body={"top_k": 20}) as c:
        [out] = c.generate([req("hello", stop=["\n\n", "END"], max_tokens=500)])
    assert out == Completion(text="fine", tokens_in=42, tokens_out=5, error=None, model_id="m-7")
    body = srv.calls[0]["body"]
    assert body == {"model": "served-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64,
                    "temperature": 0.3, "top_p": 0.9, "stop": ["\n\n", "END"], "top_k": 20}
    assert "Authorization" not in srv.calls[0]["headers"]


def test_retries_5xx_with_exponential_backoff(fake_api):
    def script(k, body, headers):
        return (503, {"error": {"message": "warming up"}}) if k < 2 else (200, ok_body("third time"))
    srv = fake_api(script)
    with client(srv, backoff=0.1, max_retries=3) as c:
        [out] = c.generate([req("x")])
    assert out.error is None and out.text == "third time"
    assert len(srv.calls) == 3
    gaps = [srv.calls[i + 1]["start"] - srv.calls[i]["start"] for i in range(2)]
    # Equal jitter: wait k is in [b_k/2, b_k] with b_k = 0.1 * 2**k.
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps


def test_429_honours_retry_after(fake_api):
    def script(k, body, headers):
        return (429, {"error": {"message": "slow down"}}, {"Retry-After": "0.4"}) if k == 0 else (200, ok_body("ok"))
    srv = fake_api(script)
    with client(srv, backoff=0.01, backoff_max=5) as c:
        [out] = c.generate([req("x")])
    assert out.text == "ok" and len(srv.calls) == 2
    assert srv.calls[1]["start"] - srv.calls[0]["start"] >= 0.4


def test_gives_up_after_max_retries(fake_api):
    srv = fake_api(lambda k, b, h: (500, {"error": {"message": "boom"}}))
    with client(srv, max_retries=2) as c:
        [out] = c.generate([req("x")])
    assert out.text == "" and len(srv.calls) == 3
    assert "HTTP 500" in out.error and "boom" in out.error and "3 attempts" in out.error


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_no_retry_on_other_4xx(fake_api, status):
    srv = fake_api(lambda k, b, h: (status, {"error": {"message": f"nope {status}", "type": "invalid_request_error"}}))
    with client(srv, max_retries=4) as c:
        [out] = c.generate([req("x")])
    assert len(srv.calls) == 1
    assert out.text == "" and f"HTTP {status}" in out.error and f"nope {status}" in out.error


def test_timeout_is_an_error_not_a_hang(fake_api):
    srv = fake_api(lambda k, b, h: (200, ok_body("late"), {}, 5.0))
    t0 = time.monotonic()
    with client(srv, timeout=0.3, max_retries=1) as c:
        [out] = c.generate([req("x")])
        elapsed = time.monotonic() - t0
        srv.release.set()
    assert out.text == "" and "timed out after 0.3s" in out.error and "2 attempts" in out.error
    assert len(srv.calls) == 2
    assert elapsed < 3.0


def test_connection_refused_and_malformed_reply(fake_api):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OpenAIClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, backoff=0.01, max_retries=1) as c:
        [out] = c.generate([req("x")])
    assert out.text == "" and "connection error" in out.error and "2 attempts" in out.error

    srv = fake_api(lambda k, b, h: (200, b"<html>not json</html>"))
    with client(srv, max_retries=3) as c:
        [out] = c.generate([req("x")])
    assert "malformed chat completion" in out.error and len(srv.calls) == 1


def test_key_from_env_never_in_repr_or_errors(fake_api, monkeypatch):
    secret = "sk-test-SECRET-4242"
    monkeypatch.setenv("AUTOMEM_TEST_KEY", secret)
    # The server echoes the Authorization header in its error, as a careless proxy might.
    srv = fake_api(lambda k, b, h: (401, {"error": {"message": f"bad key: {h['Authorization']}"}}))
    c = OpenAIClient(srv.base_url, "m", api_key_env="AUTOMEM_TEST_KEY", backoff=0.01)
    [out] = c.generate([req("x")])
    assert srv.calls[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in out.error and "<redacted>" in out.error and "HTTP 401" in out.error
    assert secret not in repr(c) and secret not in str(vars(c)) and "AUTOMEM_TEST_KEY" in repr(c)
    c.close()

    monkeypatch.delenv("AUTOMEM_TEST_KEY")
    with pytest.raises(ValueError, match="AUTOMEM_TEST_KEY") as ei:
        OpenAIClient(srv.base_url, "m", api_key_env="AUTOMEM_TEST_KEY")
    assert secret not in str(ei.value)


def test_bad_configuration_raises_at_construction():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIClient("localhost:8000/v1", "m", api_key_env=None)
    with pytest.raises(ValueError, match="model"):
        OpenAIClient("http://127.0.0.1:1/v1", "", api_key_env=None)
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIClient("http://127.0.0.1:1/v1", "m", api_key_env=None, max_concurrency=0)
    with pytest.raises(ValueError, match="temperature"):
        OpenAIClient("http://127.0.0.1:1/v1", "m", api_key_env=None, temperature=3)


def test_concurrency_is_bounded_and_order_kept(fake_api):
    # Later requests answer sooner, so completion order is the reverse of request order.
    srv = fake_api(lambda k, b, h: (200, ok_body("A:" + b["messages"][0]["content"]), {},
                                    0.05 * (12 - int(b["messages"][0]["content"]))))
    with client(srv, max_concurrency=4) as c:
        outs = c.generate([req(str(i)) for i in range(12)])
    assert [o.text for o in outs] == [f"A:{i}" for i in range(12)]
    assert srv.peak == 4


def test_keep_alive_and_stale_connection(fake_api):
    srv = fake_api(echo(), idle_timeout=0.3)
    with client(srv, max_concurrency=1, max_retries=0) as c:
        for i in range(4):
            assert c.generate([req(f"q{i}")])[0].text == f"q{i}"
        assert len({call["port"] for call in srv.calls}) == 1  # one reused connection
        time.sleep(0.6)  # the server drops the idle connection; the client must reconnect by itself
        [out] = c.generate([req("after idle")])
    assert out.error is None and out.text == "after idle"
    assert len(srv.calls) == 5


# ---- RouterClient ----------------------------------------------------------------------------

def test_router_splits_by_role_keeps_order_and_runs_both_at_once(fake_api):
    mem = fake_api(lambda k, b, h: (200, ok_body("mem:" + b["messages"][0]["content"]), {}, 0.3))
    game = fake_api(lambda k, b, h: (200, ok_body("game:" + b["messages"][0]["content"]), {}, 0.3))
    roles = ["memory", "gameplay", "policy", "memory", "bogus", "gameplay", "memory"]
    with client(mem) as cm, client(game) as cg:
        router = RouterClient(memory=cm, gameplay=cg)
        outs = router.generate([req(str(i), role) for i, role in enumerate(roles)])
    want = {"memory": "mem:", "gameplay": "game:", "policy": "game:"}
    for i, (role, out) in enumerate(zip(roles, outs)):
        if role == "bogus":
            assert out.text == "" and "unknown model_role 'bogus'" in out.error
        else:
            assert out.error is None and out.text == f"{want[role]}{i}"
    assert len(mem.calls) == 3 and len(game.calls) == 3
    # The two sub-batches overlapped in time.
    assert max(c["start"] for c in mem.calls) < min(c["end"] for c in game.calls)
    assert max(c["start"] for c in game.calls) < min(c["end"] for c in mem.calls)


class Recording:
    """Wraps a real client and records each batch it is given."""

    def __init__(self, inner=None, fail: bool = False):
        self.inner, self.fail, self.batches = inner, fail, []

    def generate(self, requests):
        self.batches.append([r.prompt for r in requests])
        if self.fail:
            raise RuntimeError("back end exploded")
        return self.inner.generate(requests)


def test_router_same_backend_one_batch_and_failure_isolated(fake_api):
    srv = fake_api(echo("e:"))
    with client(srv) as c:
        both = Recording(c)
        outs = RouterClient(memory=both, gameplay=both).generate([req("a", "memory"), req("b", "gameplay")])
        assert [o.text for o in outs] == ["e:a", "e:b"] and both.batches == [["a", "b"]]
        broken = Recording(fail=True)
        outs = RouterClient(memory=broken, gameplay=c).generate(
            [req("a", "memory"), req("b", "gameplay"), req("c", "memory")])
    assert [o.text for o in outs] == ["", "e:b", ""]
    assert "memory client raised RuntimeError: back end exploded" in outs[0].error and outs[1].error is None


# ---- EngineClient (real tiny engine) ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from automem_jax.models.qwen import init_model
    from automem_jax.models.qwen_presets import preset
    return init_model(preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    from automem_jax.llm.engine import Engine
    from automem_jax.models.tokenizer import load_tokenizer
    return Engine(tiny_model, load_tokenizer(), max_batch=4, max_len=64, seed=0, model_name="tiny")


def test_engine_client_order_tokens_and_errors(engine):
    from automem_jax.llm.sampling import SamplingParams
    c = EngineClient(engine, temperature=0, max_tokens=3)
    reqs = [req("first"), req("second one", max_tokens=2), req("word " * 100), req("third")]
    outs = c.generate(reqs)
    assert len(outs) == 4
    assert "prompt has" in outs[2].error and outs[2].text == ""
    for i in (0, 1, 3):
        assert outs[i].error is None and outs[i].model_id == "tiny" and outs[i].tokens_in > 3
    assert 1 <= outs[0].tokens_out <= 3 and 1 <= outs[1].tokens_out <= 2
    # Same answer as the engine itself, greedy.
    [ref] = engine.generate([reqs[3]], SamplingParams(temperature=0, max_tokens=3))
    assert outs[3].text == ref.text and outs[3].tokens_out == ref.tokens_out
    # A router over two clients of one engine: the shared lock keeps engine calls one at a time.
    router = RouterClient(memory=EngineClient(engine, temperature=0, max_tokens=3), gameplay=c)
    routed = router.generate([req("third", "memory"), req("first", "gameplay")])
    assert [o.text for o in routed] == [outs[3].text, outs[0].text]


def test_engine_spec_loads_a_hugging_face_folder(engine, tiny_model, tmp_path):
    """make_client builds an engine from an exported HF folder (weights + tokenizer) that answers
    like the engine it was exported from."""
    from automem_jax.models import hf
    hf.save_pretrained(tiny_model, engine.cfg, str(tmp_path), tokenizer=engine.tokenizer)
    c = make_client({"kind": "engine", "checkpoint": str(tmp_path), "max_batch": 2, "max_len": 64,
                     "model_name": "exported", "temperature": 0, "max_tokens": 3})
    reqs = [req("first"), req("a different question")]
    got = c.generate(reqs)
    want = EngineClient(engine, temperature=0, max_tokens=3).generate(reqs)
    assert [(o.text, o.tokens_in, o.tokens_out) for o in got] == [(o.text, o.tokens_in, o.tokens_out) for o in want]
    assert all(o.error is None and o.model_id == "exported" for o in got)


# ---- make_client -----------------------------------------------------------------------------

def test_make_client_builds_each_kind(fake_api, engine, monkeypatch):
    monkeypatch.setenv("AUTOMEM_TEST_KEY2", "k")
    srv = fake_api(echo("x:"))
    spec = {"kind": "router",
            "memory": {"kind": "openai", "base_url": srv.base_url, "model": "spec", "api_key_env": "AUTOMEM_TEST_KEY2",
                       "max_retries": 1, "timeout": 5},
            "gameplay": {"kind": "engine", "temperature": 0, "max_tokens": 2}}
    c = make_client(spec, engine=engine)
    assert isinstance(c, RouterClient) and isinstance(c.gameplay, EngineClient)
    assert isinstance(c.memory, OpenAIClient) and c.memory.model == "spec" and c.memory.max_retries == 1
    outs = c.generate([req("hi", "memory"), req("hi", "gameplay")])
    assert outs[0].text == "x:hi" and outs[1].error is None and outs[1].tokens_out <= 2
    assert srv.calls[0]["headers"]["Authorization"] == "Bearer k"
    c.memory.close()


@pytest.mark.parametrize("spec,message", [
    ({"base_url": "http://127.0.0.1:1/v1"}, "client.kind must be one of engine, openai, router"),
    ({"kind": "vllm"}, "client.kind must be one of"),
    ({"kind": "openai", "model": "m"}, "client.base_url is required"),
    ({"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "temprature": 0.1},
     "unknown field(s) temprature"),
    ({"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": None, "timeout": -1},
     "client.timeout must be > 0"),
    ({"kind": "router", "memory": {"kind": "openai", "model": "m"}, "gameplay": {"kind": "engine"}},
     "client.memory.base_url is required"),
    ({"kind": "router", "memory": {"kind": "engine", "checkpoint": "preset:tiny"}, "gameplay": "fast"},
     "client.gameplay: expected a mapping"),
    ({"kind": "engine"}, "client.checkpoint is required"),
    ({"kind": "engine", "checkpoint": "/no/such/model"}, "'/no/such/model' is not a folder"),
    ({"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "AUTOMEM_TEST_UNSET_3"},
     "environment variable AUTOMEM_TEST_UNSET_3"),
])
def test_make_client_errors_name_the_field(spec, message, monkeypatch):
    monkeypatch.delenv("AUTOMEM_TEST_UNSET_3", raising=False)
    with pytest.raises(ValueError) as ei:
        make_client(spec)
    assert message in str(ei.value)


# ---- submit / drive --------------------------------------------------------------------------

def _wait_all(client, futs, limit=200):
    for _ in range(limit):
        if all(f.done() for f in futs):
            return
        client.drive([f for f in futs if not f.done()])
    raise AssertionError("futures never finished")


def test_engine_client_submit_drive_step_mode(engine):
    """Step mode: drive steps the engine on this thread until the first of the pending futures is
    done (the shortest reply), and the answers equal generate's; a bad request resolves its own
    future with an error Completion."""
    assert not engine.background
    c = EngineClient(engine, temperature=0, max_tokens=8, seed=3)
    reqs = [req("a long answer please", max_tokens=8), req("short", max_tokens=1), req("word " * 100)]
    want = c.generate(reqs)
    steps0 = engine.stats.steps
    futs = [c.submit(r) for r in reqs]
    assert not any(f.done() for f in futs)  # nothing runs until someone steps the engine
    c.drive(futs[:2])
    assert engine.stats.steps - steps0 <= 2
    assert futs[1].done() and not futs[0].done()
    assert futs[2].done() and "prompt has" in futs[2].result().error  # refused at its first step
    c.drive(futs[:1], timeout=0)  # timeout=0: exactly one step
    assert engine.stats.steps - steps0 <= 3
    _wait_all(c, futs)
    got = [f.result() for f in futs]
    assert [(o.text, o.tokens_in, o.tokens_out, o.error is None) for o in got] == \
        [(o.text, o.tokens_in, o.tokens_out, o.error is None) for o in want]
    assert got[0].model_id == "tiny" and not engine.has_work


def test_engine_client_submit_drive_background_mode(engine):
    c = EngineClient(engine, temperature=0, max_tokens=4)
    [want] = c.generate([req("background question")])
    engine.start_background()
    try:
        assert not c.steps_engine
        futs = [c.submit(req("background question")) for _ in range(3)]
        t0 = time.monotonic()
        _wait_all(c, futs)
        assert time.monotonic() - t0 < 60
        assert all(f.result().text == want.text for f in futs)
        # generate still works while the engine runs by itself
        assert c.generate([req("background question")])[0].text == want.text
    finally:
        engine.stop_background()
    assert not engine.background


def test_engine_client_submit_failure_is_an_error_completion():
    class Broken:
        model_name = "broken"
        background = False

        def submit(self, request, params):
            raise RuntimeError("queue is on fire")

        def step(self):
            return False

    fut = EngineClient(Broken()).submit(req("x"))
    assert fut.done() and fut.result().error == "engine: RuntimeError: queue is on fire"


def test_engine_client_unset_sampling_fields_are_left_to_the_engine(engine):
    c = EngineClient(engine, max_tokens=4)
    p = c._params(req("x", stop=["\n"]))
    assert (p.top_p, p.top_k, p.repetition_penalty) == (None, None, None)
    assert p.max_tokens == 4 and p.stop == ["\n"]
    p = EngineClient(engine, top_p=0.9, top_k=20, repetition_penalty=1.1)._params(req("x"))
    assert (p.top_p, p.top_k, p.repetition_penalty) == (0.9, 20, 1.1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        EngineClient(engine, repetition_penalty=0)


def test_openai_client_submit_drive(fake_api):
    """Requests run on the client's pool at once; drive returns when the first one is done."""
    srv = fake_api(lambda k, b, h: (200, ok_body("r:" + b["messages"][0]["content"]), {},
                                    float(b["messages"][0]["content"])))
    with client(srv, max_concurrency=4) as c:
        t0 = time.monotonic()
        futs = [c.submit(req(d)) for d in ("1.0", "0.05", "0.5")]
        c.drive(futs, timeout=5)
        assert futs[1].done() and not futs[0].done()
        assert time.monotonic() - t0 < 0.9
        c.drive(futs[:1], timeout=0.01)  # a short timeout: returns without an answer
        assert not futs[0].done()
        _wait_all(c, futs)
        assert [f.result().text for f in futs] == ["r:1.0", "r:0.05", "r:0.5"]
    closed = c.submit(req("late"))
    assert closed.done() and "closed" in closed.result().error


def test_router_submit_drive_routes_by_role(fake_api, engine):
    """memory -> an HTTP back end, gameplay/policy -> the engine (stepped by drive); a
    generate-only back end answers at once; an unknown role is an error Completion."""
    mem = fake_api(lambda k, b, h: (200, ok_body("mem:" + b["messages"][0]["content"]), {}, 0.2))
    ec = EngineClient(engine, temperature=0, max_tokens=3)
    with client(mem) as cm:
        router = RouterClient(memory=cm, gameplay=ec)
        roles = ["memory", "gameplay", "policy", "memory", "bogus"]
        futs = [router.submit(req(f"q{i}", role)) for i, role in enumerate(roles)]
        assert futs[4].done() and "unknown model_role 'bogus'" in futs[4].result().error
        _wait_all(router, futs)
    want = ec.generate([req("q1"), req("q2")])
    outs = [f.result() for f in futs]
    assert outs[0].text == "mem:q0" and outs[3].text == "mem:q3" and len(mem.calls) == 2
    assert [outs[1].text, outs[2].text] == [o.text for o in want] and outs[1].model_id == "tiny"
    assert not engine.has_work

    # Two clients over one engine are driven as one; a generate-only back end answers at once.
    both = RouterClient(memory=EngineClient(engine, temperature=0, max_tokens=3), gameplay=ec)
    futs = [both.submit(req("q1", "memory")), both.submit(req("q2", "gameplay"))]
    _wait_all(both, futs)
    assert [f.result().text for f in futs] == [o.text for o in want]
    srv = fake_api(echo("e:"))
    with client(srv) as c:
        rec = Recording(c)
        fut = RouterClient(memory=rec, gameplay=ec).submit(req("m", "memory"))
        assert fut.done() and fut.result().text == "e:m" and rec.batches == [["m"]]
        broken = RouterClient(memory=Recording(fail=True), gameplay=ec).submit(req("m", "memory"))
        assert "memory client raised RuntimeError: back end exploded" in broken.result().error
