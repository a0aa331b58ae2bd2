"""LLM clients: the one interface the rollout runner, the agent loops and the evals call.

Contract: ``generate(requests: list[ChatRequest]) -> list[Completion]`` returns one Completion per
request, in order. A failed call becomes ``Completion(text="", error=...)`` and never raises, so one
bad call cannot end a rollout of hundreds of agents; configuration mistakes (a missing API-key
variable, a bad URL, an unknown spec field) raise at construction instead.

Asynchronous use (the rollout runner's default): ``submit(request) -> Future[Completion]`` hands one
request over at once (a failure becomes an error Completion in the future, never an exception), and
``drive(pending, timeout=None)`` makes progress until at least one of ``pending`` is done or a short
timeout passes. An ``EngineClient`` over an engine that is not in background mode steps the engine
on the calling thread until one of them is done (deterministic: no wall clock is involved, so every
host of a multi-host run steps the same way); other back ends only wait.

Back ends: ``EngineClient`` (the local batched ``Engine``), ``OpenAIClient`` (any OpenAI-compatible
``/v1/chat/completions``: vLLM, hosted APIs, ``automem_jax.llm.server``; on the official ``openai`` SDK
through ``automem_jax.llm.openai_http``) and ``RouterClient`` (the
two-model setup: memory specialist + gameplay/base model). ``make_client(spec)`` builds any of them
from a small config mapping.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Collection, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, ThreadPoolExecutor, wait
from typing import Any, Protocol, runtime_checkable

from automem_jax.agent.types import ROLE_GAMEPLAY, ROLE_MEMORY, ROLE_POLICY, ChatRequest, Completion
from automem_jax.llm.openai_http import CLIENT_ERROR, EndpointError, OpenAIEndpoint, message_text
from automem_jax.llm.openai_http import check_range as _check_range

log = logging.getLogger(__name__)


@runtime_checkable
class Client(Protocol):
    def generate(self, requests: list[ChatRequest]) -> list[Completion]: ...


@runtime_checkable
class AsyncClient(Client, Protocol):
    """A Client that also takes requests one at a time (see the module docstring)."""

    def submit(self, request: ChatRequest) -> "Future[Completion]": ...

    def drive(self, pending: Collection[Future], timeout: float | None = None) -> None: ...


# How long `drive` waits for a back end that runs by itself (HTTP, a background engine) when none
# of the pending requests finishes; the caller simply calls again.
DRIVE_TIMEOUT_S = 0.5


def _error_completions(n: int, message: str, model_id: str = "") -> list[Completion]:
    return [Completion(text="", error=message, model_id=model_id) for _ in range(n)]


def _done_future(completion: Completion) -> "Future[Completion]":
    f: Future = Future()
    f.set_result(completion)
    return f


def completion_of(future: Future, model_id: str = "") -> Completion:
    """The Completion a finished future holds; an exception (or a non-Completion) becomes an error
    Completion, so whoever reads it never has to catch anything."""
    try:
        out = future.result(timeout=0)
    except BaseException as e:  # noqa: BLE001 - includes CancelledError
        return Completion(text="", error=f"request failed: {type(e).__name__}: {e}", model_id=model_id)
    if not isinstance(out, Completion):
        return Completion(text="", error=f"request produced {type(out).__name__}, not a Completion",
                          model_id=model_id)
    return out


def submit_via_generate(client: Client, request: ChatRequest, name: str = "client") -> "Future[Completion]":
    """`submit` for a client that only has `generate`: answers at once, in an already finished
    future (so there is nothing to drive)."""
    try:
        outs = list(client.generate([request]))
        if len(outs) != 1:
            raise RuntimeError(f"returned {len(outs)} completions for 1 request")
        return _done_future(outs[0])
    except Exception as e:  # noqa: BLE001 - a broken back end fails this request only
        return _done_future(Completion(text="", error=f"{name} raised {type(e).__name__}: {e}"))


def safe_submit(client, request: ChatRequest, name: str = "client") -> "Future[Completion]":
    """client.submit(request), or `submit_via_generate` for a client without `submit`; an exception
    becomes an error Completion."""
    submit = getattr(client, "submit", None)
    if not callable(submit):
        return submit_via_generate(client, request, name)
    try:
        fut = submit(request)
    except Exception as e:  # noqa: BLE001
        return _done_future(Completion(text="", error=f"{name} submit raised {type(e).__name__}: {e}"))
    if not isinstance(fut, Future):
        return _done_future(Completion(text="", error=f"{name} submit returned {type(fut).__name__}, "
                                                       f"not a Future"))
    return fut


def _wait_first(pending: list[Future], timeout: float | None) -> None:
    wait(pending, timeout=DRIVE_TIMEOUT_S if timeout is None else timeout, return_when=FIRST_COMPLETED)


# ---------------------------------------------------------------------------------------------
# Local engine

# One lock per Engine object: the Engine is not thread-safe, and a RouterClient may hold two
# EngineClients over the same engine and call them from two threads.
_ENGINE_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_ENGINE_LOCKS_GUARD = threading.Lock()


def _engine_lock(engine) -> threading.Lock:
    with _ENGINE_LOCKS_GUARD:
        lock = _ENGINE_LOCKS.get(engine)
        if lock is None:
            lock = _ENGINE_LOCKS[engine] = threading.Lock()
        return lock


class EngineClient:
    """Adapter over ``automem_jax.llm.engine.Engine``: per-request sampling params from the
    request's ``stop``/``max_tokens`` and this client's defaults (``max_tokens`` here is a cap).
    ``top_p``, ``top_k`` and ``repetition_penalty`` left at None are not sent, so the engine applies
    the checkpoint's generation_config.json defaults (as vLLM does).

    ``submit``/``drive``: see the module docstring. Only one thread steps an engine at a time: a
    per-engine lock is shared by every EngineClient over it, and a `drive` that finds another thread
    stepping waits for its futures instead."""

    def __init__(self, engine, *, temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, max_tokens: int | None = None, seed: int | None = None):
        _check_range("temperature", temperature, 0)
        _check_range("top_p", top_p, 0, 1, lo_open=True, allow_none=True)
        _check_range("top_k", top_k, 0, integer=True, allow_none=True)
        _check_range("repetition_penalty", repetition_penalty, 0, lo_open=True, allow_none=True)
        _check_range("max_tokens", max_tokens, 1, integer=True, allow_none=True)
        _check_range("seed", seed, integer=True, allow_none=True)
        self.engine = engine
        self.temperature = float(temperature)
        self.top_p = None if top_p is None else float(top_p)
        self.top_k = None if top_k is None else int(top_k)
        self.repetition_penalty = None if repetition_penalty is None else float(repetition_penalty)
        self.max_tokens, self.seed = max_tokens, seed
        self._lock = _engine_lock(engine)

    @property
    def model_id(self) -> str:
        return getattr(self.engine, "model_name", "")

    @property
    def steps_engine(self) -> bool:
        """Whether `drive` steps the engine on the calling thread (it is not in background mode)."""
        return not self.engine.background

    def __repr__(self) -> str:
        return (f"EngineClient(model={self.model_id!r}, temperature={self.temperature}, top_p={self.top_p}, "
                f"top_k={self.top_k}, repetition_penalty={self.repetition_penalty}, max_tokens={self.max_tokens})")

    def _params(self, r: ChatRequest):
        from automem_jax.llm.sampling import SamplingParams
        limit = r.max_tokens if self.max_tokens is None else min(r.max_tokens, self.max_tokens)
        kw: dict[str, Any] = dict(temperature=self.temperature, max_tokens=limit,
                                  stop=list(r.stop) if r.stop else None, seed=self.seed)
        for name in ("top_p", "top_k", "repetition_penalty"):  # unset: the engine's defaults
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return SamplingParams(**kw)

    def _call(self, requests: list[ChatRequest]) -> list[Completion]:
        params = [self._params(r) for r in requests]
        with self._lock:
            outs = self.engine.generate(requests, params)
        if len(outs) != len(requests):
            raise RuntimeError(f"engine returned {len(outs)} completions for {len(requests)} requests")
        for o in outs:
            o.model_id = o.model_id or self.model_id
        return list(outs)

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        requests = list(requests)
        if not requests:
            return []
        try:
            return self._call(requests)
        except Exception as e:  # noqa: BLE001 - isolate the request that broke the batch
            if len(requests) == 1:
                log.warning("engine call failed: %s: %s", type(e).__name__, e)
                return _error_completions(1, f"engine: {type(e).__name__}: {e}", self.model_id)
        return [self.generate([r])[0] for r in requests]

    # -- one request at a time --
    def _completion(self, out) -> Completion:
        error = getattr(out, "error", None)
        if error is None and getattr(out, "finish_reason", None) == "error":
            error = "the engine rejected the request"
        return Completion(text=out.text if error is None else "", tokens_in=int(out.prompt_tokens),
                          tokens_out=int(out.completion_tokens), error=error, model_id=self.model_id)

    def submit(self, request: ChatRequest) -> "Future[Completion]":
        """Queues one request on the engine; the future resolves when the engine finishes it (the
        engine's background thread, or whoever steps it: `drive`, `generate`)."""
        try:
            inner = self.engine.submit(request, self._params(request))
        except Exception as e:  # noqa: BLE001 - this request fails alone
            log.warning("engine submit failed: %s: %s", type(e).__name__, e)
            return _done_future(Completion(text="", error=f"engine: {type(e).__name__}: {e}",
                                           model_id=self.model_id))
        out: Future = Future()

        def resolve(f: Future) -> None:
            try:
                c = self._completion(f.result())
            except BaseException as e:  # noqa: BLE001 - includes CancelledError
                c = Completion(text="", error=f"engine: {type(e).__name__}: {e}", model_id=self.model_id)
            try:
                out.set_result(c)
            except InvalidStateError:  # the caller cancelled it
                pass

        inner.add_done_callback(resolve)  # runs at once if `inner` is already done
        # Cancelling the caller's future takes the request out of the engine's scheduler.
        out.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return out

    def drive(self, pending: Collection[Future], timeout: float | None = None) -> None:
        """Progress until one of `pending` is done. Step mode: steps the engine on this thread until
        then (timeout=0: one step), with no wall clock involved; background mode, or while another
        thread holds the engine, waits up to `timeout` (default DRIVE_TIMEOUT_S)."""
        pending = list(pending)
        if not pending or any(f.done() for f in pending):
            return
        if not self.steps_engine or not self._lock.acquire(blocking=False):
            _wait_first(pending, timeout)
            return
        try:
            while True:
                more = self.engine.step()
                if timeout == 0 or any(f.done() for f in pending):
                    return
                if not more:
                    # Nothing left to run, yet none of these finished: they are not this engine's.
                    raise RuntimeError(f"drive: the engine has no work left but none of the {len(pending)} "
                                       f"pending requests is done (were they submitted to another client?)")
        finally:
            self._lock.release()


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP, on the official SDK (the shared part: automem_jax.llm.openai_http)

class OpenAIClient(OpenAIEndpoint):
    """Chat completions over HTTP against any OpenAI-compatible server (the ``openai`` SDK).

    base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
    api_key_env: the environment variable holding the key (read once, here); None sends no key.
    timeout: seconds per attempt for connecting and for each read of the reply.
    max_retries: extra attempts after connection errors, timeouts, 408/409/429 and 5xx (the SDK's
        retries); other 4xx fail at once. The wait before retry k (0-based) is
        ``b/2 + uniform(0, b/2)`` with ``b = min(backoff_max, backoff * 2**k)``, and at least a
        server's Retry-After (capped at backoff_max).
    max_concurrency: requests in flight at once, across every `generate` call of this client.
    temperature/top_p: sent with every request (None: not sent); max_tokens: a cap on each
        request's own max_tokens.
    extra_body: merged into every request body by the SDK (e.g. {"top_k": 20} for vLLM).

    A failed request becomes ``Completion(text="", error=...)``; the error text starts with a
    stable prefix (see ``automem_jax.llm.openai_http``): ``connection error`` or ``timed out`` when
    the server could not be reached or did not answer (``is_unreachable(error)``), ``HTTP <status>``
    when it refused the request, ``malformed chat completion`` for a 2xx reply without usable
    choices, ``client error`` for a local problem. The key never appears in it.

    ``post_json(path, body)`` / ``get_json(path)`` (from OpenAIEndpoint) call other routes of the
    same server, relative to its root (base_url without ``/v1``): ``/v1/load_lora_adapter``,
    ``/v1/models``, ``/health``; they raise ``EndpointError``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 4, backoff: float = 1.0, backoff_max: float = 30.0,
                 max_concurrency: int = 32, temperature: float | None = 1.0, top_p: float | None = 1.0,
                 max_tokens: int | None = None, extra_body: Mapping[str, Any] | None = None):
        _check_range("max_concurrency", max_concurrency, 1, integer=True)
        _check_range("temperature", temperature, 0, 2, allow_none=True)
        _check_range("top_p", top_p, 0, 1, lo_open=True, allow_none=True)
        _check_range("max_tokens", max_tokens, 1, integer=True, allow_none=True)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ValueError(f"extra_body must be a mapping, got {type(extra_body).__name__}")
        super().__init__(base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                         backoff=backoff, backoff_max=backoff_max)
        self.max_concurrency = int(max_concurrency)
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.extra_body = dict(extra_body or {})
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return (f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout={self.timeout}, max_retries={self.max_retries}, max_concurrency={self.max_concurrency})")

    # -- lifecycle --
    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        super().close()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("OpenAIClient is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai-client")
            return self._pool

    # -- public --
    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        requests = list(requests)
        if not requests:
            return []
        try:
            pool = self._executor()
        except RuntimeError as e:
            return _error_completions(len(requests), str(e), self.model)
        return list(pool.map(self._one, requests))

    def submit(self, request: ChatRequest) -> "Future[Completion]":
        """Sends one request from the client's thread pool (at most `max_concurrency` in flight)."""
        try:
            return self._executor().submit(self._one, request)
        except RuntimeError as e:  # closed (or the pool is shutting down)
            return _done_future(Completion(text="", error=str(e), model_id=self.model))

    def drive(self, pending: Collection[Future], timeout: float | None = None) -> None:
        """The requests run by themselves: waits until one of `pending` is done, or `timeout`."""
        pending = list(pending)
        if pending and not any(f.done() for f in pending):
            _wait_first(pending, timeout)

    # -- one request --
    def _one(self, r: ChatRequest) -> Completion:
        limit = r.max_tokens if self.max_tokens is None else min(r.max_tokens, self.max_tokens)
        try:
            obj = self.chat_completion(list(r.messages), max_tokens=int(limit) if limit else None,
                                       temperature=self.temperature, top_p=self.top_p,
                                       stop=list(r.stop) if r.stop else None, extra_body=self.extra_body)
            message = obj["choices"][0]["message"]
            if "content" not in message:  # null is a legitimate empty answer; a missing field is not
                raise self.malformed(self.chat_url, "choices[0].message has no content", json.dumps(obj).encode(),
                                      200)
            try:
                text = message_text(message["content"])
            except TypeError as e:
                raise self.malformed(self.chat_url, str(e), json.dumps(obj).encode(), 200) from None
            usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
            return Completion(text=text, tokens_in=int(usage.get("prompt_tokens") or 0),
                              tokens_out=int(usage.get("completion_tokens") or 0),
                              model_id=str(obj.get("model") or self.model))
        except EndpointError as e:
            return Completion(text="", error=str(e), model_id=self.model)
        except Exception as e:  # noqa: BLE001 - never let one call raise into the rollout
            return Completion(text="", error=self._redact(f"{CLIENT_ERROR}: {type(e).__name__}: {e}"),
                              model_id=self.model)


# ---------------------------------------------------------------------------------------------
# Two-model router

class RouterClient:
    """Sends ``memory`` requests to the memory specialist and ``gameplay``/``policy`` requests to
    the gameplay (base) model; both sub-batches run at once and come back in request order.

    ``submit`` routes the same way (a back end without ``submit`` answers at once through its
    ``generate``); ``drive`` drives each back end for the futures it owns. Two back ends over one
    engine are driven as one; two that each need stepping take one step in turn (deterministic)."""

    ROUTES = {ROLE_MEMORY: "memory", ROLE_GAMEPLAY: "gameplay", ROLE_POLICY: "gameplay"}

    def __init__(self, memory: Client, gameplay: Client):
        for name, c in (("memory", memory), ("gameplay", gameplay)):
            if not callable(getattr(c, "generate", None)):
                raise TypeError(f"RouterClient: {name} must have a generate(requests) method, "
                                f"got {type(c).__name__}")
        self.memory, self.gameplay = memory, gameplay
        # future -> the route that owns it (dropped with the future)
        self._owner: "weakref.WeakKeyDictionary[Future, str]" = weakref.WeakKeyDictionary()
        self._owner_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RouterClient(memory={self.memory!r}, gameplay={self.gameplay!r})"

    def submit(self, request: ChatRequest) -> "Future[Completion]":
        route = self.ROUTES.get(getattr(request, "model_role", None))
        if route is None:
            return _done_future(Completion(text="", error=f"unknown model_role {request.model_role!r}; expected "
                                                          f"one of {', '.join(self.ROUTES)}"))
        fut = safe_submit(getattr(self, route), request, f"{route} client")
        if not fut.done():
            with self._owner_lock:
                self._owner[fut] = route
        return fut

    @staticmethod
    def _drive_key(client) -> int:
        # Two EngineClients over one engine are driven as one (either can step it).
        return id(client.engine) if isinstance(client, EngineClient) else id(client)

    def drive(self, pending: Collection[Future], timeout: float | None = None) -> None:
        pending = list(pending)
        if not pending or any(f.done() for f in pending):
            return
        groups: dict[int, tuple[Any, list[Future]]] = {}
        with self._owner_lock:
            owners = [(f, self._owner.get(f)) for f in pending]
        for f, route in owners:
            if route is None:
                continue
            client = getattr(self, route)
            if not callable(getattr(client, "drive", None)):
                continue
            groups.setdefault(self._drive_key(client), (client, []))[1].append(f)
        if not groups:
            _wait_first(pending, timeout)
            return
        if len(groups) == 1:
            client, futs = next(iter(groups.values()))
            client.drive(futs, timeout)
            return
        # Several back ends: a round gives each the least progress (one engine step, or a poll).
        budget = DRIVE_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + budget
        stepping = any(getattr(c, "steps_engine", False) for c, _ in groups.values())
        while True:
            for client, futs in groups.values():
                client.drive(futs, 0)
            if any(f.done() for f in pending):
                return
            left = deadline - time.monotonic()
            if stepping:
                if timeout == 0:
                    return
                continue  # an engine step is progress by itself; no wall clock decides when to stop
            if left <= 0:
                return
            wait(pending, timeout=min(left, 0.01), return_when=FIRST_COMPLETED)

    @staticmethod
    def _safe(client: Client, requests: list[ChatRequest], name: str) -> list[Completion]:
        try:
            outs = list(client.generate(requests))
        except Exception as e:  # noqa: BLE001 - a broken back end fails its own sub-batch only
            return _error_completions(len(requests), f"{name} client raised {type(e).__name__}: {e}")
        if len(outs) != len(requests):
            return _error_completions(len(requests), f"{name} client returned {len(outs)} completions "
                                                     f"for {len(requests)} requests")
        return outs

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        requests = list(requests)
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {"memory": [], "gameplay": []}
        for i, r in enumerate(requests):
            route = self.ROUTES.get(r.model_role)
            if route is None:
                out[i] = Completion(text="", error=f"unknown model_role {r.model_role!r}; expected one of "
                                                    f"{', '.join(self.ROUTES)}")
            else:
                groups[route].append(i)
        if self.memory is self.gameplay:  # one back end: keep the batch whole
            groups = {"memory": groups["memory"] + groups["gameplay"], "gameplay": []}
        jobs = [(name, idx) for name, idx in groups.items() if idx]
        results: dict[str, list[Completion]] = {}

        def run(name: str, idx: list[int]) -> None:
            results[name] = self._safe(getattr(self, name), [requests[i] for i in idx], name)

        threads = [threading.Thread(target=run, args=job, name=f"router-{job[0]}") for job in jobs[1:]]
        for t in threads:
            t.start()
        if jobs:
            run(*jobs[0])
        for t in threads:
            t.join()
        for name, idx in jobs:
            for i, c in zip(idx, results[name]):
                out[i] = c
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Factory

def load_engine(checkpoint: str, *, max_batch: int = 16, max_len: int = 2048, seed: int = 0,
                tokenizer: str | None = None, dtype: str | None = None, model_name: str | None = None,
                mesh=None):
    """An Engine from ``preset:<name>`` (random weights, offline Qwen3 tokenizer) or a local/gs://
    Hugging Face folder, .gguf file or ``pkg:<name>`` (weights via ``hf.load_pretrained``; tokenizer from `tokenizer` or the folder;
    its generation_config.json's top_p / top_k / repetition_penalty become the engine's defaults for
    requests that leave them unset)."""
    from automem_jax.models import gguf  # light: gguf itself is imported on first read
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f"checkpoint must be 'preset:<name>' or a model folder, got {checkpoint!r}")
    if not checkpoint.startswith(("preset:", "gs://", "pkg:")) and not os.path.isdir(checkpoint) \
            and not (gguf.is_gguf(checkpoint) and os.path.isfile(checkpoint)):
        # Fail before the slow imports below.
        raise ValueError(f"checkpoint {checkpoint!r} is not a folder or .gguf file (expected a Hugging Face "
                         f"model folder, a .gguf file, a gs:// path, pkg:<name> or preset:<name>)")
    from automem_jax.llm.engine import Engine
    kw = dict(max_batch=max_batch, max_len=max_len, mesh=mesh)
    from automem_jax.models.tokenizer import load_tokenizer
    if checkpoint.startswith("preset:"):
        from automem_jax.models.qwen import init_model
        from automem_jax.models.qwen_presets import preset
        name = checkpoint[len("preset:"):]
        model = init_model(preset(name), seed=seed, mesh=mesh)
        return Engine(model, load_tokenizer(tokenizer), seed=seed, model_name=model_name or name, **kw)
    from automem_jax.models import hf
    try:
        tok = load_tokenizer(tokenizer or checkpoint)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint!r}: no usable tokenizer ({e}); pass a tokenizer folder") from e
    model, _ = hf.load_pretrained(checkpoint, dtype=dtype, mesh=mesh)
    name = model_name or checkpoint.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    from automem_jax.llm.sampling import generation_defaults
    return Engine(model, tok, seed=seed, model_name=name, sampling_defaults=generation_defaults(checkpoint), **kw)


