"""The shared OpenAI-compatible HTTP layer (automem_jax.llm.openai_http) through both of its users,
OpenAIClient and CriticClient, against a real loopback server that injects faults per request."""

from __future__ import annotations

import logging
import pickle
import socket
import types
import uuid

import httpx2
import pytest

from automem_jax.agent.types import ChatRequest
from automem_jax.critic import CriticClient, CriticError
from automem_jax.critic.client import ToolsUnsupportedError
from automem_jax.llm.client import OpenAIClient
from automem_jax.llm.openai_http import (CONNECTION_ERROR, REDACTED, TIMED_OUT, EndpointError, OpenAIEndpoint, Secret,
                                         is_unreachable, server_message)
from tests.fault_server import (FaultServer, drop, hang, json_reply, no_choices, ok, raw, status, text_reply)

KEY_ENV = "AUTOMEM_FAULT_TEST_KEY"
FAST = {"backoff": 0.001, "backoff_max": 0.01}  # retries in tests never sleep for long
SDK_LOGGERS = ("openai", "openai._base_client", "httpx", "httpx2", "httpcore", "httpcore2", "httpcore2.http11",
               "httpcore2.connection")


@pytest.fixture
def key(monkeypatch):
    value = "sk-fault-" + uuid.uuid4().hex
    monkeypatch.setenv(KEY_ENV, value)
    return value


def _policy(srv_or_url, **kw) -> tuple[str | None, str | None, OpenAIClient]:
    """One OpenAIClient.generate call: (text, None) or (None, error)."""
    url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.base_url
    kw.setdefault("api_key_env", None)
    c = OpenAIClient(url, "fault-model", **{**FAST, **kw})
    with c:
        [out] = c.generate([ChatRequest([{"role": "user", "content": "hi"}], "plan", "policy", max_tokens=8)])
    return (out.text, None, c) if out.error is None else (None, out.error, c)


def _critic(srv_or_url, **kw) -> tuple[str | None, str | None, CriticClient]:
    """One CriticClient.chat call: (text, None) or (None, the CriticError's message)."""
    url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.base_url
    c = CriticClient(url, "fault-model", **{**FAST, **kw})
    try:
        reply = c.chat([{"role": "user", "content": "hi"}])
    except CriticError as e:
        return None, str(e), c
    finally:
        c.close()
    return reply.content, None, c


CLIENTS = {"policy": _policy, "critic": _critic}
both = pytest.mark.parametrize("call", list(CLIENTS.values()), ids=list(CLIENTS))


# ---------------------------------------------------------------------------------------- retries

@both
def test_retried_statuses_succeed_after_retries(call):
    script = [status(408, "request timeout"), status(409, "busy"),
              status(429, "slow down", {"Retry-After": "1"}),  # honoured, capped at backoff_max
              status(500, "boom"), status(503, "warming up"), ok("finally")]
    with FaultServer(script) as srv:
        text, error, _ = call(srv, max_retries=5)
    assert error is None and text == "finally"
    assert len(srv.seen) == 6
    assert [s.headers["x-stainless-retry-count"] for s in srv.seen] == [str(i) for i in range(6)]
    assert all(s.path == "/v1/chat/completions" and s.method == "POST" for s in srv.seen)


@both
def test_gives_up_after_max_retries_naming_status_message_and_attempts(call):
    with FaultServer([], then=status(503, "overloaded")) as srv:
        text, error, _ = call(srv, max_retries=2)
    assert text is None and len(srv.seen) == 3
    assert error.startswith("HTTP 503 from ") and f"{srv.base_url}/chat/completions" in error
    assert "overloaded" in error and error.endswith("(gave up after 3 attempts)")
    assert not is_unreachable(error)


@both
@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_other_4xx_fail_at_once(call, code):
    with FaultServer([status(code, f"nope {code}")]) as srv:
        text, error, _ = call(srv, max_retries=4)
    assert len(srv.seen) == 1
    assert text is None and error.startswith(f"HTTP {code} from ") and f"nope {code}" in error
    assert "attempts" not in error


