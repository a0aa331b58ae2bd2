"""Batched generation on the NNX Qwen with a slot-based KV cache.

The engine owns one KV cache of `max_batch` rows ("slots") x `max_len` positions. A `generate`
call queues its requests; every tick admits waiting requests into free slots (one jitted prefill
for all of them) and then advances every busy slot by one token (one jitted decode step), so a
finished slot takes the next request at once (continuous batching).

Prefix reuse: a slot keeps its tokens after its request finishes. A new prompt that starts with
the tokens a free slot still holds (the next turn of the same LOG/PLAN phase, whose chat extends
the previous one) is placed in that slot and only its new suffix is prefilled. Slots are
contiguous (token i at position i), so reuse is exact.

Compiles stay bounded: prefill shapes are bucketed (batch and length to powers of two), decode
has one shape. `stats.compiles` counts the distinct shapes compiled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automem_jax.agent.types import ChatRequest, Completion
from automem_jax.models.qwen import CACHE_AXES, KVCache, Qwen

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    max_tokens: int = 256
    stop: list[str] | None = None  # generation ends at the first of these strings
    seed: int | None = None  # None: derived from the engine seed and a request counter
    include_stop_str_in_output: bool = False

    def validate(self) -> None:
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.stop is not None and (not isinstance(self.stop, list) or
                                      not all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")

    @property
    def mode(self) -> str:
        if self.temperature <= 0:
            return "greedy"
        return "filtered" if (self.top_k > 0 or self.top_p < 1) else "sample"


def _batch_mode(params) -> str:
    modes = {p.mode for p in params}
    return "filtered" if "filtered" in modes else "sample" if "sample" in modes else "greedy"


@dataclasses.dataclass
class GenOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length", or "error"
    cached_tokens: int = 0  # prompt tokens reused from a slot's cache
    error: str | None = None


@dataclasses.dataclass
class EngineStats:
    compiles: int = 0
    prefill_calls: int = 0
    decode_steps: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _buckets(limit: int, start: int, linear_from: int | None = None) -> list[int]:
    """Powers of two from `start`; past `linear_from`, steps of `linear_from / 2` (less padding
    waste on long prompts for a few more compiles)."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b = b * 2 if linear_from is None or b < linear_from else b + linear_from // 2
    out.append(limit)
    return out


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


_NEG = -1e30


