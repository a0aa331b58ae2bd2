"""The OpenAI-compatible server's HTTP side: ``Gate`` (pure ASGI: unknown path, method, auth and body
size, answered before any body is read), reading a JSON body, and the FastAPI routes (``build_app``)
that validate a request, hand it to an engine front and wait for its reply (deadline, disconnect)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from automem_jax.llm.server_engines import EngineFront, ServerState, Shutdown, outcome_error
from automem_jax.llm.server_schema import (ApiError, ChatCompletionRequest, LoadLoRAAdapterRequest,
                                           UnloadLoRAAdapterRequest, bad_request, chat_request, stream_settings,
                                           validate_body)
from automem_jax.llm.server_stream import TokenFeed, stream_reply

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
_ROUTES = {CHAT_PATH: "POST", MODELS_PATH: "GET", HEALTH_PATH: "GET", LOAD_LORA_PATH: "POST",
           UNLOAD_LORA_PATH: "POST"}
_DRAIN_S = 2.0  # how long an oversized or refused body is read and dropped before the connection closes


def _json(status: int, obj, headers: dict | None = None):
    from starlette.responses import JSONResponse
    return JSONResponse(obj, status_code=status, headers=headers)


def _error_response(e: ApiError, path: str = ""):
    headers = dict(e.headers)
    if e.status == 405 and path in _ROUTES:
        headers["Allow"] = _ROUTES[path]
    return _json(e.status, e.body(), headers)


async def _drain(receive, seconds: float) -> bool:
    """Reads and drops the rest of a request body (for at most `seconds`), so that closing the
    connection afterwards does not reset it before the client reads our answer (the kernel sends
    RST for a socket closed with unread input). True if the body ended."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                msg = await receive()
                if msg["type"] != "http.request" or not msg.get("more_body", False):
                    return True
    except TimeoutError:
        return False


