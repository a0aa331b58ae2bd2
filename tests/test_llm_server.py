"""The OpenAI-compatible server over the real tiny engine, spoken to by the official openai client
and by raw HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai  # the official client as the peer (test extra: openai==3.54.0)
import pytest

from automem_jax.agent.types import ChatRequest
from automem_jax.llm.engine import Engine
from automem_jax.llm.sampling import SamplingParams
from automem_jax.llm.server import serve

KEY = "test-server-key-5f1c"
MAX_LEN = 128
BODY_LIMIT = 64 * 1024
HELLO = [{"role": "user", "content": "Say hello to the crafter."}]


@pytest.fixture(scope="module")
def served():
    engine = Engine.from_preset("tiny", max_batch=8, max_len=MAX_LEN, seed=0)
    # The engine's own greedy answer, computed before the server owns the engine.
    ref = engine.generate_full([ChatRequest(HELLO, "plan", "policy")], [SamplingParams(temperature=0, max_tokens=6)])[0]
    handle = serve(engine, api_key=KEY, max_body_bytes=BODY_LIMIT)
    try:
        yield handle, ref
    finally:
        handle.close()


def _client(handle, key=KEY):
    return openai.OpenAI(base_url=handle.base_url, api_key=key, max_retries=0, timeout=60)


def _raw(handle, method, path, body=None, headers=None, key=KEY):
    """One raw HTTP exchange; returns (status, headers, parsed JSON)."""
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    try:
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.headers, json.loads(data)
    finally:
        conn.close()


def _assert_error_shape(obj):
    assert set(obj) == {"error"}
    assert set(obj["error"]) == {"message", "type", "param", "code"}
    assert isinstance(obj["error"]["message"], str) and obj["error"]["message"]


def test_chat_completion_matches_engine_greedy(served):
    handle, ref = served
    r = _client(handle).chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_max_tokens_and_model_optional(served):
    handle, _ = served
    status, _, obj = _raw(handle, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "system", "content": "Be brief."}, *HELLO], "max_tokens": 2,
                           "seed": 7})
    assert status == 200, obj
    assert 1 <= obj["usage"]["completion_tokens"] <= 2
    assert obj["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_list(served):
    handle, _ = served
    models = _client(handle).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_bad_request_via_openai_client(served):
    handle, _ = served
    with pytest.raises(openai.BadRequestError) as ei:
        _client(handle).chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}],
                                                max_tokens=4)
    assert ei.value.status_code == 400
    assert "messages[0].role must be one of system, user, assistant" in str(ei.value)
    err = ei.value.response.json()["error"]
    assert err["param"] == "messages[0].role" and err["type"] == "invalid_request_error"


def test_wrong_or_missing_token_is_401(served):
    handle, _ = served
    with pytest.raises(openai.AuthenticationError) as ei:
        _client(handle, key="not-the-key").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
    assert ei.value.status_code == 401
    status, headers, obj = _raw(handle, "GET", "/v1/models", key=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    _assert_error_shape(obj)
    assert obj["error"]["code"] == "invalid_api_key"
    assert KEY not in json.dumps(obj)


MSG = [{"role": "user", "content": "hi"}]
BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"model": "tiny"}, 400, "'messages' must be a non-empty list"),
    ({"model": "tiny", "messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400, "must be a string"),
    ({"messages": ["hi"]}, 400, "messages[0] must be an object"),
    ({"messages": MSG, "n": 2}, 400, "only n=1 is supported"),
    ({"messages": MSG, "stream": "yes"}, 400, "'stream' must be a boolean"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, 400, "'stream_options' is only allowed"),
    ({"messages": MSG, "stream": True, "stream_options": {"include_usage": 1}}, 400, "must be a boolean"),
    ({"messages": MSG, "temperature": 2.5}, 400, "'temperature' must be >= 0 and <= 2"),
    ({"messages": MSG, "temperature": -0.1}, 400, "'temperature' must be >= 0"),
    ({"messages": MSG, "top_p": 0}, 400, "'top_p' must be > 0 and <= 1"),
    ({"messages": MSG, "top_p": 1.5}, 400, "'top_p' must be > 0 and <= 1"),
    ({"messages": MSG, "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({"messages": MSG, "repetition_penalty": 0}, 400, "'repetition_penalty' must be > 0"),
    ({"messages": MSG, "max_tokens": "8"}, 400, "'max_tokens' must be an integer"),
    ({"messages": MSG, "max_completion_tokens": -3}, 400, "'max_completion_tokens' must be >= 1"),
    ({"messages": MSG, "stop": [""]}, 400, "'stop' must be"),
    ({"messages": MSG, "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ({"model": "gpt-4o", "messages": MSG}, 404, "The model 'gpt-4o' does not exist"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[f"{i}-{b[2][:24]}" for i, b in enumerate(BAD)])
def test_invalid_requests_get_clear_errors(served, body, status, message):
    handle, _ = served
    got, _, obj = _raw(handle, "POST", "/v1/chat/completions", body)
    assert got == status, obj
    _assert_error_shape(obj)
    assert message in obj["error"]["message"]


def test_sampling_fields_left_out_stay_unset():
    """Unset top_p / top_k / repetition_penalty reach the engine as None (its checkpoint defaults
    apply); given ones pass through (top_k -1 = off = 0)."""
    from automem_jax.llm.server_schema import parse_chat_body
    _, p = parse_chat_body({"messages": MSG}, ("tiny",), 64)
    assert (p.top_p, p.top_k, p.repetition_penalty, p.temperature, p.max_tokens) == (None, None, None, 1.0, 64)
    _, p = parse_chat_body({"messages": MSG, "top_p": 0.8, "top_k": -1, "repetition_penalty": 1.05}, ("tiny",), 64)
    assert (p.top_p, p.top_k, p.repetition_penalty) == (0.8, 0, 1.05)


ERRORS = [  # body -> (status, param, code) of the error; pydantic's loc becomes OpenAI's param
    ({"messages": MSG * 2 + [{"role": "user"}]}, 400, "messages[2].content", "invalid_content"),
    ({"messages": [{"content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ({"messages": None}, 400, "messages", "missing_messages"),
    ({"messages": []}, 400, "messages", "invalid_messages"),
    ({"messages": MSG, "temperature": True}, 400, "temperature", "invalid_type"),
    ({"messages": MSG, "max_tokens": 8.0}, 400, "max_tokens", "invalid_type"),
    ({"messages": MSG, "top_k": -2}, 400, "top_k", "out_of_range"),
    ({"messages": MSG, "max_tokens": 4, "max_completion_tokens": 0}, 400, "max_completion_tokens", "out_of_range"),
    ({"messages": MSG, "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage",
     "invalid_type"),
    ({"messages": MSG, "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats", "unsupported"),
    ({"messages": MSG, "stream_options": {}}, 400, "stream_options", "invalid_value"),
    ({"messages": MSG, "n": 2}, 400, "n", "unsupported"),
    ({"messages": MSG, "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported"),
    ({"messages": MSG, "stop": ["a"] * 17}, 400, "stop", "invalid_value"),
    ({"model": 5, "messages": MSG}, 400, "model", "invalid_type"),
    ({"model": "gpt-4o", "messages": MSG}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("body,status,param,code", ERRORS, ids=[e[2] for e in ERRORS])
def test_chat_body_errors_name_the_field(body, status, param, code):
    from automem_jax.llm.server_schema import ApiError, parse_chat_body
    with pytest.raises(ApiError) as ei:
        parse_chat_body(body, ("tiny",), 64)
    assert (ei.value.status, ei.value.param, ei.value.code) == (status, param, code), ei.value.message


def test_chat_request_model_ignores_unknown_fields(served):
    """ChatCompletionRequest: fields OpenAI or vLLM define that we do not use are ignored (vLLM
    does the same), the refused ones are accepted at their defaults, and its JSON schema lists them."""
    from automem_jax.llm.server_schema import ChatCompletionRequest, parse_chat_body, stream_settings
    body = {"messages": MSG, "max_completion_tokens": 3, "stop": "x", "user": "u-1", "metadata": {"k": "v"},
            "store": False, "parallel_tool_calls": True, "tools": [], "tool_choice": "none", "logprobs": False,
            "presence_penalty": 0, "response_format": {"type": "text"}}
    req, p = parse_chat_body(body, ("tiny",), 64)
    assert (p.max_tokens, p.stop, req.stop, req.messages) == (3, ["x"], ["x"], MSG)
    assert stream_settings(body) == (False, False)
    assert stream_settings(dict(body, stream=True, stream_options={"include_usage": True})) == (True, True)
    status, _, obj = _raw(served[0], "POST", "/v1/chat/completions", dict(body, max_completion_tokens=2))
    assert status == 200 and 1 <= obj["usage"]["completion_tokens"] <= 2, obj
    schema = ChatCompletionRequest.model_json_schema()
    assert schema["required"] == ["messages"]
    assert {"model", "messages", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens",
            "max_completion_tokens", "seed", "stop", "n", "stream", "stream_options", "include_stop_str_in_output",
            "tools", "logprobs", "response_format"} <= set(schema["properties"])
    temp = schema["properties"]["temperature"]["anyOf"][0]
    assert (temp["type"], temp["minimum"], temp["maximum"]) == ("number", 0, 2)


def test_unknown_path_wrong_method_and_large_body(served):
    handle, _ = served
    status, _, obj = _raw(handle, "GET", "/v1/completions")
    assert status == 404 and "unknown path" in obj["error"]["message"]
    _assert_error_shape(obj)
    status, headers, obj = _raw(handle, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    _assert_error_shape(obj)
    status, headers, obj = _raw(handle, "POST", "/v1/models", {"x": 1})
    assert status == 405 and headers["Allow"] == "GET"
    status, _, obj = _raw(handle, "DELETE", "/v1/chat/completions")
    assert status == 405
    for size in (BODY_LIMIT + 10, 16 * BODY_LIMIT):  # the client reads our 413, not a reset
        big = {"messages": [{"role": "user", "content": "x" * size}]}
        status, headers, obj = _raw(handle, "POST", "/v1/chat/completions", big)
        assert status == 413 and f"the limit is {BODY_LIMIT}" in obj["error"]["message"]
        assert headers["Connection"] == "close"
        _assert_error_shape(obj)


def test_keep_alive_connection_survives_errors(served):
    """A 401 (body skipped) and a 400 keep the connection usable; the next request on it succeeds."""
    handle, _ = served
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MSG}),
                     headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"})
        r0 = conn.getresponse()
        assert r0.status == 401 and r0.headers["Connection"] is None and json.loads(r0.read())["error"]
        hdr = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body=b"{oops", headers=hdr)
        r1 = conn.getresponse()
        assert r1.status == 400 and json.loads(r1.read())["error"]["code"] == "invalid_json"
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MSG, "max_tokens": 2}),
                     headers=hdr)
        r2 = conn.getresponse()
        assert r2.status == 200 and json.loads(r2.read())["usage"]["completion_tokens"] >= 1
    finally:
        conn.close()


def test_32_concurrent_requests_are_batched(served):
    """32 clients at once (plus one over-long prompt, which gets its own 400): all answered, and
    they shared the engine's decode steps (the engine runs in background mode, so requests that
    arrive while others decode join the running batch)."""
    handle, _ = served
    client = _client(handle)
    before = handle.stats

    def ask(i):
        return client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": f"Question number {i}?"}])

    def too_long():
        try:
            client.chat.completions.create(model="tiny", max_tokens=4,
                                           messages=[{"role": "user", "content": "word " * (MAX_LEN * 2)}])
        except openai.BadRequestError as e:
            return e
        return None

    with ThreadPoolExecutor(33) as pool:
        futs = [pool.submit(ask, i) for i in range(32)]
        bad = pool.submit(too_long)
        results = [f.result(timeout=120) for f in futs]
        err = bad.result(timeout=120)
    assert len(results) == 32
    for r in results:
        assert 1 <= r.usage.completion_tokens <= 4 and r.usage.prompt_tokens > 5
        assert isinstance(r.choices[0].message.content, str)
    assert err is not None and "prompt has" in str(err) and f"at most {MAX_LEN - 1}" in str(err)
    after = handle.stats
    assert after["requests_served"] - before["requests_served"] == 33 and after["in_flight"] == 0
    assert after["largest_batch"] > 1
    # Every reply's first token comes from its prefill, the rest from decode steps: one at a time,
    # the decode steps would equal the decode-sampled tokens.
    decode_tokens = sum(r.usage.completion_tokens for r in results) - len(results)
    decode_steps = after["decode_steps"] - before["decode_steps"]
    assert decode_tokens >= 32, decode_tokens
    assert 1 <= 2 * decode_steps <= decode_tokens, (decode_steps, decode_tokens, after)


def test_serve_rejects_unset_key_variable(served):
    handle, _ = served
    with pytest.raises(ValueError, match="AUTOMEM_TEST_UNSET_VAR_9"):
        serve(object(), api_key_env="AUTOMEM_TEST_UNSET_VAR_9")


def _wait_line(proc, pattern, deadline):
    """Reads stdout lines until one matches (bounded by `deadline`)."""
    lines = []
    found = threading.Event()
    box = {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(pattern, line)
            if m:
                box["m"] = m
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    found.wait(max(0.0, deadline - time.monotonic()))
    return box.get("m"), lines


def test_cli_serves_and_exits_cleanly_on_sigterm(tmp_path):
    env = dict(os.environ, AUTOMEM_TEST_SERVER_KEY="cli-key-77", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "automem_jax.llm.server", "--checkpoint", "preset:tiny", "--port", "0",
           "--api_key_env", "AUTOMEM_TEST_SERVER_KEY", "--max_batch", "2", "--max_len", "64",
           "--served_model_name", "tiny-cli"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp_path / "err.log", "w"), text=True, env=env)
    try:
        m, lines = _wait_line(proc, r"serving tiny-cli at http://127\.0\.0\.1:(\d+)/v1", time.monotonic() + 90)
        assert m, f"server did not start: {lines} {(tmp_path / 'err.log').read_text()[-2000:]}"
        port = int(m.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer cli-key-77"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["data"][0]["id"] == "tiny-cli"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_cli_reports_bad_flags():
    env = dict(os.environ)
    env.pop("AUTOMEM_TEST_UNSET_VAR_9", None)
    r = subprocess.run([sys.executable, "-m", "automem_jax.llm.server", "--checkpoint", "preset:tiny", "--port", "0",
                        "--api_key_env", "AUTOMEM_TEST_UNSET_VAR_9"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 2 and "AUTOMEM_TEST_UNSET_VAR_9" in r.stderr
    r = subprocess.run([sys.executable, "-m", "automem_jax.llm.server", "--checkpoint", "/nonexistent/model/dir",
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "/nonexistent/model/dir" in r.stderr


def test_our_openai_client_submit_drive_against_the_server(served, monkeypatch):
    """The runner's async path over HTTP: OpenAIClient.submit from one thread, drive until done;
    each answer is the engine's own greedy answer."""
    from automem_jax.llm.client import OpenAIClient
    handle, ref = served
    monkeypatch.setenv("AUTOMEM_TEST_SERVER_KEY_2", KEY)
    with OpenAIClient(handle.base_url, "tiny", api_key_env="AUTOMEM_TEST_SERVER_KEY_2", temperature=0,
                      max_retries=0) as c:
        futs = [c.submit(ChatRequest(HELLO, "plan", "policy", max_tokens=6)) for _ in range(6)]
        for _ in range(600):
            pending = [f for f in futs if not f.done()]
            if not pending:
                break
            c.drive(pending)
        outs = [f.result() for f in futs]
    assert all(o.error is None and o.text == ref.text and o.tokens_out == ref.completion_tokens for o in outs), outs


