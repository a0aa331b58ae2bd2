"""What the OpenAI-compatible server serves: an ``EngineFront`` per engine (submits to its scheduler,
counts requests in flight, drains at close), LoRA adapters as engines over merged copies of the base
weights (``lora_engine_loader``), and ``ServerState``, the thread-safe registry of the base model and
the adapters loaded at run time, with the API key, ``/v1/models`` and the stats."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from automem_jax.agent.types import ChatRequest
from automem_jax.llm.server_schema import ApiError, bad_request

log = logging.getLogger(__name__)


class Shutdown(Exception):
    """A front refused a request: the server (or that adapter) is closing."""


class EngineFront:
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
                raise Shutdown("the server is shutting down")
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


def outcome_error(out, front: EngineFront) -> ApiError | None:
    """The ApiError for a GenOutput that failed, else None."""
    if not (out.finish_reason == "error" or getattr(out, "error", None)):
        return None
    if front.closing:  # failed by the engine's shutdown, not for its input
        return ApiError(503, f"the server is shutting down ({out.error})", code="shutting_down")
    if str(out.error or "").startswith("engine"):  # a failed engine step, not a bad input
        return ApiError(500, f"generation failed: {out.error}")
    # Otherwise the engine refused the request for its input (too long, bad chat, bad params).
    return bad_request(f"the engine rejected this request: {out.error}", "messages", "invalid_request")


# ---------------------------------------------------------------------------------------------
# LoRA adapters as merged engines

def base_model_factory(checkpoint: str, *, seed: int = 0, dtype: str | None = None, mesh=None) -> Callable:
    """A function returning a fresh copy of the base weights, loaded as ``client.load_engine`` loads
    them (``preset:<name>`` is initialised again with the same seed, so it is the same model)."""
    if checkpoint.startswith("preset:"):
        from automem_jax.models.qwen import init_model
        from automem_jax.models.qwen_presets import preset
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
# The server's state (thread-safe: adapters load on worker threads)

class ServerState:
    def __init__(self, base: EngineFront, api_key: str | None, max_body_bytes: int, request_timeout_s: float,
                 adapter_loader: Callable | None, max_loras: int):
        self.base = base
        self._key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_len = int(getattr(base.engine, "max_len", 1 << 30))
        self.adapter_loader = adapter_loader
        self.max_loras = max_loras
        self.adapters: dict[str, EngineFront] = {}
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

    def fronts(self) -> list[EngineFront]:
        with self._lock:
            return [self.base, *self.adapters.values()]

    def served_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fronts())

    def front_for(self, name: str | None) -> EngineFront:
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
            raise bad_request("LoRA is not enabled on this server; start it with --enable_lora "
                       "(or serve(..., adapter_loader=...))", "lora_name", "lora_not_enabled")
        with self._lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if name == self.base.name or name in self.adapters:
                raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name", "already_loaded")
            if name in self._pending:
                raise bad_request(f"The lora adapter '{name}' is being loaded or unloaded; try again when that is done",
                           "lora_name", "busy")
            if len(self.adapters) + len(self._pending) >= self.max_loras:
                raise bad_request(f"cannot load '{name}': {len(self.adapters) + len(self._pending)} LoRA adapter(s) "
                           f"are loaded or loading and max_loras is {self.max_loras}; unload one first",
                           "lora_name", "max_loras")
            self._pending.add(name)
        try:
            try:
                engine = self.adapter_loader(name, path)
            except Exception as e:  # noqa: BLE001 - a bad folder is the client's error
                if not isinstance(e, (OSError, ValueError)):
                    log.warning("loading LoRA adapter %r from %r failed", name, path, exc_info=True)
                raise bad_request(f"cannot load LoRA adapter '{name}' from '{path}': {type(e).__name__}: {e}",
                           "lora_path", "invalid_adapter") from None
            front = EngineFront(engine, name, root=path, parent=self.base.name)
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
                raise bad_request(f"The lora adapter '{name}' is being loaded or unloaded; try again when that is done",
                           "lora_name", "busy")
            raise bad_request(f"The lora adapter '{name}' cannot be found.", "lora_name", "not_found")
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