class Gate:
    """Pure ASGI in front of FastAPI: unknown path 404, wrong method 405 (with Allow), auth 401
    (every /v1 route; /health is open, as vLLM's), declared body too large 413. Runs before any
    body is read, in the same order as the answers of the stdlib server this replaced."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        path = scope["path"].rstrip("/") or "/"
        if path != scope["path"]:
            scope = dict(scope, path=path, raw_path=path.encode())
        method = scope["method"]
        headers = Headers(scope=scope)
        try:
            want = _ROUTES.get(path)
            if want is None:
                raise ApiError(404, f"unknown path {path!r}; this server has "
                                    f"{', '.join(f'{m} {p}' for p, m in _ROUTES.items())}", code="not_found")
            if method != want:
                raise ApiError(405, f"{method} is not allowed on {path}; use {want}", code="method_not_allowed")
            if path.startswith("/v1/"):
                self.state.check_auth(headers.get("authorization"))
            if method == "POST":
                if headers.get("content-length") is None and headers.get("transfer-encoding") is None:
                    raise ApiError(411, "Content-Length is required", code="length_required")
                n = int(headers.get("content-length") or 0)  # h11 has already rejected a malformed one
                if n > self.state.max_body_bytes:
                    raise ApiError(413, f"request body has {n} bytes; the limit is {self.state.max_body_bytes}",
                                   code="request_too_large", headers={"Connection": "close"})
        except ApiError as e:
            # An unread body the size limit allows is skipped by the HTTP layer and the connection
            # stays usable; a larger (or unsized) one is dropped for a moment, then the connection closes.
            n = headers.get("content-length")
            big = headers.get("transfer-encoding") is not None or (n is not None and int(n) > self.state.max_body_bytes)
            if big or e.status == 413:
                e.headers["Connection"] = "close"
                if headers.get("expect", "").lower() != "100-continue":  # no body is on its way yet
                    await _drain(receive, _DRAIN_S)
            return await _error_response(e, path)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _read_body_json(request, limit: int) -> Any:
    """The request body as JSON; a chunked body past `limit` is a 413."""
    from starlette.requests import ClientDisconnect
    parts, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                await _drain(request.receive, _DRAIN_S)
                raise ApiError(413, f"request body has more than {limit} bytes; the limit is {limit}",
                               code="request_too_large", headers={"Connection": "close"})
            parts.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    data = b"".join(parts)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON in the request body: {e}", code="invalid_json") from None


async def _wait_disconnect(receive) -> None:
    """Returns when the client goes away (or our response completed: either way nobody waits)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _notify_on_done(fut: Future, loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Runs fn on the loop once the engine resolves (or anyone cancels) fut."""
    def cb(_f):
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: nobody waits for this request any more
            pass
    fut.add_done_callback(cb)


def build_app(state: ServerState):
    from fastapi import FastAPI, Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse

    class _SSEResponse(StreamingResponse):
        """Runs `on_close` however the response ends: Starlette cancels the sending task when the
        client disconnects, and the suspended generator's own cleanup would wait for the GC."""

        def __init__(self, content, *, on_close, **kw):
            super().__init__(content, **kw)
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    app = FastAPI(title="automem_jax", docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})

    def api(fn):
        """OpenAI-shaped errors for ApiError; anything else is a logged 500 (never a dead server)."""
        async def wrapper(request):
            try:
                return await fn(request)
            except ApiError as e:
                return _error_response(e, request.url.path)
            except Exception as e:  # noqa: BLE001
                log.exception("unexpected error on %s %s", request.method, request.url.path)
                return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        wrapper.__name__ = fn.__name__
        wrapper.__annotations__ = {"request": Request}  # a class, not this module's string annotation
        return wrapper

    @app.get(HEALTH_PATH)
    @api
    async def health(request: Request):
        if state.closing or not state.base.engine.background:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        return Response(status_code=200)

    @app.get(MODELS_PATH)
    @api
    async def models(request: Request):
        return _json(200, state.models())

    @app.post(LOAD_LORA_PATH)
    @api
    async def load_lora_adapter(request: Request):
        body = validate_body(LoadLoRAAdapterRequest, await _read_body_json(request, state.max_body_bytes))
        if body.load_inplace:
            raise bad_request("load_inplace=true is not supported; unload the adapter first", "load_inplace",
                              "unsupported")
        # Off the event loop: reloading weights takes a while and the other models keep serving.
        await asyncio.to_thread(state.load_adapter, body.lora_name, body.lora_path)
        log.info("loaded LoRA adapter %r from %s", body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post(UNLOAD_LORA_PATH)
    @api
    async def unload_lora_adapter(request: Request):
        body = validate_body(UnloadLoRAAdapterRequest, await _read_body_json(request, state.max_body_bytes))
        await asyncio.to_thread(state.unload_adapter, body.lora_name)
        log.info("unloaded LoRA adapter %r", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post(CHAT_PATH)
    @api
    async def chat_completions(request: Request):
        body = await _read_body_json(request, state.max_body_bytes)
        chat = validate_body(ChatCompletionRequest, body)
        req, params = chat_request(chat, state.served_names(), state.max_len)
        stream, include_usage = stream_settings(chat)
        front = state.front_for(chat.model)
        loop = asyncio.get_running_loop()
        feed = TokenFeed(loop) if stream else None
        fut = await _submit(front, req, params, feed)
        deadline = time.monotonic() + state.request_timeout_s
        if feed is not None:
            _notify_on_done(fut, loop, feed.wake.set)
            # Wait for the first token before the 200: a request the engine refuses still gets its
            # own status code.
            await _wait_for(fut, feed.wake.wait(), request, deadline, state)
            if fut.done():
                err = outcome_error(fut.result(), front)
                if err is not None:
                    raise err
            return _SSEResponse(stream_reply(fut, feed, front, params, include_usage, deadline, state),
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                on_close=lambda: fut.done() or fut.cancel())
        done = loop.create_future()
        _notify_on_done(fut, loop, lambda: done.done() or done.set_result(None))
        await _wait_for(fut, done, request, deadline, state)
        out = fut.result()
        err = outcome_error(out, front)
        if err is not None:
            raise err
        return _json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": front.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": out.finish_reason}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        })

    return app


async def _submit(front: EngineFront, req, params, feed: TokenFeed | None) -> Future:
    """front.submit on a worker thread (it renders the chat template and tokenizes)."""
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, lambda: front.submit(req, params, feed.on_token if feed else None))
    try:
        return await asyncio.shield(job)
    except Shutdown as e:
        if front.parent is not None:  # an adapter unloaded since the model name was checked
            raise ApiError(404, f"The model '{front.name}' does not exist (it was unloaded)", "model",
                           "model_not_found") from None
        raise ApiError(503, str(e), code="shutting_down") from None
    except asyncio.CancelledError:  # the client left while the prompt was being tokenized
        job.add_done_callback(lambda j: j.cancelled() or j.exception() or j.result().cancel())
        raise


async def _wait_for(fut: Future, waiter, request, deadline: float, state: ServerState) -> None:
    """Waits for `waiter` (an awaitable). If the client disconnects or the deadline passes first,
    the request is cancelled (the engine drops it at its next step) and ApiError raised."""
    wait_task = asyncio.ensure_future(waiter)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({wait_task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (wait_task, gone):
            t.cancel()
    if wait_task in done or fut.done():
        return
    fut.cancel()
    if gone in done:
        raise ApiError(499, "the client disconnected", code="client_disconnected")  # nobody reads this
    if state.closing:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    raise ApiError(503, f"no answer from the engine within {state.request_timeout_s:g}s; "
                        f"the server is overloaded", code="timeout")