def test_serve_runs_the_engine_in_background_only_while_serving():
    """serve() starts the engine's background thread and close() stops it (the engine is then
    stepped by its caller again); an engine already in background mode is left running."""
    engine = Engine.from_preset("tiny", max_batch=2, max_len=64, seed=0)
    handle = serve(engine)
    try:
        assert engine.background
        status, _, obj = _raw(handle, "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 2}, key=None)
        assert status == 200, obj
    finally:
        handle.close()
    assert not engine.background and not engine.has_work
    assert engine.generate([ChatRequest(MSG, "plan", "policy", max_tokens=2)])[0].error is None
    engine.start_background()
    try:
        serve(engine).close()
        assert engine.background  # not ours to stop
    finally:
        engine.stop_background()


# ---------------------------------------------------------------------------------------------
# Streaming (server-sent events), /health

def _stream_chunks(handle, messages=HELLO, **kw):
    """(joined text, finish reasons of the content chunks, usage chunks) of one streamed reply."""
    parts, finishes, usage = [], [], []
    for ch in _client(handle).chat.completions.create(model="tiny", messages=messages, stream=True, **kw):
        assert ch.object == "chat.completion.chunk" and ch.model == "tiny"
        if not ch.choices:
            usage.append(ch.usage)
            continue
        parts.append(ch.choices[0].delta.content or "")
        finishes.append(ch.choices[0].finish_reason)
    return "".join(parts), finishes, usage


def _complete(handle, messages=HELLO, **kw):
    return _client(handle).chat.completions.create(model="tiny", messages=messages, **kw)


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_text_equals_the_non_streamed_reply(served, include_usage):
    handle, _ = served
    ref = _complete(handle, max_tokens=10, temperature=0)
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    text, finishes, usage = _stream_chunks(handle, max_tokens=10, temperature=0, **extra)
    assert text == ref.choices[0].message.content
    assert finishes[-1] == ref.choices[0].finish_reason and not any(finishes[:-1])
    if include_usage:  # one usage chunk with no choices, last
        assert len(usage) == 1
        assert (usage[0].prompt_tokens, usage[0].completion_tokens, usage[0].total_tokens) == \
            (ref.usage.prompt_tokens, ref.usage.completion_tokens, ref.usage.total_tokens)
    else:
        assert usage == []


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "seeded"])
def test_streamed_text_with_a_stop_string(served, sampling):
    """The deltas never run past a stop string: joined they equal the reply cut at it. (The random
    tiny model answers "hi" greedily with newlines then " là là ..."; sampled, with words of many
    scripts, so multi-byte characters cross token boundaries.)"""
    handle, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    full = _complete(handle, msgs, max_tokens=16, **sampling).choices[0].message.content
    # The last 3-character piece of the reply that occurs there first: the cut keeps most of it.
    i = max(i for i in range(len(full) - 2) if full.find(full[i:i + 3]) == i and "\ufffd" not in full[i:i + 3])
    stop = full[i:i + 3]
    assert i >= 3, (full, stop)
    for include in (False, True):
        kw = dict(max_tokens=16, stop=[stop, "\u00e9t\u00e9 zzz"], extra_body={"include_stop_str_in_output": include},
                  **sampling)
        ref = _complete(handle, msgs, **kw)
        assert ref.choices[0].finish_reason == "stop"
        assert ref.choices[0].message.content == full[:i + (len(stop) if include else 0)]
        text, finishes, _ = _stream_chunks(handle, msgs, **kw)
        assert text == ref.choices[0].message.content and finishes[-1] == "stop"
    text, finishes, _ = _stream_chunks(handle, msgs, max_tokens=16, **sampling)
    assert text == full


