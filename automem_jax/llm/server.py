"""OpenAI-compatible HTTP server over the local Engine (FastAPI on uvicorn).

    python -m automem_jax.llm.server --checkpoint preset:tiny --port 8000
    python -m automem_jax.llm.server --checkpoint gs://bucket/export/hf --port 8000 --api_key_env KEY --enable_lora

Routes:
  ``POST /v1/chat/completions``   n=1; ``stream: true`` answers with server-sent events in OpenAI's
                                  format (``chat.completion.chunk`` objects, then ``data: [DONE]``)
  ``GET  /v1/models``             the base model and every loaded LoRA adapter
  ``GET  /health``                200 while serving (no auth, as vLLM's)
  ``POST /v1/load_lora_adapter``  ``{"lora_name", "lora_path"}``; vLLM's runtime adapter protocol
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``

Request bodies are pydantic models (``ChatCompletionRequest``, the LoRA ones; vLLM's field names,
unknown fields ignored), validated on the event loop and handed to ``engine.submit``. The engine runs in
background mode (``start_background()`` when serving starts, ``stop_background()`` at close): its
scheduler admits each request between decode steps, so concurrent requests join the batch already
running. A request the engine refuses (too long, bad sampling values) gets its own 400 and never
affects the others; a request whose client disconnects or that times out is cancelled, which takes
it out of the engine. Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.

LoRA adapters (``--enable_lora`` or ``serve(adapter_loader=...)``): an adapter is a PEFT folder as
``hf.save_peft_adapter`` writes it. Loading one reloads the base weights, folds the adapter into them
(``lora.merge_lora``) and serves the result from a second ``Engine`` (same batch, length, tokenizer
and sampling defaults) beside the base one, under the adapter's name. That costs one more copy of
the weights and of the KV cache per adapter, whereas vLLM applies adapters inside one batch over
one copy of the base weights; hence the small cap (``--max_loras``, default 2).
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from automem_jax.agent.types import ROLE_POLICY, ChatRequest

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
LOAD_LORA_PATH = "/v1/load_lora_adapter"
UNLOAD_LORA_PATH = "/v1/unload_lora_adapter"
_ROUTES = {CHAT_PATH: "POST", MODELS_PATH: "GET", HEALTH_PATH: "GET", LOAD_LORA_PATH: "POST",
           UNLOAD_LORA_PATH: "POST"}
_DRAIN_S = 2.0  # how long an oversized or refused body is read and dropped before the connection closes


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------------------------
# Request bodies: pydantic models with vLLM's field names; their errors become OpenAI's 400s

Role = Literal["system", "user", "assistant"]
_ROLES = get_args(Role)
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
_OWN_CODES = ("unsupported", "invalid_value")  # error types our validators raise, with their own message


class _Body(BaseModel):
    # Unknown fields are ignored, as vLLM does; JSON values are not coerced ("8" is no integer,
    # true is no number).
    model_config = ConfigDict(extra="ignore", strict=True)


class ChatMessage(_Body):
    role: Role
    content: str  # content-part arrays and null content are not supported


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's per-chunk usage

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous_usage(cls, v):
        if v:
            raise PydanticCustomError("unsupported", "'stream_options.continuous_usage_stats' is not supported "
                                                     "by this server")
        return v


class ChatCompletionRequest(_Body):
    """The ``/v1/chat/completions`` body. Fields are validated in this order (the first error is
    answered). top_k, repetition_penalty and include_stop_str_in_output are vLLM's extensions."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    # Refused when set (see _UNSUPPORTED); any JSON value, so that setting one is never a type error.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    response_format: Any = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 30)  # -1 or 0 = off
    repetition_penalty: float | None = Field(None, gt=0, le=1_000_000)
    max_tokens: int | None = Field(None, ge=1, le=1 << 30)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 30)  # OpenAI's newer name; max_tokens wins
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v, info):
        if v is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "'stream_options' is only allowed when 'stream' is true")
        return v

    @field_validator("n")
    @classmethod
    def _only_one(cls, v):
        if v not in (None, 1):
            raise PydanticCustomError("unsupported", f"only n=1 is supported, got n={v}")
        return v

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if _UNSUPPORTED[info.field_name](v):
            raise PydanticCustomError("unsupported", f"'{info.field_name}' is not supported by this server")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):  # one message for every malformed stop (pydantic's would name union branches)
        s = [v] if isinstance(v, str) else v
        if v is not None and not (isinstance(s, list) and len(s) <= 16 and all(isinstance(x, str) and x for x in s)):
            raise PydanticCustomError("invalid_value", "'stop' must be a non-empty string or a list of at most 16 "
                                                       "non-empty strings")
        return v


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


_TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
               "string_type": "a string", "dict_type": "an object", "model_type": "an object", "list_type": "a list"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _param(loc) -> str | None:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None


def _show(v) -> str:
    s = json.dumps(v, default=repr)
    return s if len(s) <= 60 else s[:57] + "..."


def _api_error(err: dict, model_cls) -> ApiError:
    """OpenAI's 400 for one pydantic error: `param` is its location (``messages[0].role``), `code`
    one of invalid_type / out_of_range / missing / ours; messages name the value or the range."""
    loc, kind, v = err["loc"], err["type"], err.get("input")
    param = _param(loc)
    if kind in _OWN_CODES:
        return _bad(err["msg"], param, kind)
    if loc[0] == "messages":
        where = _param(loc[:2])
        if len(loc) == 1:
            return _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                        "missing_messages" if kind == "missing" or v is None else "invalid_messages")
        if len(loc) == 2:
            return _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        v = None if kind == "missing" else v
        if loc[2] == "role":
            return _bad(f"{where}.role must be one of {', '.join(_ROLES)}; got {_show(v)}", param, "invalid_role")
        return _bad(f"{where}.content must be a string (content-part arrays and null content are not supported); "
                    f"got {'null' if v is None else type(v).__name__}", param, "invalid_content")
    if kind == "missing":
        return _bad(f"'{param}' is required", param, "missing")
    if kind in _TYPE_NAMES:
        return _bad(f"'{param}' must be {_TYPE_NAMES[kind]}, got {_show(v)}", param, "invalid_type")
    field = model_cls.model_fields.get(loc[0]) if len(loc) == 1 else None
    if kind in _RANGE_ERRORS and field is not None:  # both bounds, from the field's constraints
        rng = " and ".join(f"{op} {b:g}" if isinstance(b, float) else f"{op} {b}" for m in field.metadata
                           for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                           if (b := getattr(m, k, None)) is not None)
        return _bad(f"'{param}' must be {rng}, got {v}", param, "out_of_range")
    return _bad(f"'{param}': {err['msg']}" if param else err["msg"], param, "invalid_value")