_SPEC_FIELDS = {
    "engine": {"kind", "checkpoint", "max_batch", "max_len", "seed", "tokenizer", "dtype", "model_name",
               "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"},
    "openai": {"kind", "base_url", "model", "api_key_env", "timeout", "max_retries", "backoff", "backoff_max",
               "max_concurrency", "temperature", "top_p", "max_tokens", "extra_body"},
    "router": {"kind", "memory", "gameplay"},
}
_REQUIRED = {"engine": ("checkpoint",), "openai": ("base_url", "model"), "router": ("memory", "gameplay")}
_ENGINE_BUILD = ("max_batch", "max_len", "seed", "tokenizer", "dtype", "model_name")


def _as_dict(spec, where: str) -> dict:
    if hasattr(spec, "to_dict") and not isinstance(spec, Mapping):  # ml_collections ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'kind' field, got {type(spec).__name__}")
    return dict(spec)


def check_kind_fields(spec, where: str, fields: Mapping[str, set]) -> tuple[dict, str]:
    """(spec as a dict, its kind) after checking the kind and that every field belongs to it."""
    spec = _as_dict(spec, where)
    kind = spec.get("kind")
    if kind not in fields:
        raise ValueError(f"{where}.kind must be one of {', '.join(fields)}; got {kind!r}")
    unknown = sorted(set(spec) - fields[kind])
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for kind {kind!r}; "
                         f"known: {', '.join(sorted(fields[kind] - {'kind'}))}")
    return spec, kind