def test_settled_text_never_takes_back_a_character():
    """Every settled prefix of a reply with multi-byte characters (decoded token by token, with
    incomplete UTF-8 at the cut) is a prefix of the final text."""
    from automem_jax.llm.server_stream import _settled
    from automem_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer()
    final = "Caf\u00e9 \u4e16\u754c \U0001F389\U0001F333 done\u2014ok"
    ids = tok.encode(final, add_special_tokens=False)
    assert tok.decode(ids) == final
    for hold in (0, 3):
        sent = ""
        for k in range(1, len(ids) + 1):
            text = _settled(tok.decode(ids[:k], skip_special_tokens=True), hold)
            assert "\ufffd" not in text and final.startswith(text)
            assert text.startswith(sent) or len(text) < len(sent)
            sent = max(sent, text, key=len)
        assert final[:len(final) - hold] == sent


def test_stream_wire_format(served):
    handle, _ = served
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        raw = resp.read().decode()
    finally:
        conn.close()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_refused_prompt_is_a_400_and_disconnect_cancels(served):
    """A prompt the engine refuses is an HTTP 400 even when streaming; a client that leaves
    mid-stream, or while waiting for a whole reply, cancels its request (the engine drops it: no
    tokens counted for it)."""
    handle, _ = served
    with pytest.raises(openai.BadRequestError, match="prompt has"):
        _client(handle).chat.completions.create(model="tiny", max_tokens=4, stream=True,
                                                messages=[{"role": "user", "content": "word " * (MAX_LEN * 2)}])
    engine = handle.engine
    before, tokens_before = handle.stats["requests_served"], engine.stats.generated_tokens
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"messages": HELLO, "max_tokens": MAX_LEN, "temperature": 0, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while b'"content":"' not in (line := resp.readline()) or b'"role"' in line:
        assert line, "the stream ended before a content chunk"
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while handle.stats["requests_served"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.stats["requests_served"] == before + 1 and handle.stats["in_flight"] == 0
    time.sleep(0.5)
    assert not engine.has_work and engine.stats.generated_tokens == tokens_before
    # The same for a client that leaves while waiting for a non-streamed reply.
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"messages": HELLO, "max_tokens": MAX_LEN, "temperature": 0, "seed": 3}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while handle.stats["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    while handle.stats["requests_served"] == before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert handle.stats["requests_served"] == before + 2 and handle.stats["in_flight"] == 0
    assert not engine.has_work and engine.stats.generated_tokens == tokens_before


def test_health_needs_no_key(served):
    handle, _ = served
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=30)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() in (b"", b"{}")
    finally:
        conn.close()
    status, headers, _ = _raw(handle, "POST", "/health", {})
    assert status == 405 and headers["Allow"] == "GET"


def test_chunked_request_bodies(served):
    """A chunked body is read up to the size limit (past it: 413, connection closed)."""
    handle, _ = served

    def post_chunked(parts):
        conn = http.client.HTTPConnection(handle.host, handle.port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", body=iter(parts), encode_chunked=True,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                  "Transfer-Encoding": "chunked"})
            resp = conn.getresponse()
            return resp.status, resp.headers, json.loads(resp.read())
        finally:
            conn.close()

    body = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
    status, _, obj = post_chunked([body[:10], body[10:]])
    assert status == 200 and obj["usage"]["completion_tokens"] >= 1
    status, headers, obj = post_chunked([b"x" * (BODY_LIMIT // 2)] * 3)
    assert status == 413 and headers["Connection"] == "close"
    assert f"the limit is {BODY_LIMIT}" in obj["error"]["message"]
    _assert_error_shape(obj)