@both
@pytest.mark.parametrize("reply,why", [
    (raw(200, b'{"choices": [{"message": '), "not JSON"),
    (raw(200, b"<html>gateway</html>", content_type="text/html"), "not JSON"),
    (no_choices(), "no choices"),
    (json_reply({"choices": []}), "no choices"),
    (json_reply({"choices": [{"index": 0}]}), "no message"),
    (json_reply({"choices": [{"message": {"content": 42}}]}), "message.content is int"),
])
def test_malformed_2xx_is_a_clear_error_and_not_retried(call, reply, why):
    with FaultServer([reply]) as srv:
        text, error, _ = call(srv, max_retries=3)
    assert len(srv.seen) == 1
    assert text is None and error.startswith("malformed chat completion from ") and why in error


def test_policy_reply_without_content_is_malformed_but_null_content_is_empty_text():
    with FaultServer([json_reply({"choices": [{"message": {"role": "assistant"}}]}), ok(None)]) as srv:
        _, error, _ = _policy(srv)
        text, none, _ = _policy(srv)
    assert error.startswith("malformed chat completion from ") and "has no content" in error
    assert text == "" and none is None


@both
def test_dropped_connection_is_retried_then_succeeds(call):
    with FaultServer([drop(), drop(), ok("back")]) as srv:
        text, error, _ = call(srv, max_retries=2)
    assert error is None and text == "back" and len(srv.seen) == 3


@both
def test_dropped_connection_gives_a_connection_error_after_max_retries(call):
    with FaultServer([], then=drop()) as srv:
        text, error, _ = call(srv, max_retries=2)
    assert text is None and len(srv.seen) == 3
    assert error.startswith(CONNECTION_ERROR) and is_unreachable(error)
    assert srv.base_url in error and error.endswith("(gave up after 3 attempts)")


@both
def test_refused_connection_and_timeout_are_unreachable(call):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text, error, _ = call(f"http://127.0.0.1:{port}/v1", max_retries=1)
    assert text is None and error.startswith(CONNECTION_ERROR) and "2 attempts" in error

    with FaultServer([], then=hang()) as srv:
        timeout = {"timeout": 0.2} if call is _policy else {"timeout_s": 0.2}
        text, error, _ = call(srv, max_retries=1, **timeout)
    assert text is None and error.startswith(TIMED_OUT) and "after 0.2s" in error and is_unreachable(error)
    assert len(srv.seen) == 2


# ---------------------------------------------------------------------------------------- the key

def _all_log_text(caplog) -> str:
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(fmt.format(r) for r in caplog.records)


@both
def test_key_is_sent_as_bearer_and_never_shown(call, key, caplog):
    caplog.set_level(logging.DEBUG)
    for name in SDK_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    # A careless server echoes the Authorization header in its error body and a response header.
    echo = {"X-Echo-Authorization": "{auth}"}
    script = [status(500, "upstream broke; you sent {auth}", echo), drop(), status(401, "bad key: {auth}", echo)]
    with FaultServer(script) as srv:
        text, error, client = call(srv, api_key_env=KEY_ENV, max_retries=2)
    assert srv.auths == [f"Bearer {key}"] * 3
    assert text is None and error.startswith("HTTP 401") and REDACTED in error and key not in error
    assert key not in repr(client) and key not in str(vars(client)) and KEY_ENV in repr(client)
    logged = _all_log_text(caplog)
    assert any(r.name.startswith("httpcore2") and r.levelno == logging.DEBUG for r in caplog.records)
    assert "X-Echo-Authorization" in logged and REDACTED in logged  # the echoed header was logged, redacted
    assert key not in logged