def _validate(model_cls, body: Any):
    """A pydantic model from a JSON body; its first error becomes one OpenAI 400 naming the field."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False)[0], model_cls) from None


def stream_settings(body: dict | ChatCompletionRequest) -> tuple[bool, bool]:
    """(stream, include_usage) of a chat body; raises ApiError for a malformed body."""
    r = body if isinstance(body, ChatCompletionRequest) else _validate(ChatCompletionRequest, body)
    return bool(r.stream), bool(r.stream and r.stream_options and r.stream_options.include_usage)


def chat_request(r: ChatCompletionRequest, served_names: tuple[str, ...], max_len: int):
    """(ChatRequest, SamplingParams) of a validated body; ApiError 404 for a model not served."""
    from automem_jax.llm.engine import SamplingParams
    if r.model and r.model not in served_names:
        raise ApiError(404, f"The model '{r.model}' does not exist; this server serves: {', '.join(served_names)}",
                       "model", "model_not_found")
    max_tokens = r.max_tokens if r.max_tokens is not None else r.max_completion_tokens
    stop = ([r.stop] if isinstance(r.stop, str) else r.stop) or None
    # top_p / top_k / repetition_penalty left out stay unset: the engine applies the checkpoint's
    # generation_config.json defaults (as vLLM does).
    given = {"top_p": r.top_p, "top_k": None if r.top_k is None else max(r.top_k, 0),
             "repetition_penalty": r.repetition_penalty}
    params = SamplingParams(
        temperature=1.0 if r.temperature is None else r.temperature,
        # Longer than the cache allows is not an error: the engine stops at its limit ("length").
        max_tokens=max_len if max_tokens is None else max_tokens,
        stop=stop, seed=r.seed, include_stop_str_in_output=r.include_stop_str_in_output,
        **{k: v for k, v in given.items() if v is not None})
    req = ChatRequest(messages=[m.model_dump() for m in r.messages], phase="chat", model_role=ROLE_POLICY,
                      stop=stop, max_tokens=params.max_tokens)
    return req, params


def parse_chat_body(body: Any, served_names: tuple[str, ...], max_len: int):
    """Validates a chat-completions body (``ChatCompletionRequest``); returns (ChatRequest,
    SamplingParams) or raises ApiError. Streaming fields are read with `stream_settings`."""
    return chat_request(_validate(ChatCompletionRequest, body), served_names, max_len)


# ---------------------------------------------------------------------------------------------
# The engine fronts

class _Shutdown(Exception):
    pass


class _EngineFront:
    """Hands requests to one engine's scheduler (background mode) and counts what is in flight."""

    def __init__(self, engine, name: str, *, root: str | None = None, parent: str | None = None):
        self.engine = engine
        self.name, self.root, self.parent = name, root or name, parent
        self.created = int(time.time())
        self.requests_done = 0
        self.in_flight = 0
        self.largest_batch = 0  # most requests in the engine at once
        self._cond = threading.Condition()
        self._closing = False
        # A server started on an engine already in background mode leaves it running at close.
        self._owns_background = not engine.background
        engine.start_background()

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, request: ChatRequest, params, on_token=None) -> Future:
        with self._cond:  # nothing is submitted after close began
            if self._closing:
                raise _Shutdown("the server is shutting down")
            fut = self.engine.submit(request, params, on_token=on_token) if on_token else \
                self.engine.submit(request, params)
            self.in_flight += 1
            self.largest_batch = max(self.largest_batch, self.in_flight)
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, _fut: Future) -> None:
        with self._cond:
            self.in_flight -= 1
            self.requests_done += 1
            self._cond.notify_all()

    def refuse(self) -> None:
        with self._cond:
            self._closing = True

    def close(self, timeout: float) -> None:
        """Refuses new requests, lets those in flight finish (within `timeout`), then stops the
        engine's thread if this front started it (the engine fails whatever is left)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            while self.in_flight and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        if self._owns_background:
            self.engine.stop_background(max(0.0, deadline - time.monotonic()) + 1.0)


# ---------------------------------------------------------------------------------------------
# LoRA adapters as merged engines

def base_model_factory(checkpoint: str, *, seed: int = 0, dtype: str | None = None, mesh=None) -> Callable:
    """A function returning a fresh copy of the base weights, loaded as ``client.load_engine`` loads
    them (``preset:<name>`` is initialised again with the same seed, so it is the same model)."""
    if checkpoint.startswith("preset:"):
        from automem_jax.models.qwen import init_model, preset
        cfg = preset(checkpoint[len("preset:"):])
        return lambda: init_model(cfg, seed=seed, mesh=mesh)

    def load():
        from automem_jax.models import hf
        return hf.load_pretrained(checkpoint, dtype=dtype, mesh=mesh)[0]
    return load


def lora_engine_loader(base_engine, base_model: Callable) -> Callable[[str, str], Any]:
    """``adapter_loader`` for ``serve``: (lora_name, lora_path) -> a new Engine serving
    ``base_model()`` with the PEFT adapter at lora_path merged in, configured like `base_engine`.
    Raises FileNotFoundError / ValueError for a missing or mismatched adapter folder."""
    def load(name: str, path: str):
        from automem_jax import storage
        from automem_jax.llm.engine import Engine
        from automem_jax.models import hf, lora
        for f in (hf.ADAPTER_CONFIG, hf.ADAPTER_FILE):  # fail before reloading the base weights
            if not storage.exists(storage.join(path, f)):
                raise FileNotFoundError(f"{path}: no {f}; expected a PEFT LoRA adapter folder "
                                        f"(hf.save_peft_adapter writes one)")
        model = base_model()
        model, _ = hf.load_peft_adapter(model, path, mesh=base_engine.mesh)
        model = lora.merge_lora(model, inplace=True)
        e = base_engine
        return Engine(model, e.tokenizer, max_batch=e.max_batch, max_len=e.max_len, mesh=e.mesh, rules=e.rules,
                      seed=e.seed, page_size=e.page_size, cache_tokens=e.pool_tokens,
                      prefill_chunk=e.prefill_chunk, prefix_cache=e.prefix_cache, model_name=name,
                      chat_template_kwargs=e.chat_template_kwargs, sampling_defaults=e.sampling_defaults)
    return load


# ---------------------------------------------------------------------------------------------
# The application state (thread-safe: adapters load on worker threads)

class _App:
    def __init__(self, base: _EngineFront, api_key: str | None, max_body_bytes: int, request_timeout_s: float,
                 adapter_loader: Callable | None, max_loras: int):
        self.base = base
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_len = int(getattr(base.engine, "max_len", 1 << 30))
        self.adapter_loader = adapter_loader
        self.max_loras = max_loras
        self.adapters: dict[str, _EngineFront] = {}
        self._pending: set[str] = set()  # adapters loading or draining: they hold a slot
        self._retired: dict[str, int] = {}  # requests served by adapters since unloaded
        self._lock = threading.Lock()
        self.closing = False

    # -- auth and models --
    def check_auth(self, header: str | None) -> None:
        if self._key is None:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), self._key):
            raise ApiError(401, "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def fronts(self) -> list[_EngineFront]:
        with self._lock:
            return [self.base, *self.adapters.values()]

    def served_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fronts())

    def front_for(self, name: str | None) -> _EngineFront:
        if not name or name == self.base.name:
            return self.base
        with self._lock:
            f = self.adapters.get(name)
        if f is None:
            raise ApiError(404, f"The model '{name}' does not exist (it was unloaded); this server serves: "
                                f"{', '.join(self.served_names())}", "model", "model_not_found")
        return f

    def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": f.name, "object": "model", "created": f.created, "owned_by": "automem_jax", "root": f.root,
             "parent": f.parent, "max_model_len": int(getattr(f.engine, "max_len", self.max_len))}
            for f in self.fronts()]}

    def stats(self) -> dict:
        fronts = self.fronts()
        with self._lock:
            by_model = dict(self._retired)
        for f in fronts:
            by_model[f.name] = by_model.get(f.name, 0) + f.requests_done
        out = {"requests_served": sum(by_model.values()), "in_flight": sum(f.in_flight for f in fronts),
               "largest_batch": max(f.largest_batch for f in fronts)}
        es = getattr(self.base.engine, "stats", None)
        for name in ("steps", "decode_steps", "prefill_calls"):
            if hasattr(es, name):
                out[name] = getattr(es, name)
        out["requests_by_model"] = by_model
        return out

    # -- adapters (blocking: called on worker threads) --
    def load_adapter(self, name: str, path: str) -> None:
        if self.adapter_loader is None:
            raise _bad("LoRA is not enabled on this server; start it with --enable_lora "
                       "(or serve(..., adapter_loader=...))", "lora_name", "lora_not_enabled")
        with self._lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if name == self.base.name or name in self.adapters:
                raise _bad(f"The lora adapter '{name}' has already been loaded.", "lora_name", "already_loaded")
            if name in self._pending:
                raise _bad(f"The lora adapter '{name}' is being loaded or unloaded; try again when that is done",
                           "lora_name", "busy")
            if len(self.adapters) + len(self._pending) >= self.max_loras:
                raise _bad(f"cannot load '{name}': {len(self.adapters) + len(self._pending)} LoRA adapter(s) "
                           f"are loaded or loading and max_loras is {self.max_loras}; unload one first",
                           "lora_name", "max_loras")
            self._pending.add(name)
        try:
            try:
                engine = self.adapter_loader(name, path)
            except Exception as e:  # noqa: BLE001 - a bad folder is the client's error
                if not isinstance(e, (OSError, ValueError)):
                    log.warning("loading LoRA adapter %r from %r failed", name, path, exc_info=True)
                raise _bad(f"cannot load LoRA adapter '{name}' from '{path}': {type(e).__name__}: {e}",
                           "lora_path", "invalid_adapter") from None
            front = _EngineFront(engine, name, root=path, parent=self.base.name)
            with self._lock:
                if not self.closing:
                    self.adapters[name] = front
                    return
            front.close(1.0)
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        finally:
            with self._lock:
                self._pending.discard(name)

    def unload_adapter(self, name: str) -> None:
        """Stops serving `name` at once, then lets its requests in flight finish and stops its engine."""
        with self._lock:
            front = self.adapters.pop(name, None)
            if front is None:
                busy = name in self._pending
            else:
                self._pending.add(name)
        if front is None:
            if busy:
                raise _bad(f"The lora adapter '{name}' is being loaded or unloaded; try again when that is done",
                           "lora_name", "busy")
            raise _bad(f"The lora adapter '{name}' cannot be found.", "lora_name", "not_found")
        try:
            front.close(self.request_timeout_s)
        finally:
            with self._lock:
                self._retired[name] = self._retired.get(name, 0) + front.requests_done
                self._pending.discard(name)

    def begin_close(self) -> None:
        """New requests, adapter loads and health checks are refused from now on."""
        with self._lock:
            self.closing = True
            fronts = [self.base, *self.adapters.values()]
        for f in fronts:
            f.refuse()

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.begin_close()
        for f in self.fronts():
            f.close(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------------
# HTTP: the gate (routing, auth, body size) and the FastAPI routes

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


class _Gate:
    """Pure ASGI in front of FastAPI: unknown path 404, wrong method 405 (with Allow), auth 401
    (every /v1 route; /health is open, as vLLM's), declared body too large 413. Runs before any
    body is read, in the same order as the answers of the stdlib server this replaced."""

    def __init__(self, app, state: _App):
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


async def _read_json(request, limit: int) -> Any:
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


class _TokenFeed:
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


def _outcome_error(out, front: _EngineFront) -> ApiError | None:
    """The ApiError for a GenOutput that failed, else None."""
    if not (out.finish_reason == "error" or getattr(out, "error", None)):
        return None
    if front.closing:  # failed by the engine's shutdown, not for its input
        return ApiError(503, f"the server is shutting down ({out.error})", code="shutting_down")
    if str(out.error or "").startswith("engine"):  # a failed engine step, not a bad input
        return ApiError(500, f"generation failed: {out.error}")
    # Otherwise the engine refused the request for its input (too long, bad chat, bad params).
    return _bad(f"the engine rejected this request: {out.error}", "messages", "invalid_request")


def _build_fastapi(state: _App):
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
        body = _validate(LoadLoRAAdapterRequest, await _read_json(request, state.max_body_bytes))
        if body.load_inplace:
            raise _bad("load_inplace=true is not supported; unload the adapter first", "load_inplace", "unsupported")
        # Off the event loop: reloading weights takes a while and the other models keep serving.
        await asyncio.to_thread(state.load_adapter, body.lora_name, body.lora_path)
        log.info("loaded LoRA adapter %r from %s", body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post(UNLOAD_LORA_PATH)
    @api
    async def unload_lora_adapter(request: Request):
        body = _validate(UnloadLoRAAdapterRequest, await _read_json(request, state.max_body_bytes))
        await asyncio.to_thread(state.unload_adapter, body.lora_name)
        log.info("unloaded LoRA adapter %r", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post(CHAT_PATH)
    @api
    async def chat_completions(request: Request):
        body = await _read_json(request, state.max_body_bytes)
        chat = _validate(ChatCompletionRequest, body)
        req, params = chat_request(chat, state.served_names(), state.max_len)
        stream, include_usage = stream_settings(chat)
        front = state.front_for(chat.model)
        loop = asyncio.get_running_loop()
        feed = _TokenFeed(loop) if stream else None
        fut = await _submit(front, req, params, feed)
        deadline = time.monotonic() + state.request_timeout_s
        if feed is not None:
            _notify_on_done(fut, loop, feed.wake.set)
            # Wait for the first token before the 200: a request the engine refuses still gets its
            # own status code.
            await _wait_for(fut, feed.wake.wait(), request, deadline, state)
            if fut.done():
                err = _outcome_error(fut.result(), front)
                if err is not None:
                    raise err
            return _SSEResponse(_stream(fut, feed, front, params, include_usage, deadline, state),
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                on_close=lambda: fut.done() or fut.cancel())
        done = loop.create_future()
        _notify_on_done(fut, loop, lambda: done.done() or done.set_result(None))
        await _wait_for(fut, done, request, deadline, state)
        out = fut.result()
        err = _outcome_error(out, front)
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


async def _submit(front: _EngineFront, req, params, feed: _TokenFeed | None) -> Future:
    """front.submit on a worker thread (it renders the chat template and tokenizes)."""
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, lambda: front.submit(req, params, feed.on_token if feed else None))
    try:
        return await asyncio.shield(job)
    except _Shutdown as e:
        if front.parent is not None:  # an adapter unloaded since the model name was checked
            raise ApiError(404, f"The model '{front.name}' does not exist (it was unloaded)", "model",
                           "model_not_found") from None
        raise ApiError(503, str(e), code="shutting_down") from None
    except asyncio.CancelledError:  # the client left while the prompt was being tokenized
        job.add_done_callback(lambda j: j.cancelled() or j.exception() or j.result().cancel())
        raise


async def _wait_for(fut: Future, waiter, request, deadline: float, state: _App) -> None:
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


async def _stream(fut: Future, feed: _TokenFeed, front: _EngineFront, params, include_usage: bool,
                  deadline: float, state: _App):
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
        err = _outcome_error(out, front)
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


# ---------------------------------------------------------------------------------------------
# Serving

class ServerHandle:
    """A running server: ``url`` (``http://host:port``), ``base_url`` (``url + "/v1"``, for
    OpenAI clients), ``model_name``, ``engine`` (the base one), ``stats`` (requests served, also
    per model, and in flight, the most in one engine at once, and the base engine's step counts),
    ``load_adapter`` / ``unload_adapter`` (as the HTTP routes), ``close()``."""

    def __init__(self, server, thread: threading.Thread, state: _App, sock: socket.socket):
        self._server, self._thread, self._state = server, thread, state
        self.host, self.port = sock.getsockname()[:2]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        self.base_url = self.url + "/v1"
        self.model_name = state.base.name
        self.engine = state.base.engine
        self._closed = False

    @property
    def stats(self) -> dict:
        return self._state.stats()

    def load_adapter(self, name: str, path: str) -> None:
        """Loads a PEFT LoRA folder as model `name` (blocking; ApiError on refusal)."""
        self._state.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self._state.unload_adapter(name)

    def close(self, timeout: float = 30.0) -> None:
        """Stops accepting connections; requests already in the engines are answered (within
        `timeout`), later ones get 503; then stops the engines' threads this server started."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._state.begin_close()
        # uvicorn stops listening, closes idle connections and waits for responses in progress.
        self._server.config.timeout_graceful_shutdown = max(0.1, timeout)
        self._server.should_exit = True
        self._thread.join(timeout + 5.0)
        self._state.close(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket; bound here so port 0 is resolved and a busy port raises OSError at once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # IPv4 first where a name has both (as the stdlib server did: "localhost" is 127.0.0.1).
    family, type_, proto, _, addr = min(infos, key=lambda i: i[0] != socket.AF_INET)
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(engine, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
          api_key_env: str | None = None, served_model_name: str | None = None,
          max_body_bytes: int = 32 << 20, request_timeout_s: float = 600.0,
          adapter_loader: Callable[[str, str], Any] | None = None, max_loras: int = 2) -> ServerHandle:
    """Starts the server on a background thread (port 0 picks a free port) and returns its handle.
    The engine runs in background mode while it serves (it must not be stepped by anyone else).

    Auth: `api_key`, or the value of the environment variable `api_key_env`; neither = no auth.
    LoRA: `adapter_loader(lora_name, lora_path) -> Engine` (e.g. ``lora_engine_loader``) enables
    the adapter routes; at most `max_loras` adapters are loaded at once.
    """
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set or empty")
    for attr in ("submit", "start_background", "stop_background"):
        if not callable(getattr(engine, attr, None)):
            raise TypeError(f"serve: the engine has no {attr}(); expected automem_jax.llm.engine.Engine")
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise ValueError(f"max_loras must be an integer >= 1, got {max_loras!r}")
    import uvicorn
    name = served_model_name or getattr(engine, "model_name", "") or "automem-policy"
    sock = _listen(host, port)
    front = _EngineFront(engine, name)
    try:
        state = _App(front, api_key, max_body_bytes, request_timeout_s, adapter_loader, max_loras)
        config = uvicorn.Config(
            _Gate(_build_fastapi(state), state), http="h11", ws="none", lifespan="off",
            log_config=None, access_log=False, proxy_headers=False, server_header=False,
            headers=[("server", "automem-jax")],
            timeout_keep_alive=120)  # the openai client keeps connections for reuse
        server = uvicorn.Server(config)
        # Signal handlers stay the caller's: uvicorn installs none off the main thread.
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)
    except BaseException:
        front.close(5.0)
        sock.close()
        raise
    return ServerHandle(server, thread, state, sock)


# ---------------------------------------------------------------------------------------------
# CLI

def _lora_modules(items: list[str] | None) -> dict[str, str]:
    """vLLM's --lora-modules: name=path items, or JSON objects {"name": ..., "path": ...}."""
    out = {}
    for item in items or []:
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora_modules {item!r}: expected name=path or {{\"name\": ..., \"path\": ...}}") \
                    from None
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora_modules {item!r}: expected name=path")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.llm.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="a local or gs:// Hugging Face folder or .gguf file, pkg:<name> (a packaged real model, e.g. pkg:qwen2.5-coder-0.5b-instruct), or preset:<name> (random weights, e.g. preset:tiny)")
    ap.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ap.add_argument("--api_key_env", "--api-key-env", dest="api_key_env", default=None,
                    help="environment variable holding the bearer token clients must send (default: no auth)")
    ap.add_argument("--served_model_name", "--served-model-name", dest="served_model_name", default=None,
                    help="model id clients use (default: the engine's)")
    ap.add_argument("--max_batch", "--max-num-seqs", dest="max_batch", type=int, default=16,
                    help="KV-cache rows: sequences decoded at once")
    ap.add_argument("--max_len", "--max-model-len", dest="max_len", type=int, default=2048,
                    help="tokens per sequence, prompt + completion")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    ap.add_argument("--dtype", default=None, help="compute/storage dtype for HF checkpoints, e.g. bfloat16")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weights seed)")
    ap.add_argument("--max_body_bytes", type=int, default=32 << 20, help="largest accepted request body")
    ap.add_argument("--request_timeout_s", type=float, default=600.0, help="longest a request may take")
    ap.add_argument("--enable_lora", "--enable-lora", dest="enable_lora", action="store_true",
                    help="accept LoRA adapters (POST /v1/load_lora_adapter); each costs a copy of the weights")
    ap.add_argument("--max_loras", "--max-loras", dest="max_loras", type=int, default=2,
                    help="most LoRA adapters loaded at once")
    ap.add_argument("--lora_modules", "--lora-modules", dest="lora_modules", nargs="+", default=None,
                    metavar="NAME=PATH", help="adapters to load at start-up (implies --enable_lora)")
    ap.add_argument("--max_lora_rank", "--max-lora-rank", dest="max_lora_rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # vLLM's; accepted and ignored: merged adapters have no rank limit
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        print(f"error: --api_key_env {args.api_key_env}: that environment variable is not set or empty",
              file=sys.stderr)
        return 2
    try:
        modules = _lora_modules(args.lora_modules)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_loras < 1 or len(modules) > args.max_loras:
        print(f"error: --max_loras {args.max_loras}: must be >= 1 and hold the {len(modules)} --lora_modules",
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
    loader = None
    if args.enable_lora or modules:
        loader = lora_engine_loader(engine, base_model_factory(args.checkpoint, seed=args.seed, dtype=args.dtype,
                                                               mesh=engine.mesh))
    try:
        handle = serve(engine, args.host, args.port, api_key_env=args.api_key_env,
                       served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                       request_timeout_s=args.request_timeout_s, adapter_loader=loader, max_loras=args.max_loras)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    try:
        for name, path in modules.items():
            handle.load_adapter(name, path)
            log.info("loaded LoRA adapter %r from %s", name, path)
    except ApiError as e:
        print(f"error: --lora_modules: {e.message}", file=sys.stderr)
        handle.close()
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
