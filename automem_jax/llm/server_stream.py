"""Streaming a chat reply as server-sent events in OpenAI's format: ``TokenFeed`` carries the engine's
per-token hook onto the event loop, ``stream_reply`` turns the settled text into
``chat.completion.chunk`` events and ends with ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future

from automem_jax.llm.server_engines import EngineFront, ServerState, outcome_error
from automem_jax.llm.server_schema import ApiError

log = logging.getLogger(__name__)


class TokenFeed:
    """The engine's per-token hook for one streamed request. The scheduler thread only stores the
    latest ids and schedules one wake-up at a time; decoding happens on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.wake = asyncio.Event()
        self._ids: list[int] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def on_token(self, ids: list[int]) -> None:  # scheduler thread
        with self._lock:
            self._ids = ids
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:
            pass

    def _set(self) -> None:
        with self._lock:
            self._scheduled = False
        self.wake.set()

    def ids(self) -> list[int]:
        with self._lock:
            return self._ids


def _settled(text: str, hold: int) -> str:
    """The part of a partial reply that later tokens cannot change: without a trailing U+FFFD (an
    incomplete UTF-8 character) and without the last `hold` characters (a stop string may start there)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return text[:max(0, end - hold)]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_reply(fut: Future, feed: TokenFeed, front: EngineFront, params, include_usage: bool,
                  deadline: float, state: ServerState):
    """SSE events of one streamed reply. Only settled text is sent, so the deltas joined equal the
    non-streamed reply (GenOutput.text, cut at the first stop string). Starlette cancels this
    generator when the client disconnects; the engine request is then cancelled too."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = front.engine.tokenizer
    hold = max((len(s) for s in params.stop), default=1) - 1 if params.stop else 0

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": front.name,
               "choices": [] if delta is None else
               [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = usage
        return _sse(obj)

    sent, seen = "", None
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            feed.wake.clear()  # cleared before looking, so a token arriving meanwhile wakes us again
            if fut.done():
                break
            ids = feed.ids()
            if ids is not seen and ids:
                seen = ids
                text = _settled(tokenizer.decode(ids, skip_special_tokens=True), hold)
                if len(text) > len(sent) and text.startswith(sent):
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    await feed.wake.wait()
            except TimeoutError:
                pass
        if not fut.done():
            fut.cancel()
            err = ApiError(503, f"the reply did not finish within {state.request_timeout_s:g}s; "
                                f"the server is overloaded", code="timeout")
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            return
        out = fut.result()
        err = outcome_error(out, front)
        if err is not None:
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            return
        if not out.text.startswith(sent):  # cannot happen with a prefix-stable detokenizer
            log.warning("streamed text %r is not a prefix of the final reply %r", sent, out.text)
        elif len(out.text) > len(sent):
            yield chunk({"content": out.text[len(sent):]})
        yield chunk({}, out.finish_reason)
        if include_usage:
            yield chunk(None, usage={"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                     "total_tokens": out.prompt_tokens + out.completion_tokens})
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - a server bug ends this stream with an error event
        log.exception("streaming a reply failed")
        yield _sse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
        yield "data: [DONE]\n\n"
    finally:
        if not fut.done():  # the client went away (or the server is closing): free the engine row
            fut.cancel()