def test_critic_error_object_never_shows_the_key(key):
    with FaultServer([], then=status(500, "you sent {auth}")) as srv:
        c = CriticClient(srv.base_url, "m", api_key_env=KEY_ENV, max_retries=1, **FAST)
        with pytest.raises(CriticError) as ei:
            c.chat([{"role": "user", "content": "hi"}])
    e = ei.value
    assert e.status == 500 and e.endpoint == f"{srv.base_url}/chat/completions" and e.kind == "HTTP"
    assert e.attempts == 2 and e.__cause__ is None and e.__suppress_context__
    for text in (str(e), repr(e), str(vars(e))):
        assert key not in text
    assert c.usage.failures == 1 and c.usage.calls == 0  # one failed call, however many attempts


@both
def test_no_key_configured_sends_no_authorization(call, monkeypatch):
    # The SDK's own variables must not put an ambient key on a server we were told has no auth.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-1")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-ambient-2\nX-Other: 1")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-ambient")
    with FaultServer([ok("hello")]) as srv:
        text, error, _ = call(srv, api_key_env=None)
    assert text == "hello" and srv.auths == [""]
    assert "openai-organization" not in srv.seen[0].headers


def test_configured_key_wins_over_ambient_sdk_variables(key, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-1")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-ambient-2")
    with FaultServer([ok("hello")]) as srv:
        text, error, _ = _policy(srv, api_key_env=KEY_ENV)
    assert text == "hello" and srv.auths == [f"Bearer {key}"]


def test_secret_never_shows_its_value():
    s = Secret("sk-value-123")
    assert repr(s) == str(s) == "<secret>" and s.get() == "sk-value-123"
    assert s.redact("key=sk-value-123.") == f"key={REDACTED}."
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(ValueError):
        Secret("")


# ---------------------------------------------------------------------------------------- wait policy

def test_retry_wait_is_equal_jitter_backoff_and_honours_retry_after():
    ep = OpenAIEndpoint("http://127.0.0.1:9/v1", "m", max_retries=4, backoff=1.0, backoff_max=6.0)
    sdk, opts = ep._sdk, types.SimpleNamespace(get_max_retries=lambda default: default)
    for k in range(4):  # remaining = max_retries - k: wait k is in [b/2, b], b = min(6, 2**k)
        b = min(6.0, 2.0 ** k)
        waits = [sdk._calculate_retry_timeout(4 - k, opts, None) for _ in range(50)]
        assert all(b / 2 <= w <= b for w in waits), (k, waits)
    assert sdk._calculate_retry_timeout(4, opts, httpx2.Headers({"retry-after": "3"})) >= 3.0
    assert sdk._calculate_retry_timeout(4, opts, httpx2.Headers({"retry-after-ms": "2500"})) >= 2.5
    assert sdk._calculate_retry_timeout(4, opts, httpx2.Headers({"retry-after": "100"})) <= 6.0  # capped
    ep.close()


# ---------------------------------------------------------------------------------------- plain JSON calls

def test_post_json_and_get_json(key):
    script = [text_reply("Success: LoRA adapter 'a1' added successfully."), json_reply({"object": "list",
              "data": [{"id": "base"}, {"id": "a1"}]}), text_reply(""), status(404, "adapter a2 not found"),
              status(503, "restarting"), json_reply({"ok": True})]
    with FaultServer(script) as srv:
        with OpenAIClient(srv.base_url, "base", api_key_env=KEY_ENV, max_retries=0, **FAST) as c:
            assert c.post_json("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": "/x"}) == {
                "text": "Success: LoRA adapter 'a1' added successfully."}
            assert [m["id"] for m in c.get_json("/v1/models")["data"]] == ["base", "a1"]
            assert c.get_json("/health") == {}
            with pytest.raises(EndpointError) as ei:
                c.post_json("/v1/unload_lora_adapter", {"lora_name": "a2"})
            assert ei.value.status == 404 and str(ei.value).startswith("HTTP 404") and "a2 not found" in str(ei.value)
            assert c.get_json("/health", max_retries=1) == {"ok": True}  # one retry for this call only
            with pytest.raises(ValueError, match="path"):
                c.get_json("health")
    assert [(s.method, s.path) for s in srv.seen] == [
        ("POST", "/v1/load_lora_adapter"), ("GET", "/v1/models"), ("GET", "/health"),
        ("POST", "/v1/unload_lora_adapter"), ("GET", "/health"), ("GET", "/health")]
    assert srv.seen[0].body == {"lora_name": "a1", "lora_path": "/x"}
    assert srv.auths == [f"Bearer {key}"] * 6

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OpenAIClient(f"http://127.0.0.1:{port}/v1", "base", api_key_env=None, max_retries=0) as c:
        with pytest.raises(EndpointError) as ei:
            c.get_json("/health")
    assert ei.value.unreachable and str(ei.value).startswith(CONNECTION_ERROR)


