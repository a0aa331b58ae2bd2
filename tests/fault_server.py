"""A scripted fault server on 127.0.0.1 for tests of the HTTP clients (real sockets, real HTTP/1.1).

    with FaultServer([status(429, "slow down", {"Retry-After": "1"}), drop(), ok("fine")]) as srv:
        client = OpenAIClient(srv.base_url, "m", ...)
        ...
        srv.seen        # one Seen per request, in arrival order (method, path, headers, body, auth)

Request k (any method, any path) is answered by the k-th action of the script; once the script
runs out, by `then` (default: ``ok()``). A script may also be a callable ``fn(k, seen) -> action``.
Actions:
  * ``ok(text, tool_calls=None, usage=True)``: 200 with a chat completion (tool call ``arguments``
    are sent exactly as given, so a dict goes out as a JSON object, as some servers do);
  * ``status(code, message, headers)``: an OpenAI-style error ``{"error": {"message": ...}}``;
  * ``raw(code, body, headers, content_type)``: any bytes, e.g. malformed JSON with 200;
  * ``no_choices()``: 200 with a JSON completion that has no choices;
  * ``json_reply(obj, code)`` / ``text_reply(text, code)``: any JSON value or plain text;
  * ``drop()``: reads the request, then closes the socket without a response;
  * ``hang()``: reads the request and answers nothing until the server closes (for timeouts).
In messages and header values, ``{auth}`` becomes the request's Authorization header (a careless
proxy echoing the key back, to test redaction).
"""
from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lowercase names
    body: Any  # parsed JSON, the raw text when it is not JSON, None when empty
    auth: str = ""  # the Authorization header, "" when absent


@dataclass
class Action:
    kind: str  # reply | drop | hang
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _completion(text: str | None, tool_calls: list | None, usage: bool) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [{"id": c.get("id", f"call_{i}"), "type": "function",
                                  "function": {"name": c["name"], "arguments": c.get("arguments", "{}")}}
                                 for i, c in enumerate(tool_calls)]
    out = {"id": "chatcmpl-fault", "object": "chat.completion", "model": "fault-model",
           "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool_calls else "stop"}]}
    if usage:
        out["usage"] = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    return out


def ok(text: str | None = "ok", tool_calls: list | None = None, usage: bool = True) -> Action:
    return json_reply(_completion(text, tool_calls, usage))


def status(code: int, message: str = "scripted error", headers: dict[str, str] | None = None) -> Action:
    return Action("reply", code, json.dumps({"error": {"message": message, "type": "scripted"}}).encode(),
                  dict(headers or {}))


def raw(code: int, body: bytes, headers: dict[str, str] | None = None,
        content_type: str = "application/json") -> Action:
    return Action("reply", code, body, dict(headers or {}), content_type)


def no_choices() -> Action:
    return json_reply({"id": "chatcmpl-fault", "object": "chat.completion", "model": "fault-model"})


def json_reply(obj: Any, code: int = 200) -> Action:
    return Action("reply", code, json.dumps(obj).encode())


def text_reply(text: str, code: int = 200) -> Action:
    return Action("reply", code, text.encode(), content_type="text/plain; charset=utf-8")


def drop() -> Action:
    return Action("drop")


def hang() -> Action:
    return Action("hang")


class FaultServer:
    def __init__(self, script: list[Action] | Callable[[int, Seen], Action], then: Action | None = None):
        self.script = script
        self.then = then or ok()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def auths(self) -> list[str]:
        return [s.auth for s in self.seen]

    def _action(self, seen: Seen) -> Action:
        with self._lock:
            k = len(self.seen)
            self.seen.append(seen)
        if callable(self.script):
            return self.script(k, seen)
        return self.script[k] if k < len(self.script) else self.then

    def __enter__(self) -> "FaultServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(data) if data else None
                except ValueError:
                    body = data.decode("utf-8", "replace")
                auth = self.headers.get("Authorization") or ""
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, auth)
                act = outer._action(seen)
                if act.kind == "hang":
                    outer._closing.wait()
                if act.kind in ("drop", "hang"):
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                payload = act.body.replace(b"{auth}", json.dumps(auth)[1:-1].encode())
                self.send_response(act.status)
                self.send_header("Content-Type", act.content_type)
                self.send_header("Content-Length", str(len(payload)))
                for h, v in act.headers.items():
                    self.send_header(h, v.replace("{auth}", auth))
                self.end_headers()
                self.wfile.write(payload)

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True

            do_GET = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
