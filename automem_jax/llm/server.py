"""OpenAI-compatible HTTP server over the local Engine (stdlib only).

    python -m automem_jax.llm.server --checkpoint preset:tiny --port 8000
    python -m automem_jax.llm.server --checkpoint gs://bucket/export/hf --port 8000 --api_key_env AUTOMEM_KEY

Routes: ``POST /v1/chat/completions`` (non-streaming, n=1) and ``GET /v1/models``. Handler threads
validate a request, hand it to ``engine.submit`` and wait on its future. The engine runs in
background mode (``start_background()`` when serving starts, ``stop_background()`` at close): its
scheduler admits each request between decode steps, so concurrent requests join the batch already
running. A request the engine refuses (too long, bad sampling values) gets its own 400 and never
affects the others. Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from automem_jax.agent.types import ROLE_POLICY, ChatRequest

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
_ROUTES = {CHAT_PATH: "POST", MODELS_PATH: "GET"}
_ROLES = ("system", "user", "assistant")
# Fields whose non-default values would change the answer in ways this server does not implement:
# reject them rather than silently ignore them.
_UNSUPPORTED = {
    "tools": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v), "function_call": lambda v: v not in (None, "none"),
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: v not in (None, 0),
    "logit_bias": lambda v: bool(v), "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", name,
                   "invalid_type")
    if (v <= lo if lo_open else v < lo) or v > hi or v != v:
        lo_s = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise _bad(f"'{name}' must be {lo_s} and <= {hi:g}, got {v}", name, "out_of_range")
    return v


def parse_chat_body(body: Any, served_names: tuple[str, ...], max_len: int):
    """Validates a chat-completions body; returns (ChatRequest, SamplingParams) or raises ApiError."""
    from automem_jax.llm.engine import SamplingParams
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    if model and model not in served_names:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves: {', '.join(served_names)}",
                       "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                   "missing_messages" if msgs is None else "invalid_messages")
    messages = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}; got {json.dumps(role)}",
                       f"{where}.role", "invalid_role")
        content = m.get("content")
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string (content-part arrays and null content are not "
                       f"supported); got {type(content).__name__ if content is not None else 'null'}",
                       f"{where}.content", "invalid_content")
        messages.append({"role": role, "content": content})
    if body.get("stream"):
        raise _bad("stream=true is not supported by this server; send stream=false (or omit it)", "stream",
                   "unsupported")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad(f"only n=1 is supported, got n={json.dumps(n)}", "n", "unsupported")
    for name, is_set in _UNSUPPORTED.items():
        if name in body and is_set(body[name]):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _number(body, "top_k", -1, 1 << 30, integer=True)  # vLLM extension; -1 or 0 = off
    repetition_penalty = _number(body, "repetition_penalty", 0, 1e6, lo_open=True)  # vLLM extension
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body = dict(body, max_tokens=body["max_completion_tokens"])
        pname = "max_completion_tokens"
    else:
        pname = "max_tokens"
    try:
        max_tokens = _number(body, "max_tokens", 1, 1 << 30, integer=True)
    except ApiError as e:
        e.message, e.param = e.message.replace("'max_tokens'", f"'{pname}'"), pname
        raise
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise _bad("'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    include_stop = body.get("include_stop_str_in_output", False)
    if not isinstance(include_stop, bool):
        raise _bad("'include_stop_str_in_output' must be a boolean", "include_stop_str_in_output")
    # top_p / top_k / repetition_penalty left out stay unset: the engine applies the checkpoint's
    # generation_config.json defaults (as vLLM does).
    given = {}
    if top_p is not None:
        given["top_p"] = float(top_p)
    if top_k is not None:
        given["top_k"] = max(int(top_k), 0)
    if repetition_penalty is not None:
        given["repetition_penalty"] = float(repetition_penalty)
    params = SamplingParams(
        temperature=1.0 if temperature is None else float(temperature),
        # Longer than the cache allows is not an error: the engine stops at its limit ("length").
        max_tokens=max_len if max_tokens is None else int(max_tokens),
        stop=stop or None, seed=seed, include_stop_str_in_output=include_stop, **given)
    req = ChatRequest(messages=messages, phase="chat", model_role=ROLE_POLICY, stop=stop or None,
                      max_tokens=params.max_tokens)
    return req, params


# ---------------------------------------------------------------------------------------------
# The engine front

class _Shutdown(Exception):
    pass


class _EngineFront:
    """Hands requests to the engine's scheduler (background mode) and counts what is in flight."""

    def __init__(self, engine):
        self.engine = engine
        self.requests_done = 0
        self.in_flight = 0
        self.largest_batch = 0  # most requests in the engine at once
        self.stopped: Future = Future()  # resolved at close: handlers still waiting answer 503
        self._cond = threading.Condition()
        self._closing = False
        # A server started on an engine already in background mode leaves it running at close.
        self._owns_background = not engine.background
        engine.start_background()

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, request: ChatRequest, params) -> Future:
        with self._cond:  # nothing is submitted after close began
            if self._closing:
                raise _Shutdown("the server is shutting down")
            fut = self.engine.submit(request, params)
            self.in_flight += 1
            self.largest_batch = max(self.largest_batch, self.in_flight)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, _fut: Future) -> None:
        with self._cond:
            self.in_flight -= 1
            self.requests_done += 1
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Refuses new requests, lets those in flight finish (within `timeout`), then stops the
        engine's thread if this server started it (the engine fails whatever is left)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while self.in_flight and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        if self._owns_background:
            self.engine.stop_background(max(0.0, deadline - time.monotonic()) + 1.0)
        if not self.stopped.done():
            self.stopped.set_result(None)