# ---------------------------------------------------------------------------------------- critic specifics

def test_critic_tool_calls_content_parts_and_tools_refusal():
    parts = {"content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}
    calls = [{"id": "c1", "name": "read_steps", "arguments": {"episode": 0}},  # an object, not JSON text
             {"name": "list_episodes", "arguments": "{}"}]
    script = [json_reply({"choices": [{"message": parts, "finish_reason": "stop"}]}), ok(None, tool_calls=calls),
              status(400, "\"auto\" tool choice requires --enable-auto-tool-choice"), status(400, "bad tool name")]
    tools = [{"type": "function", "function": {"name": "read_steps", "parameters": {"type": "object"}}}]
    with FaultServer(script) as srv:
        c = CriticClient(srv.base_url, "m", max_retries=2, **FAST)
        first = c.chat([{"role": "user", "content": "a"}])
        second = c.chat([{"role": "user", "content": "b"}], tools=tools, tool_choice="auto")
        with pytest.raises(ToolsUnsupportedError) as refused:
            c.chat([{"role": "user", "content": "c"}], tools=tools)
        with pytest.raises(CriticError) as plain:  # no tools offered: a plain error
            c.chat([{"role": "user", "content": "d"}])
    assert first.content == "part one, part two" and first.tool_calls == [] and first.prompt_tokens == 0
    assert [(t.id, t.name, t.arguments) for t in second.tool_calls] == [
        ("c1", "read_steps", '{"episode": 0}'), ("call_1", "list_episodes", "{}")]
    assert second.finish_reason == "tool_calls" and (second.prompt_tokens, second.completion_tokens) == (7, 2)
    assert refused.value.status == 400 and not isinstance(plain.value, ToolsUnsupportedError)
    assert srv.seen[1].body["tools"] == tools and srv.seen[1].body["tool_choice"] == "auto"
    assert "tools" not in srv.seen[0].body and len(srv.seen) == 4  # 400s are not retried
    assert c.usage.calls == 2 and c.usage.failures == 2


def test_server_message_shapes():
    assert server_message({"error": {"message": "m1"}}) == "m1"
    assert server_message({"error": "m2"}) == "m2"
    assert server_message({"object": "error", "message": "m3", "code": 400}) == "m3"  # older vLLM
    assert server_message(b'{"detail": "m4"}') == "m4"  # FastAPI
    assert server_message("<html>oops</html>") == "<html>oops</html>"
    assert server_message(None) == "(no body)"


# ---------------------------------------------------------------------------------------- rollout CLI

def test_rollout_cli_over_http(tmp_path, monkeypatch, capsys):
    from automem_jax.rollout.runner import main
    argv = ["--env", "crafter", "--seeds", "1", "--num_envs", "1", "--max_steps", "2", "--max_tokens", "64",
            "--no_progress", "--model", "served"]
    with FaultServer([], then=ok("<|ACTION|>Noop<|END|><|DONE|>")) as srv:
        rc = main(argv + ["--run_dir", str(tmp_path / "run"), "--base_url", srv.base_url, "--api_key_env", ""])
        assert rc == 0 and (tmp_path / "run" / "summary.json").exists()
        assert srv.seen and all(s.auth == "" and s.body["model"] == "served" for s in srv.seen)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        rc = main(argv + ["--run_dir", str(tmp_path / "run2"), "--base_url", srv.base_url])
    assert rc == 2 and "OPENAI_API_KEY" in capsys.readouterr().err