def _check_spec(spec, where: str, have_engine: bool) -> dict:
    """Kinds, field names and required fields of a whole spec tree, before anything is built."""
    spec, kind = check_kind_fields(spec, where, _SPEC_FIELDS)
    for f in _REQUIRED[kind]:
        if spec.get(f) in (None, "") and not (kind == "engine" and have_engine):
            raise ValueError(f"{where}.{f} is required for kind {kind!r}")
    if kind == "router":
        spec["memory"] = _check_spec(spec["memory"], f"{where}.memory", have_engine)
        spec["gameplay"] = _check_spec(spec["gameplay"], f"{where}.gameplay", have_engine)
    return spec


def make_client(spec: Mapping[str, Any], *, engine=None, _where: str = "client") -> Client:
    """Builds a Client from a config mapping:

    ``{"kind": "engine", "checkpoint": "preset:tiny" | <hf folder>, "max_batch", "max_len", "seed",
    "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"}`` (``engine=`` reuses an
    already built Engine and then needs no checkpoint), ``{"kind": "openai", "base_url", "model", "api_key_env", ...}`` (the
    OpenAIClient arguments), ``{"kind": "router", "memory": <spec>, "gameplay": <spec>}``.
    Errors name the offending field, e.g. ``client.memory.base_url``.
    """
    spec = _check_spec(spec, _where, engine is not None)
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}

    def wrap(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except ValueError as e:  # prefix the spec path; the message already names the field
            msg = str(e)
            raise ValueError(f"{_where}.{msg}" if msg.split(" ", 1)[0] in args else f"{_where}: {msg}") from None

    if kind == "openai":
        return wrap(OpenAIClient, **args)
    if kind == "router":
        return RouterClient(memory=make_client(args["memory"], engine=engine, _where=f"{_where}.memory"),
                            gameplay=make_client(args["gameplay"], engine=engine, _where=f"{_where}.gameplay"))
    build = {k: args.pop(k) for k in _ENGINE_BUILD if k in args}
    args.pop("checkpoint", None)
    if engine is None:
        engine = wrap(load_engine, spec["checkpoint"], **build)
    return wrap(EngineClient, engine, **args)