# ---------------------------------------------------------------------------------------------
# HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    server_version = "automem-jax"
    timeout = 120  # seconds a connection may sit idle or trickle a body

    # set per server in serve()
    app: "_App"

    def log_message(self, fmt, *args):  # request lines at debug level; headers are never logged
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- responses --
    def _send_json(self, status: int, obj: dict, *, close: bool = False, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError, *, close: bool = False, headers: dict | None = None) -> None:
        self._send_json(err.status, err.body(), close=close, headers=headers)

    # -- dispatch --
    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._body_read = False
        try:
            want = _ROUTES.get(path)
            if want is None:
                raise ApiError(404, f"unknown path {path!r}; this server has POST {CHAT_PATH} and GET {MODELS_PATH}",
                               code="not_found")
            if method != want:
                raise ApiError(405, f"{method} is not allowed on {path}; use {want}", code="method_not_allowed")
            self.app.check_auth(self.headers.get("Authorization"))
            if path == MODELS_PATH:
                self._send_json(200, self.app.models())
                return
            body = self._read_body()
            self._send_json(200, self.app.chat(body))
        except ApiError as e:
            extra = {"Allow": _ROUTES.get(path, "")} if e.status == 405 else None
            if e.status == 401:
                extra = {"WWW-Authenticate": "Bearer"}
            # An unread body would be parsed as the next request: skip it if it is small enough,
            # otherwise answer and close the connection.
            close = self._body_unread() and not self._discard_body()
            self._send_error(e, close=close, headers=extra)
            if close:
                self._linger()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a server bug answers 500, never kills the thread
            log.exception("unexpected error on %s %s", method, path)
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}"), close=self._body_unread())

    def _body_unread(self) -> bool:
        if self._body_read:
            return False
        return bool(self.headers.get("Transfer-Encoding")) or self.headers.get("Content-Length", "0").strip() != "0"

    def _discard_body(self) -> bool:
        if self.headers.get("Transfer-Encoding"):
            return False
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return False
        if not 0 <= n <= self.app.max_body_bytes:
            return False
        try:
            self._body_read = len(self.rfile.read(n)) == n
        except OSError:
            return False
        return self._body_read

    def _linger(self) -> None:
        """Half-closes and drains briefly, so the client reads our error instead of a TCP reset
        (closing a socket with unread input makes the kernel send RST)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _read_body(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ApiError(411, "Content-Length is required", code="length_required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {raw!r}") from None
        if n > self.app.max_body_bytes:
            raise ApiError(413, f"request body has {n} bytes; the limit is {self.app.max_body_bytes}",
                           code="request_too_large")
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            raise ApiError(400, f"request body ended after {len(data)} of {n} bytes")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"invalid JSON in the request body: {e}", code="invalid_json") from None

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")


class _App:
    def __init__(self, engine, front: _EngineFront, served_model_name: str, api_key: str | None,
                 max_body_bytes: int, request_timeout_s: float):
        self.engine = engine
        self.front = front
        self.model_name = served_model_name
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_len = int(getattr(engine, "max_len", 1 << 30))
        self.created = int(time.time())

    def check_auth(self, header: str | None) -> None:
        if self._key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "automem_jax", "max_model_len": self.max_len}]}

    def chat(self, body: Any) -> dict:
        req, params = parse_chat_body(body, (self.model_name,), self.max_len)
        try:
            fut = self.front.submit(req, params)
        except _Shutdown as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        wait([fut, self.front.stopped], timeout=self.request_timeout_s, return_when=FIRST_COMPLETED)
        if not fut.done():
            fut.cancel()  # the engine drops it at its next step and frees its pages
            if self.front.stopped.done():
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            raise ApiError(503, f"no answer from the engine within {self.request_timeout_s:g}s; "
                                f"the server is overloaded", code="timeout")
        try:
            out = fut.result()
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None
        if out.finish_reason == "error" or getattr(out, "error", None):
            if self.front.closing:  # failed by the engine's shutdown, not for its input
                raise ApiError(503, f"the server is shutting down ({out.error})", code="shutting_down")
            if str(out.error or "").startswith("engine"):  # a failed engine step, not a bad input
                raise ApiError(500, f"generation failed: {out.error}")
            # Otherwise the engine refused the request for its input (too long, bad chat, bad params).
            raise _bad(f"the engine rejected this request: {out.error}", "messages", "invalid_request")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class ServerHandle:
    """A running server: ``url`` (``http://host:port``), ``base_url`` (``url + "/v1"``, for
    OpenAI clients), ``stats`` (requests served and in flight, the most in the engine at once, and
    the engine's step counts), ``close()``."""

    def __init__(self, httpd: _HTTPServer, front: _EngineFront, thread: threading.Thread, model_name: str):
        self._httpd, self._front, self._thread = httpd, front, thread
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.base_url = self.url + "/v1"
        self.model_name = model_name
        self._closed = False

    @property
    def stats(self) -> dict:
        f = self._front
        out = {"requests_served": f.requests_done, "in_flight": f.in_flight, "largest_batch": f.largest_batch}
        es = getattr(f.engine, "stats", None)
        for name in ("steps", "decode_steps", "prefill_calls"):
            if hasattr(es, name):
                out[name] = getattr(es, name)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stops accepting connections; requests already in the engine are answered (within
        `timeout`), later ones get 503."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()  # stop accepting; handlers already running finish or get 503
        self._thread.join(timeout)
        self._front.close(timeout)
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(engine, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
          api_key_env: str | None = None, served_model_name: str | None = None,
          max_body_bytes: int = 32 << 20, request_timeout_s: float = 600.0) -> ServerHandle:
    """Starts the server in background threads (port 0 picks a free port) and returns its handle.
    The engine runs in background mode while it serves (it must not be stepped by anyone else).

    Auth: `api_key`, or the value of the environment variable `api_key_env`; neither = no auth.
    """
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set or empty")
    for attr in ("submit", "start_background", "stop_background"):
        if not callable(getattr(engine, attr, None)):
            raise TypeError(f"serve: the engine has no {attr}(); expected automem_jax.llm.engine.Engine")
    name = served_model_name or getattr(engine, "model_name", "") or "automem-policy"
    front = _EngineFront(engine)
    try:
        app = _App(engine, front, name, api_key, max_body_bytes, request_timeout_s)
        handler = type("Handler", (_Handler,), {"app": app})
        httpd = _HTTPServer((host, port), handler)
    except BaseException:
        front.close(5.0)
        raise
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    return ServerHandle(httpd, front, thread, name)


# ---------------------------------------------------------------------------------------------
# CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.llm.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="a local or gs:// Hugging Face folder, or preset:<name> (random weights, e.g. preset:tiny)")
    ap.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ap.add_argument("--api_key_env", default=None,
                    help="environment variable holding the bearer token clients must send (default: no auth)")
    ap.add_argument("--served_model_name", default=None, help="model id clients use (default: the engine's)")
    ap.add_argument("--max_batch", type=int, default=16, help="KV-cache rows: sequences decoded at once")
    ap.add_argument("--max_len", type=int, default=2048, help="tokens per sequence, prompt + completion")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    ap.add_argument("--dtype", default=None, help="compute/storage dtype for HF checkpoints, e.g. bfloat16")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weights seed)")
    ap.add_argument("--max_body_bytes", type=int, default=32 << 20, help="largest accepted request body")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        print(f"error: --api_key_env {args.api_key_env}: that environment variable is not set or empty",
              file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from automem_jax.llm.client import load_engine
    try:
        engine = load_engine(args.checkpoint, max_batch=args.max_batch, max_len=args.max_len, seed=args.seed,
                             tokenizer=args.tokenizer, dtype=args.dtype, model_name=args.served_model_name)
    except (OSError, ValueError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    try:
        handle = serve(engine, args.host, args.port, api_key_env=args.api_key_env,
                       served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    # Tests and scripts parse this line for the port.
    print(f"serving {handle.model_name} at {handle.base_url}", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
