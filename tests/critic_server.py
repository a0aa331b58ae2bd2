"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests of critics and loops.

    with ScriptedCriticServer(["final answer"]) as srv:
        client = CriticClient(srv.base_url, "scripted")
        ...
        srv.requests      # every /v1/chat/completions body, parsed, in order
        srv.auth_headers  # the Authorization header of each of those requests ("" when absent)

Each scripted reply is one of:
  * a string: the assistant's text content;
  * a list of tool calls, each ``{"name": ..., "arguments": dict | str}`` (optional "id");
  * a dict ``{"content": str, "tool_calls": [...], "finish_reason": str}``;
  * a callable ``fn(body) -> any of the above`` for replies that depend on the request.
Replies are served in order; once they run out the server answers 500 "no scripted replies left",
so a test that sends more than it scripted fails loudly.

Failure injection: ``fail_first=N`` answers the first N chat requests with ``fail_status`` (500)
before any reply is used (a client should retry); ``reject_tools=True`` answers 400 "tools are not
supported" to any request carrying tools, as vLLM does without a tool parser (no reply is used);
``fail_message`` may contain ``{auth}``, replaced by the request's Authorization header, to check
that clients redact keys echoed back by a server.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedCriticServer:
    def __init__(self, replies: list, *, model: str = "scripted-critic", fail_first: int = 0, fail_status: int = 500,
                 fail_message: str = "scripted failure", reject_tools: bool = False):
        self.replies = list(replies)
        self.model = model
        self.fail_first, self.fail_status, self.fail_message = fail_first, fail_status, fail_message
        self.reject_tools = reject_tools
        self.requests: list[dict] = []  # chat bodies, including refused ones
        self.auth_headers: list[str] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        self._next = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def served(self) -> int:
        """How many scripted replies were used."""
        return self._next

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "ScriptedCriticServer":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError as e:
                    self._send(400, {"error": {"message": f"invalid JSON: {e}"}})
                    return
                status, obj = outer._answer(body, self.headers.get("Authorization") or "")
                self._send(status, obj)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="scripted-critic", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ replies

    def _answer(self, body: dict, auth: str) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            self.auth_headers.append(auth)
            if self.fail_first > 0:
                self.fail_first -= 1
                return self._status(self.fail_status, {"error": {
                    "message": self.fail_message.replace("{auth}", auth), "type": "server_error"}})
            if self.reject_tools and body.get("tools"):
                return self._status(400, {"error": {
                    "message": "tools are not supported: \"auto\" tool choice requires --enable-auto-tool-choice",
                    "type": "invalid_request_error", "param": "tools"}})
            if self._next >= len(self.replies):
                return self._status(500, {"error": {"message": f"no scripted replies left "
                                                               f"({len(self.replies)} were scripted)"}})
            reply = self.replies[self._next]
            self._next += 1
        if callable(reply):
            reply = reply(body)
        return self._status(200, self._completion(body, reply))

    def _status(self, status: int, obj: dict) -> tuple[int, dict]:
        self.statuses.append(status)
        return status, obj

    def _completion(self, body: dict, reply) -> dict:
        if isinstance(reply, str):
            reply = {"content": reply}
        elif isinstance(reply, list):
            reply = {"content": None, "tool_calls": reply}
        calls = []
        for i, c in enumerate(reply.get("tool_calls") or []):
            args = c.get("arguments", {})
            calls.append({"id": c.get("id", f"call_{len(self.requests)}_{i}"), "type": "function",
                          "function": {"name": c["name"],
                                       "arguments": args if isinstance(args, str) else json.dumps(args)}})
        message = {"role": "assistant", "content": reply.get("content")}
        if calls:
            message["tool_calls"] = calls
        prompt_chars = len(json.dumps(body.get("messages", [])))
        out_chars = len(reply.get("content") or "") + len(json.dumps(calls))
        return {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": self.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": reply.get("finish_reason") or ("tool_calls" if calls else "stop")}],
            "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": max(1, out_chars // 4),
                      "total_tokens": prompt_chars // 4 + max(1, out_chars // 4)},
        }