def _sample(logits, keys, steps, temp, top_p, top_k, mode: str):
    """One token per row; temperature 0 rows are greedy. `mode` (static) skips work no row needs:
    "greedy" draws no random numbers, "sample" skips the sort that top-k / top-p need."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    filtered = mode == "filtered"
    x = logits / jnp.maximum(temp, 1e-6)[:, None]
    if filtered:
        V = x.shape[-1]
        srt = -jnp.sort(-x, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
        srt = jnp.where(srt < kth, _NEG, srt)
        probs = jax.nn.softmax(srt, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = jnp.maximum(jnp.sum((cum - probs) < top_p[:, None], axis=-1), 1)
        thr = jnp.take_along_axis(srt, (keep - 1)[:, None], axis=-1)
        x = jnp.where(x < jnp.maximum(thr, kth), _NEG, x)
    sampled = jax.vmap(lambda key, s, row: jax.random.categorical(jax.random.fold_in(key, s), row))(keys, steps, x)
    return jnp.where(temp <= 0, greedy, sampled).astype(jnp.int32)


@dataclasses.dataclass
class _Slot:
    tokens: list[int] = dataclasses.field(default_factory=list)  # what the cache row holds, in order
    req: int | None = None  # request index while busy
    generated: list[int] = dataclasses.field(default_factory=list)
    params: SamplingParams | None = None
    key: np.ndarray | None = None
    last_used: float = 0.0
    prompt_len: int = 0
    limit: int = 0  # max new tokens for this request
    cached: int = 0


class Engine:
    """Continuous-batching generator. Not thread-safe: call it from one thread."""

    def __init__(self, model: Qwen, tokenizer, *, max_batch: int = 16, max_len: int = 2048,
                 mesh: jax.sharding.Mesh | None = None, seed: int = 0, prefix_reuse: bool = True,
                 min_prefix: int = 8, min_prefill_bucket: int = 32, model_name: str = "automem-policy",
                 chat_template_kwargs: dict | None = None):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len
        self.mesh = mesh
        self.prefix_reuse = prefix_reuse
        self.min_prefix = min_prefix
        self.model_name = model_name
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.stats = EngineStats()
        self._seen_shapes: set = set()
        self._counter = 0
        self._seed = seed
        eos = self.cfg.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for attr in ("eos_token_id", "pad_token_id"):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                eos.add(int(tid))
        self.eos_ids = eos
        self.batch_buckets = _buckets(max_batch, 1)
        self.len_buckets = _buckets(max_len, min(min_prefill_bucket, max_len), linear_from=1024)
        self.slots = [_Slot() for _ in range(max_batch)]
        self._graphdef, self._state = nnx.split(model)
        self._cache = self._new_cache()
        self._tokens = np.zeros((max_batch,), np.int32)
        self._build_fns()

    @classmethod
    def from_preset(cls, name: str = "tiny", *, seed: int = 0, tokenizer=None, **kw) -> "Engine":
        from automem_jax.models.qwen import init_model, preset
        from automem_jax.models.tokenizer import load_tokenizer
        model = init_model(preset(name), seed=seed)
        return cls(model, tokenizer or load_tokenizer(), seed=seed, model_name=name, **kw)

    # ---- device functions ----------------------------------------------------------------------
    def _new_cache(self) -> KVCache:
        cache = KVCache.init(self.cfg, self.max_batch, self.max_len)
        if self.mesh is None:
            return cache
        from automem_jax.parallel.mesh import named_sharding
        kv = named_sharding(self.mesh, CACHE_AXES, cache.k.shape)
        row = named_sharding(self.mesh, ("batch", "cache_length"), cache.mask.shape)
        vec = named_sharding(self.mesh, ("batch",), cache.index.shape)
        return KVCache(jax.device_put(cache.k, kv), jax.device_put(cache.v, kv), jax.device_put(cache.mask, row),
                       jax.device_put(cache.index, vec), jax.device_put(cache.pos, vec))

    def _build_fns(self):
        graphdef = self._graphdef
        S = self.max_len

        def prefill(state, cache, slots, ids, mask, start, keys, steps, temp, top_p, top_k, mode, kv_len):
            model = nnx.merge(graphdef, state)
            rows = lambda a: jnp.take(a, slots, axis=1, mode="clip")  # noqa: E731
            sub = KVCache(rows(cache.k), rows(cache.v), jnp.take(cache.mask, slots, axis=0, mode="clip"),
                          start, start)
            n = mask.sum(axis=1).astype(jnp.int32)
            logits, sub = model.forward_with_cache(ids, sub, mask, logits_at=jnp.maximum(n - 1, 0), kv_len=kv_len)
            tok = _sample(logits[:, 0], keys, steps, temp, top_p, top_k, mode)
            put = lambda full, part: full.at[:, slots].set(part, mode="drop")  # noqa: E731
            new = KVCache(put(cache.k, sub.k), put(cache.v, sub.v),
                          cache.mask.at[slots].set(sub.mask, mode="drop"),
                          cache.index.at[slots].set(start + n, mode="drop"),
                          cache.pos.at[slots].set(start + n, mode="drop"))
            return new, tok

        def decode(state, cache, tokens, active, keys, steps, temp, top_p, top_k, mode, kv_len):
            model = nnx.merge(graphdef, state)
            # Idle rows write their garbage at the last position, past anything reusable.
            idle_index = jnp.where(active, cache.index, S - 1)
            c = cache._replace(index=idle_index, pos=jnp.where(active, cache.pos, S - 1))
            logits, c = model.forward_with_cache(tokens[:, None], c, kv_len=kv_len)
            tok = _sample(logits[:, 0], keys, steps, temp, top_p, top_k, mode)
            c = c._replace(index=jnp.where(active, idle_index + 1, cache.index),
                           pos=jnp.where(active, c.pos, cache.pos))
            return c, tok

        self._prefill = jax.jit(prefill, static_argnums=(11, 12), donate_argnums=(1,))
        self._decode = jax.jit(decode, static_argnums=(9, 10), donate_argnums=(1,))

    def _mesh_ctx(self):
        import contextlib
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _note_shape(self, key) -> None:
        if key not in self._seen_shapes:
            self._seen_shapes.add(key)
            self.stats.compiles += 1

    # ---- public API ----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        from automem_jax.models.tokenizer import apply_chat_template
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt=True,
                                   **self.chat_template_kwargs)

    def generate(self, requests: Sequence[ChatRequest],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        outs = self.generate_full(requests, params)
        return [Completion(text=o.text, tokens_in=o.prompt_tokens, tokens_out=o.completion_tokens, error=o.error,
                           model_id=self.model_name) for o in outs]

    def generate_full(self, requests: Sequence[ChatRequest],
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenOutput]:
        plist = self._params_for(requests, params)
        prompts = []
        for r in requests:
            try:
                prompts.append(self.encode_chat(r.messages))
            except Exception as e:  # noqa: BLE001 - a malformed chat fails that request only
                prompts.append(e)
        return self.generate_ids(prompts, plist)

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
        outputs: list[GenOutput | None] = [None] * len(prompts)
        queue: deque[int] = deque()
        for i, (p, sp) in enumerate(zip(prompts, params)):
            problem = None
            if isinstance(p, Exception):
                problem = f"could not build the prompt: {p}"
            else:
                try:
                    sp.validate()
                except ValueError as e:
                    problem = str(e)
                if problem is None and len(p) == 0:
                    problem = "empty prompt"
                if problem is None and len(p) >= self.max_len:
                    problem = f"prompt has {len(p)} tokens; this engine holds at most {self.max_len - 1}"
            if problem:
                outputs[i] = GenOutput("", [], 0 if isinstance(p, Exception) else len(p), 0, "error", error=problem)
            else:
                queue.append(i)
        self.stats.requests += len(queue)
        while queue or any(s.req is not None for s in self.slots):
            free = [k for k, s in enumerate(self.slots) if s.req is None]
            if queue and free:
                self._admit(queue, free, prompts, params, outputs)
            if any(s.req is not None for s in self.slots):
                self._step(outputs)
        return outputs  # type: ignore[return-value]

    # ---- scheduling ----------------------------------------------------------------------------
    def _lcp(self, a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        if n == 0:
            return 0
        x, y = np.asarray(a[:n]), np.asarray(b[:n])
        diff = np.nonzero(x != y)[0]
        return int(diff[0]) if len(diff) else n

    def _admit(self, queue, free, prompts, params, outputs):
        chosen = []  # (req, slot, start)
        free = list(free)
        while queue and free:
            i = queue.popleft()
            prompt = prompts[i]
            best, best_lcp = None, -1
            if self.prefix_reuse:
                for k in free:
                    lcp = min(self._lcp(prompt, self.slots[k].tokens), len(prompt) - 1)
                    if lcp > best_lcp:
                        best, best_lcp = k, lcp
            if best is None or best_lcp < self.min_prefix:
                best = min(free, key=lambda k: (len(self.slots[k].tokens) > 0, self.slots[k].last_used))
                best_lcp = 0
            free.remove(best)
            chosen.append((i, best, best_lcp))
        # One suffix bucket for the whole prefill; rows that would run past the cache restart at 0.
        while True:
            Tb = _bucket(max(len(prompts[i]) - s for i, _, s in chosen), self.len_buckets)
            bad = [(i, k, s) for i, k, s in chosen if s and s + Tb > self.max_len]
            if not bad:
                break
            chosen = [(i, k, 0 if (i, k, s) in bad else s) for i, k, s in chosen]
        nb = _bucket(len(chosen), self.batch_buckets)
        ids = np.zeros((nb, Tb), np.int32)
        mask = np.zeros((nb, Tb), bool)
        slots = np.full((nb,), self.max_batch, np.int32)  # out of range: dropped on scatter
        start = np.zeros((nb,), np.int32)
        keys = np.zeros((nb, 2), np.uint32)
        temp = np.zeros((nb,), np.float32)
        top_p = np.ones((nb,), np.float32)
        top_k = np.zeros((nb,), np.int32)
        for r, (i, k, s) in enumerate(chosen):
            suffix = prompts[i][s:]
            ids[r, :len(suffix)] = suffix
            mask[r, :len(suffix)] = True
            slots[r], start[r] = k, s
            sp = params[i]
            seed = sp.seed if sp.seed is not None else self._seed * 1_000_003 + self._counter
            self._counter += 1
            key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
            keys[r], temp[r], top_p[r], top_k[r] = key, sp.temperature, sp.top_p, sp.top_k
            slot = self.slots[k]
            slot.req, slot.params, slot.key = i, sp, key
            slot.tokens = list(prompts[i])
            slot.generated = []
            slot.prompt_len = len(prompts[i])
            slot.limit = min(sp.max_tokens, self.max_len - len(prompts[i]))
            slot.cached = s
            self.stats.prompt_tokens += len(prompts[i])
            self.stats.cached_prompt_tokens += s
        mode = _batch_mode(params[i] for i, _, _ in chosen)
        # Attend only over slots some admitted row reaches (bucketed: a bounded number of shapes).
        kv_len = _bucket(max(s for _, _, s in chosen) + Tb, self.len_buckets)
        self._note_shape(("prefill", nb, Tb, mode, kv_len))
        t0 = time.perf_counter()
        with self._mesh_ctx():
            self._cache, tok = self._prefill(self._state, self._cache, jnp.asarray(slots), jnp.asarray(ids),
                                             jnp.asarray(mask), jnp.asarray(start), jnp.asarray(keys),
                                             jnp.zeros((nb,), jnp.int32), jnp.asarray(temp), jnp.asarray(top_p),
                                             jnp.asarray(top_k), mode, kv_len)
        tok = np.asarray(tok)
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prefill_calls += 1
        for r, (i, k, _) in enumerate(chosen):
            self._accept(k, int(tok[r]), outputs)

    def _step(self, outputs):
        B = self.max_batch
        active = np.array([s.req is not None for s in self.slots])
        keys = np.zeros((B, 2), np.uint32)
        steps = np.zeros((B,), np.int32)
        temp = np.zeros((B,), np.float32)
        top_p = np.ones((B,), np.float32)
        top_k = np.zeros((B,), np.int32)
        for k, s in enumerate(self.slots):
            if s.req is None:
                continue
            keys[k], steps[k] = s.key, len(s.generated)
            temp[k], top_p[k], top_k[k] = s.params.temperature, s.params.top_p, s.params.top_k
        mode = _batch_mode(s.params for s in self.slots if s.req is not None)
        # The longest busy row (prompt + generated so far) bounds the slots worth attending to.
        kv_len = _bucket(max(len(s.tokens) for s in self.slots if s.req is not None), self.len_buckets)
        self._note_shape(("decode", B, mode, kv_len))
        t0 = time.perf_counter()
        with self._mesh_ctx():
            self._cache, tok = self._decode(self._state, self._cache, jnp.asarray(self._tokens), jnp.asarray(active),
                                            jnp.asarray(keys), jnp.asarray(steps), jnp.asarray(temp),
                                            jnp.asarray(top_p), jnp.asarray(top_k), mode, kv_len)
        tok = np.asarray(tok)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        for k in np.nonzero(active)[0]:
            self._accept(int(k), int(tok[k]), outputs)

    def _accept(self, k: int, token: int, outputs) -> None:
        """Takes one new token for slot k; finishes the request on EOS, a stop string or the limit."""
        s = self.slots[k]
        self._tokens[k] = token
        reason = None
        if token in self.eos_ids:
            reason = "stop"
        else:
            s.generated.append(token)
            s.tokens.append(token)
            if s.params.stop and self._hits_stop(s):
                reason = "stop"
            elif len(s.generated) >= s.limit:
                reason = "length"
        if reason is None:
            return
        text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
        hits = [(text.find(x), x) for x in (s.params.stop or ()) if x in text]
        if hits:
            pos, stop = min(hits)
            text = text[: pos + (len(stop) if s.params.include_stop_str_in_output else 0)]
        is_eos = token in self.eos_ids
        n_out = len(s.generated) + int(is_eos)
        outputs[s.req] = GenOutput(text, list(s.generated), s.prompt_len, n_out, reason, cached_tokens=s.cached)
        self.stats.generated_tokens += n_out
        # The row holds the prompt and every generated token but the last sampled one (an EOS is
        # never appended); keep them for prefix reuse.
        written = len(s.tokens) - (0 if is_eos else 1)
        s.tokens = s.tokens[: min(written, self.max_len - 1)]
        s.req, s.params, s.generated, s.last_used = None, None, [], time.monotonic()

    def _hits_stop(self, s: _Slot) -> bool:
        longest = max(len(x) for x in s.params.stop)
        # A token is at least one character, so the last `longest` tokens cover any new match.
        tail = self.tokenizer.decode(s.generated[-(longest + 1):], skip_special_tokens=True)
        return any(x in tail for x in s.params.stop)

    def reset_cache(self) -> None:
        """Forgets every slot's tokens (e.g. after the model's weights change)."""
        for s in self.slots:
            s.tokens = []
