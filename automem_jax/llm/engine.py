"""The in-process inference engine: a paged KV cache, a scheduler, and a serving layout of its own.

Requests are submitted one at a time (`submit` -> a Future of `GenOutput`); `step()` runs one
scheduler iteration:
  1. admit waiting requests while rows and pages allow (pages for the prompt; a decoding row takes
     one more page at a time, and when none is left the newest row is preempted: its pages return
     to the prefix cache and it later resumes where it stopped, as vLLM's recompute preemption);
  2. prefill at most `prefill_chunk` prompt tokens, spread over the admitted rows, so a long
     prompt is prefilled in chunks and decoding rows never stall for a whole prompt;
  3. one decode step for every row that has its prompt in the cache.
Finished rows resolve their future at once and free their row for the next request.

The cache is paged (`kv_pages.PagePool`): per layer a pool of pages of `page_size` tokens, donated
to every jitted step, so writes land in place and a step reads only the pages its rows reach
(bucketed): the cost of a step follows the tokens attended, not the pool size. Full pages are
shared across requests through an exact prefix cache: the instruction text every agent's prompt
starts with is prefilled once; a request whose prefix another admitted request is computing waits
one step for it rather than computing it again. Idle cached pages are evicted LRU when pages run
short; live pages never are.

Serving layout: with a mesh, the weights are placed by `rules` (default `SERVING_RULES`: weights
replicated over `data`, split over `tensor`; never gathered per token), independent of training's.
Multi-host: every host runs the same `submit`/`step` sequence (the scheduler is deterministic: no
timing, no string hashing), host inputs are identical and replicated, and sampled tokens come back
replicated, so no host reads another's shard. `start_background()` runs `step` on a thread for a
server (one host); `submit` is thread-safe in both modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automem_jax.agent.types import ChatRequest, Completion
from automem_jax.llm.kv_pages import PagePool
from automem_jax.llm.sampling import SamplingParams, cut_at_stop, hits_stop, penalize, sample, sampling_inputs
from automem_jax.models.qwen import PAGE_POOL_AXES, Qwen, abstract_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length", or "error"
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None


@dataclasses.dataclass
class EngineStats:
    compiles: int = 0
    prefill_calls: int = 0
    decode_steps: int = 0
    steps: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    deferred_admissions: int = 0  # waited a step for another request's prefix
    preemptions: int = 0  # rows sent back to the queue for pages (recomputed from the prefix cache)
    evicted_pages: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prefix_hit_rate"] = self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return d


def _buckets(limit: int, start: int, linear_from: int | None = None, multiple: int = 1) -> list[int]:
    """Powers of two from `start`; past `linear_from`, steps of `linear_from / 2`; every bucket a
    multiple of `multiple` (a page), the last one `limit` itself."""
    out, b = [], start
    while b < limit:
        v = -(-b // multiple) * multiple
        if v < limit and (not out or v > out[-1]):
            out.append(v)
        b = b * 2 if linear_from is None or b < linear_from else b + linear_from // 2
    out.append(limit)
    return out


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")



@dataclasses.dataclass
class _Seq:
    """One request from admission to finish."""
    rid: int
    prompt: list[int]
    params: SamplingParams
    future: Future
    key: np.ndarray
    limit: int
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated (no EOS)
    generated: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    block_ids: list[int] = dataclasses.field(default_factory=list)  # prefix-cache ids of full blocks
    computed: int = 0  # tokens whose KV is in the cache
    cached: int = 0  # prompt tokens found in the prefix cache (first admission)
    admitted: bool = False
    seen: set = dataclasses.field(default_factory=set)
    on_token: Callable[[list[int]], None] | None = None  # streaming: called with the ids so far

    @property
    def target(self) -> int:
        """Tokens to prefill: the prompt, or after a preemption everything but the last sampled
        token (which the next decode step feeds)."""
        return len(self.tokens) - (1 if self.generated else 0)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target


class Engine:
    """Paged, continuously batched generation with a deterministic scheduler (see module doc)."""

    def __init__(self, model: Qwen, tokenizer, *, max_batch: int = 16, max_len: int = 2048,
                 mesh: jax.sharding.Mesh | None = None, rules=None, seed: int = 0, page_size: int = 16,
                 cache_tokens: int | None = None, prefill_chunk: int = 512, prefix_cache: bool = True,
                 model_name: str = "automem-policy", chat_template_kwargs: dict | None = None,
                 sampling_defaults: dict | None = None):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        if page_size < 1 or prefill_chunk < 1:
            raise ValueError(f"page_size and prefill_chunk must be >= 1, got {page_size}, {prefill_chunk}")
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len
        self.mesh = mesh
        self.page_size = P = page_size
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.model_name = model_name
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.sampling_defaults = dict(sampling_defaults or {})
        self.stats = EngineStats()
        self.pages_per_seq = -(-max_len // P)
        cache_tokens = cache_tokens or max_batch * max_len
        num_pages = -(-cache_tokens // P)
        if num_pages < self.pages_per_seq:
            raise ValueError(f"cache_tokens={cache_tokens} holds {num_pages} pages of {P}, fewer than one "
                             f"max_len={max_len} sequence needs ({self.pages_per_seq})")
        self.pool = PagePool(num_pages, P)
        self.pool_tokens = num_pages * P
        eos = self.cfg.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for attr in ("eos_token_id", "pad_token_id"):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                eos.add(int(tid))
        self.eos_ids = eos
        self.batch_buckets = _buckets(max_batch, 1)
        self.chunk_buckets = _buckets(prefill_chunk, min(16, prefill_chunk))
        self.seen_buckets = _buckets(max_len + self.cfg.vocab_size, 64)  # distinct tokens a row has seen
        self.kv_buckets = _buckets(self.pages_per_seq * P, min(64, self.pages_per_seq * P), linear_from=2048,
                                   multiple=P)
        if rules is None and mesh is not None:
            from automem_jax.parallel import mesh as mesh_lib
            rules = getattr(mesh_lib, "SERVING_RULES", mesh_lib.DEFAULT_RULES)
        self.rules = rules
        self._seen_shapes: set = set()
        self._counter = 0
        self.seed = seed  # sampling seeds derive from it (and a request counter)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._incoming: deque[tuple] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._graphdef, self._state = self._serving_state(model)
        self._pools = self._new_pools()
        self._build_fns()

    @classmethod
    def from_preset(cls, name: str = "tiny", *, seed: int = 0, tokenizer=None, **kw) -> "Engine":
        from automem_jax.models.qwen import init_model
        from automem_jax.models.qwen_presets import preset
        from automem_jax.models.tokenizer import load_tokenizer
        model = init_model(preset(name), seed=seed)
        return cls(model, tokenizer or load_tokenizer(), seed=seed, model_name=name, **kw)

    # ---- device state --------------------------------------------------------------------------
    def _ctx(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from automem_jax.parallel.mesh import use_rules
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(use_rules(self.rules))
        return stack

    def _serving_state(self, model: Qwen):
        """Per-layer weights (a scanned model is unstacked) in the serving layout."""
        cfg = model.cfg
        graphdef, state = nnx.split(model)
        if cfg.scan_layers:
            flat_cfg = cfg.replace(scan_layers=False)
            graphdef, abs_state = nnx.split(abstract_model(flat_cfg))
            stacked = state["layers"]
            layers = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)}
            pure = nnx.to_pure_dict(state)
            pure["layers"] = {i: nnx.to_pure_dict(layers[i]) for i in range(cfg.num_layers)}
            nnx.replace_by_pure_dict(abs_state, pure)
            state = abs_state
            self.cfg = flat_cfg
        if self.mesh is None:
            return graphdef, state
        from automem_jax.parallel.mesh import state_shardings
        shardings = state_shardings(state, self.mesh, self.rules)
        with self._ctx():
            state = jax.jit(lambda s: s, out_shardings=shardings)(state)
        return graphdef, state

    def _sharding(self, names=None, shape=None):
        from automem_jax.parallel.mesh import named_sharding
        return named_sharding(self.mesh, names, shape, self.rules)

    def _pool_sharding(self):
        return self._sharding(PAGE_POOL_AXES, (self.pool_tokens, self.cfg.num_kv_heads, self.cfg.head_dim))

    def _new_pools(self):
        cfg = self.cfg
        shape = (self.pool_tokens, cfg.num_kv_heads, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)

        def make():
            return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

        if self.mesh is None:
            return make()
        sh = self._pool_sharding()
        with self._ctx():
            return jax.jit(make, out_shardings=[(sh, sh)] * cfg.num_layers)()

    def _build_fns(self):
        graphdef = self._graphdef

        def run(state, pools, ids, positions, write_idx, read_idx, logits_at, keys, steps, temp, top_p, top_k,
                penalty, seen, mode, use_penalty):
            model = nnx.merge(graphdef, state)
            logits, pools = model.forward_paged(ids, positions, pools, write_idx, read_idx, logits_at)
            logits = logits[:, 0]
            if use_penalty:
                logits = penalize(logits, seen, penalty)
            return pools, sample(logits, keys, steps, temp, top_p, top_k, mode)

        kw = {}
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec
            pool_sh = self._pool_sharding()
            kw["out_shardings"] = ([(pool_sh, pool_sh)] * self.cfg.num_layers, NamedSharding(self.mesh, PartitionSpec()))
        self._run = jax.jit(run, static_argnums=(14, 15), donate_argnums=(1,), **kw)

    def _put(self, *arrays):
        """Host arrays onto the device: replicated over the mesh (identical on every host)."""
        if self.mesh is None:
            return [jnp.asarray(a) for a in arrays]
        from jax.sharding import NamedSharding, PartitionSpec
        rep = NamedSharding(self.mesh, PartitionSpec())
        return [jax.device_put(a, rep) for a in arrays]

    def _call(self, kind: str, ids, positions, write_idx, read_idx, logits_at, rows: list[_Seq], steps):
        keys, temp, top_p, top_k, penalty, seen, mode, use_penalty = sampling_inputs(
            rows, lambda n: _bucket(n, self.seen_buckets))
        self._note_shape((kind, ids.shape, read_idx.shape[1], mode, use_penalty, seen.shape[1]))
        args = self._put(ids, positions, write_idx, read_idx, logits_at, keys, steps, temp, top_p, top_k,
                         penalty, seen)
        with self._ctx():
            self._pools, tok = self._run(self._state, self._pools, *args, mode, use_penalty)
        return np.asarray(tok)

    def lower_decode(self, batch: int | None = None, kv_tokens: int | None = None):
        """The decode step lowered with the engine's real shardings (HLO inspection in tests)."""
        B = batch or self.max_batch
        S = kv_tokens or self.kv_buckets[0]
        z = np.zeros((B, 1), np.int32)
        args = self._put(z, z, z, np.zeros((B, S), np.int32), np.zeros((B,), np.int32),
                         np.zeros((B, 2), np.uint32), np.zeros((B,), np.int32), np.zeros((B,), np.float32),
                         np.ones((B,), np.float32), np.zeros((B,), np.int32), np.ones((B,), np.float32),
                         np.full((B, 1), -1, np.int32))
        with self._ctx():
            return self._run.lower(self._state, self._pools, *args, "greedy", False)

    def _note_shape(self, key) -> None:
        if key not in self._seen_shapes:
            self._seen_shapes.add(key)
            self.stats.compiles += 1

    # ---- public API ----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        from automem_jax.models.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt=True,
                                   **self.chat_template_kwargs)

    def submit(self, prompt: list[int] | ChatRequest, params: SamplingParams | None = None, *,
               on_token: Callable[[list[int]], None] | None = None) -> Future:
        """Queues one request; the Future resolves to its GenOutput (an error output for a bad
        request, which never affects the others). Thread-safe. `on_token(generated_ids)` is called on
        the scheduler's thread after each accepted token (for streaming; it must be quick and must
        not raise: an exception there is logged and streaming stops for that request)."""
        fut: Future = Future()
        if isinstance(prompt, ChatRequest):
            req = prompt
            params = params or self._params_for([req], None)[0]
            try:
                prompt = self.encode_chat(req.messages)
            except Exception as e:  # noqa: BLE001 - a malformed chat fails that request only
                prompt = e
        params = params or SamplingParams()
        with self._wake:
            self._incoming.append((prompt, params, fut, on_token))
            self._wake.notify()
        return fut

    @property
    def has_work(self) -> bool:
        return bool(self._incoming or self._waiting or self._running)

    @property
    def background(self) -> bool:
        return self._thread is not None

    def run_until(self, futures: Sequence[Future]) -> None:
        """Steps (or, in background mode, waits) until every future is done."""
        for f in futures:
            while not f.done():
                if self.background:
                    f.exception()  # waits
                elif not self.step():
                    if not f.done():
                        raise RuntimeError("engine is idle but a request is unresolved")

    def generate(self, requests: Sequence[ChatRequest],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        outs = self.generate_full(requests, params)
        return [Completion(text=o.text, tokens_in=o.prompt_tokens, tokens_out=o.completion_tokens, error=o.error,
                           model_id=self.model_name) for o in outs]

    def generate_full(self, requests: Sequence[ChatRequest],
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenOutput]:
        plist = self._params_for(requests, params)
        futs = [self.submit(r, p) for r, p in zip(requests, plist)]
        self.run_until(futs)
        return [f.result() for f in futs]

    def _params_for(self, requests, params) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            base = params or SamplingParams()
            out = []
            for r in requests:
                p = dataclasses.replace(base)
                if getattr(r, "max_tokens", None):
                    p.max_tokens = min(p.max_tokens, r.max_tokens) if params is not None else r.max_tokens
                if getattr(r, "stop", None):
                    p.stop = list(r.stop)
                out.append(p)
            return out
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} requests")
        return list(params)

    def generate_ids(self, prompts: Sequence[list[int] | Exception], params: Sequence[SamplingParams]) -> list[GenOutput]:
        """Token-level entry point. A prompt that is an Exception (or too long) yields an error output."""
        futs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        self.run_until(futs)
        return [f.result() for f in futs]

    # ---- background mode (a server) ------------------------------------------------------------
    def start_background(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="automem-engine", daemon=True)
        self._thread.start()

    def stop_background(self, timeout: float = 30.0) -> None:
        t = self._thread
        if t is None:
            return
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        t.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.has_work:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine: {type(e).__name__}: {e}")
        self._fail_all("engine stopped")

    def _fail_all(self, message: str) -> None:
        for s in self._running + list(self._waiting):
            self.pool.release(s.pages)
            self._resolve(s.future, GenOutput("", [], len(s.prompt), 0, "error", error=message))
        self._running, self._waiting = [], deque()
        with self._lock:
            incoming, self._incoming = list(self._incoming), deque()
        for _prompt, _params, fut, _cb in incoming:
            self._resolve(fut, GenOutput("", [], 0, 0, "error", error=message))

    @staticmethod
    def _resolve(fut: Future, out: GenOutput) -> None:
        try:
            fut.set_result(out)
        except InvalidStateError:  # cancelled by its caller meanwhile
            pass

    def _drop_cancelled(self) -> None:
        """A cancelled request leaves the scheduler and frees its pages."""
        for s in [s for s in self._running if s.future.cancelled()]:
            self._running.remove(s)
            self.pool.release(s.pages)
        if any(s.future.cancelled() for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.future.cancelled())

    # ---- the scheduler -------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: admit, one prefill chunk batch, one decode step. Returns whether work remains."""
        with self._lock:
            incoming, self._incoming = list(self._incoming), deque()
        for prompt, params, fut, on_token in incoming:
            if not fut.cancelled():
                self._enqueue(prompt, params, fut, on_token)
        self._drop_cancelled()
        if not (self._waiting or self._running):
            return False
        self.stats.steps += 1
        self._admit()
        self._prefill()
        self._decode()
        return self.has_work

    def _enqueue(self, prompt, params: SamplingParams, fut: Future, on_token=None) -> None:
        problem = None
        if isinstance(prompt, Exception):
            problem = f"could not build the prompt: {prompt}"
        else:
            try:
                params.validate()
            except ValueError as e:
                problem = str(e)
            if problem is None and len(prompt) == 0:
                problem = "empty prompt"
            if problem is None and len(prompt) >= self.max_len:
                problem = f"prompt has {len(prompt)} tokens; this engine holds at most {self.max_len - 1}"
            if problem is None and any(not (0 <= t < self.cfg.vocab_size) for t in prompt):
                problem = f"prompt has token ids outside the vocabulary [0, {self.cfg.vocab_size})"
        if problem:
            n = 0 if isinstance(prompt, Exception) else len(prompt)
            self._resolve(fut, GenOutput("", [], n, 0, "error", error=problem))
            return
        sp = params.resolved(self.sampling_defaults)
        seed = sp.seed if sp.seed is not None else self.seed * 1_000_003 + self._counter
        self._counter += 1
        key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        prompt = [int(t) for t in prompt]
        limit = min(sp.max_tokens, self.max_len - len(prompt))
        s = _Seq(self._counter, prompt, sp, fut, key, limit, tokens=list(prompt), on_token=on_token)
        if sp.repetition_penalty != 1.0:
            s.seen = set(prompt)
        self.stats.requests += 1
        self._waiting.append(s)

    def _admit(self) -> None:
        P = self.page_size
        deferred = deque()
        while self._waiting and len(self._running) < self.max_batch:
            s = self._waiting[0]
            hit_pages, hit_ids = [], []
            if self.prefix_cache:
                # Keep at least one token to compute: the last prompt token's logits give the first reply token.
                hit_pages, hit_ids = self.pool.lookup(s.tokens, (s.target - 1) // P)
                if self._prefix_in_flight(s, len(hit_pages) * P):
                    deferred.append(self._waiting.popleft())
                    self.stats.deferred_admissions += 1
                    continue
            # Pages for the tokens to prefill now; decoding takes one more page at a time. Keep one
            # page per running row free so rows can grow without preempting at once.
            need = -(-s.target // P) - len(hit_pages)
            idle_hits = sum(1 for p in hit_pages if self.pool.ref[p] == 0)
            if need + len(self._running) > self.pool.available() - idle_hits:
                break  # first come, first served: wait for pages to free up
            self._waiting.popleft()
            self.pool.acquire(hit_pages)
            s.pages = hit_pages + self.pool.allocate(need)
            s.block_ids = list(hit_ids)
            s.computed = len(hit_pages) * P
            if not s.admitted:
                s.admitted, s.cached = True, s.computed
                self.stats.prompt_tokens += len(s.prompt)
                self.stats.cached_prompt_tokens += s.cached
            self._running.append(s)
        self._waiting.extendleft(reversed(deferred))
        self.stats.evicted_pages = self.pool.evictions

    def _prefix_in_flight(self, s: _Seq, hit: int) -> bool:
        """Whether a running prefill is computing full blocks of s's prompt past its cache hit."""
        P = self.page_size
        for r in self._running:
            if not r.prefilling:
                continue
            n = min(r.target, s.target - 1)
            if n < hit + P:
                continue
            a, b = np.asarray(r.tokens[:n]), np.asarray(s.tokens[:n])
            diff = np.nonzero(a != b)[0]
            common = int(diff[0]) if len(diff) else n
            if common // P > hit // P:
                return True
        return False

    def _slots(self, s: _Seq, start: int, stop: int) -> list[int]:
        P = self.page_size
        return [s.pages[i // P] * P + i % P for i in range(start, stop)]

    def _read_idx(self, rows: list[_Seq | None], S: int) -> np.ndarray:
        P = self.page_size
        out = np.zeros((len(rows), S), np.int32)
        offs = np.arange(P, dtype=np.int32)
        for r, s in enumerate(rows):
            if s is None:
                continue
            n = min(len(s.pages), S // P)
            out[r, :n * P] = (np.asarray(s.pages[:n], np.int32)[:, None] * P + offs).reshape(-1)
        return out

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        plan = []  # (seq, start, stop)
        for s in self._running:
            if budget <= 0:
                break
            if s.prefilling:
                n = min(s.target - s.computed, budget)
                plan.append((s, s.computed, s.computed + n))
                budget -= n
        if not plan:
            return
        nb = _bucket(len(plan), self.batch_buckets)
        T = _bucket(max(b - a for _, a, b in plan), self.chunk_buckets)
        S = _bucket(max(b for _, _, b in plan), self.kv_buckets)
        ids = np.zeros((nb, T), np.int32)
        pos = np.zeros((nb, T), np.int32)
        write = np.full((nb, T), self.pool_tokens, np.int32)  # out of range: dropped
        last = np.zeros((nb,), np.int32)
        rows: list[_Seq | None] = [None] * nb
        for r, (s, a, b) in enumerate(plan):
            ids[r, :b - a] = s.tokens[a:b]
            pos[r, :b - a] = np.arange(a, b)
            write[r, :b - a] = self._slots(s, a, b)
            last[r] = b - a - 1
            rows[r] = s
        t0 = time.perf_counter()
        tok = self._call("prefill", ids, pos, write, self._read_idx(rows, S), last, rows, np.zeros((nb,), np.int32))
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prefill_calls += 1
        for r, (s, a, b) in enumerate(plan):
            s.computed = b
            self.stats.prefilled_tokens += b - a
            self._register(s)
            if not s.prefilling and not s.generated:  # a resumed row already has its next token
                self._accept(s, int(tok[r]))

    def _grow(self, live: list[_Seq]) -> list[_Seq]:
        """Gives every decoding row the page its next token lands in; when pages run out the newest
        row is preempted (vLLM's recompute preemption): its full pages stay in the prefix cache, it
        goes back to the front of the queue and later resumes where it stopped, with the same tokens."""
        P = self.page_size
        for s in list(live):
            if s not in self._running:
                continue  # preempted below for an older row
            while (len(s.tokens) - 1) // P >= len(s.pages):
                if self.pool.available() == 0:
                    victim = self._running[-1]
                    self._preempt(victim)
                    if victim is s:
                        break
                    continue
                s.pages += self.pool.allocate(1)
        return [s for s in live if s in self._running]

    def _preempt(self, s: _Seq) -> None:
        self._running.remove(s)
        self.pool.release(s.pages)
        s.pages, s.block_ids, s.computed = [], [], 0
        self._waiting.appendleft(s)
        self.stats.preemptions += 1

    def _decode(self) -> None:
        live = self._grow([s for s in self._running if not s.prefilling])
        if not live:
            return
        nb = _bucket(len(live), self.batch_buckets)
        S = _bucket(max(len(s.tokens) for s in live), self.kv_buckets)
        ids = np.zeros((nb, 1), np.int32)
        pos = np.zeros((nb, 1), np.int32)
        write = np.full((nb, 1), self.pool_tokens, np.int32)
        steps = np.zeros((nb,), np.int32)
        rows: list[_Seq | None] = [None] * nb
        for r, s in enumerate(live):
            p = len(s.tokens) - 1  # the last sampled token: its KV is written now
            ids[r, 0], pos[r, 0], write[r, 0] = s.tokens[-1], p, self._slots(s, p, p + 1)[0]
            steps[r] = len(s.generated)
            rows[r] = s
        t0 = time.perf_counter()
        tok = self._call("decode", ids, pos, write, self._read_idx(rows, S), np.zeros((nb,), np.int32), rows, steps)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        for r, s in enumerate(live):
            s.computed = len(s.tokens)
            self._register(s)
            self._accept(s, int(tok[r]))

    def _register(self, s: _Seq) -> None:
        """Publishes s's newly completed full blocks to the prefix cache."""
        if not self.prefix_cache:
            return
        P = self.page_size
        for b in range(len(s.block_ids), s.computed // P):
            parent = s.block_ids[-1] if s.block_ids else -1
            s.block_ids.append(self.pool.register(s.pages[b], parent, s.tokens[b * P:(b + 1) * P]))

    def _accept(self, s: _Seq, token: int) -> None:
        """Takes one new token; finishes the request on EOS, a stop string or the limit."""
        reason = None
        if token in self.eos_ids:
            reason = "stop"
        else:
            s.generated.append(token)
            s.tokens.append(token)
            if s.params.repetition_penalty != 1.0:
                s.seen.add(token)
            if s.params.stop and hits_stop(self._decode_text, s.generated, s.params.stop):
                reason = "stop"
            elif len(s.generated) >= s.limit:
                reason = "length"
            if s.on_token is not None:
                try:
                    s.on_token(list(s.generated))
                except Exception:  # noqa: BLE001 - a broken stream must not stop the scheduler
                    log.exception("on_token callback failed; streaming stops for request %d", s.rid)
                    s.on_token = None
        if reason is None:
            return
        text = cut_at_stop(self._decode_text(s.generated), s.params.stop, s.params.include_stop_str_in_output)
        n_out = len(s.generated) + int(token in self.eos_ids)
        self.stats.generated_tokens += n_out
        self._running.remove(s)
        self.pool.release(s.pages)
        self._resolve(s.future, GenOutput(text, list(s.generated), len(s.prompt), n_out, reason,
                                          cached_tokens=s.cached))

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def reset_cache(self) -> None:
        """Forgets every cached prefix (e.g. after the model's weights change)."""
        self.pool.clear()

    def cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._pools)

