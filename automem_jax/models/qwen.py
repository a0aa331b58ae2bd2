"""Decoder-only Qwen2 / Qwen2.5 / Qwen3 in Flax NNX.

One module covers both families: Qwen2 has biases on q/k/v and no q/k norm; Qwen3 has RMSNorm on
each query and key head and no biases. Parameters keep Hugging Face's layout up to a transpose
(kernels are [in, out], attention kernels split the head axis), so the converter in `hf.py` is a
table of names. Every parameter carries `logical_axes` metadata and large activations are
constrained with logical names (see `automem_jax.parallel.mesh`). The architecture's numbers
(`QwenConfig`, the presets) live in `qwen_config.py`.

Two call paths:
  * `model(input_ids, attention_mask=None, positions=None)` -> logits [B, T, V]; training and scoring.
  * `model.forward_with_cache(input_ids, cache, attention_mask, positions)` -> (logits, cache); the
    KV cache is a plain pytree (`KVCache`), so the generation engine can jit and donate it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from automem_jax.models.lora import add_lora
from automem_jax.models.qwen_config import PRESETS, QwenConfig, preset
from automem_jax.parallel.mesh import constrain

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, init, shape, dtype, axes, stack: int | None) -> nnx.Param:
    """A parameter with logical axes; `stack` prepends a scanned `layers` dimension."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    key = None if rngs is None else rngs.params()
    return nnx.Param(init(key, shape, dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: QwenConfig, stack: int | None = None):
        self.eps = eps
        self.scale = _param(None, lambda _, shape, dt: jnp.ones(shape, dt), (dim,), cfg.param_dtype, ("norm",), stack)

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply; keep that order for parity.
        return self.scale[...].astype(dtype) * x32.astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos/sin of shape [B, T, head_dim/2] in float32 for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention) on x [B, T, N, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.cfg = cfg
        H, Q, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.initializer_range)
        zeros = nnx.initializers.zeros
        pd = cfg.param_dtype
        self.q_kernel = _param(rngs, init, (H, Q, D), pd, ("embed", "heads", "head_dim"), stack)
        self.k_kernel = _param(rngs, init, (H, K, D), pd, ("embed", "kv_heads", "head_dim"), stack)
        self.v_kernel = _param(rngs, init, (H, K, D), pd, ("embed", "kv_heads", "head_dim"), stack)
        self.o_kernel = _param(rngs, init, (Q, D, H), pd, ("heads", "head_dim", "embed"), stack)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, zeros, (Q, D), pd, ("heads", "head_dim"), stack)
            self.k_bias = _param(rngs, zeros, (K, D), pd, ("kv_heads", "head_dim"), stack)
            self.v_bias = _param(rngs, zeros, (K, D), pd, ("kv_heads", "head_dim"), stack)
        if cfg.o_bias:
            self.o_bias = _param(rngs, zeros, (H,), pd, ("embed",), stack)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, cfg, stack)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, cfg, stack)

    def _proj(self, x, kernel, bias, names, lora=None):
        dt = self.cfg.compute_dtype
        y = jnp.einsum("bth,hnd->btnd", x, kernel[...].astype(dt))
        if lora is not None:  # LoRA delta when `lora.apply_lora` added an adapter here
            y = add_lora(self, lora, x, y)
        if bias is not None:
            y = y + bias[...].astype(dt)
        return constrain(y, names)

    def __call__(self, x, cos, sin, kv_mask, q_slots, cache_kv=None, write_index=None, paged=None):
        """x [B,T,H]. Returns (out [B,T,H], (k, v) written into the cache or this call's k, v).

        kv_mask [B, S] marks valid key slots; q_slots [B, T] is each query's slot index, so that
        key slot s is visible to a query at slot q iff s <= q and kv_mask[b, s].
        `paged` = (k_pool, v_pool, write_idx, read_idx) switches to a paged cache (see `PagedKV`).
        """
        cfg = self.cfg
        q = self._proj(x, self.q_kernel, getattr(self, "q_bias", None), ("batch", "length", "act_heads", "head_dim"), "q")
        k = self._proj(x, self.k_kernel, getattr(self, "k_bias", None), ("batch", "length", "act_kv_heads", "head_dim"), "k")
        v = self._proj(x, self.v_kernel, getattr(self, "v_bias", None), ("batch", "length", "act_kv_heads", "head_dim"), "v")
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if paged is not None:
            return self._paged(q, k, v, q_slots, *paged)
        if cache_kv is not None:
            ck, cv = cache_kv
            upd = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new, i, axis=0))
            ck = upd(ck, k.astype(ck.dtype), write_index)
            cv = upd(cv, v.astype(cv.dtype), write_index)
            # Attend over the first kv_mask.shape[1] slots only (see forward_with_cache's kv_len).
            S = kv_mask.shape[1]
            keys, values, new_kv = ck[:, :S].astype(q.dtype), cv[:, :S].astype(q.dtype), (ck, cv)
        else:
            keys, values, new_kv = k, v, None

        B, T, Qh, D = q.shape
        S = keys.shape[1]
        C = cfg.attn_chunk
        if not C or T <= C:
            out = _attend(q, keys, values, kv_mask, q_slots)
        else:
            # Causal blocks: query block i never sees past its last slot, which is at most
            # S - T + (i+1)*C (every row's writes end by slot S). Skipping those keys halves the work
            # and bounds the score tensor at [B, heads, C, S].
            outs = []
            for lo in range(0, T, C):
                hi = min(lo + C, T)
                kv_hi = S - T + hi
                outs.append(_attend(q[:, lo:hi], keys[:, :kv_hi], values[:, :kv_hi], kv_mask[:, :kv_hi],
                                    q_slots[:, lo:hi]))
            out = jnp.concatenate(outs, axis=1)
        return self._out(out), new_kv

    def _out(self, out):
        out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
        y = add_lora(self, "o", out, jnp.einsum("btnd,ndh->bth", out, self.o_kernel[...].astype(out.dtype)))
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(y.dtype)
        return constrain(y, ("batch", "length", "act_embed"))

    def _paged(self, q, k, v, q_pos, k_pool, v_pool, write_idx, read_idx):
        """Writes this call's keys/values into the pools at `write_idx` [B, T] (out of range =
        padding, dropped), then attends over the tokens at `read_idx` [B, S]: a row's pages in
        order, so key j sits at position j and is visible to a query at position p iff j <= p."""
        k_pool = k_pool.at[write_idx].set(k.astype(k_pool.dtype), mode="drop")
        v_pool = v_pool.at[write_idx].set(v.astype(v_pool.dtype), mode="drop")
        names = ("batch", "length", "act_kv_heads", "head_dim")
        keys = constrain(k_pool.at[read_idx].get(mode="clip"), names).astype(q.dtype)
        values = constrain(v_pool.at[read_idx].get(mode="clip"), names).astype(q.dtype)
        out = _attend(q, keys, values, jnp.ones(read_idx.shape, bool), q_pos)
        return self._out(out), (k_pool, v_pool)


def _attend(q, keys, values, kv_mask, q_slots):
    """Softmax attention with GQA; key slot s is visible to a query at slot q iff s <= q and kv_mask."""
    B, T, Qh, D = q.shape
    S, Kh = keys.shape[1], keys.shape[2]
    qg = q.reshape(B, T, Kh, Qh // Kh, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32) * (D ** -0.5)
    visible = (jnp.arange(S)[None, None, :] <= q_slots[:, :, None]) & kv_mask[:, None, :]
    scores = jnp.where(visible[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(B, T, Qh, D)


class MLP(nnx.Module):
    def __init__(self, cfg: QwenConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.cfg = cfg
        H, F = cfg.hidden_size, cfg.intermediate_size
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate_kernel = _param(rngs, init, (H, F), cfg.param_dtype, ("embed", "mlp"), stack)
        self.up_kernel = _param(rngs, init, (H, F), cfg.param_dtype, ("embed", "mlp"), stack)
        self.down_kernel = _param(rngs, init, (F, H), cfg.param_dtype, ("mlp", "embed"), stack)

    def __call__(self, x):
        dt = x.dtype
        g = add_lora(self, "gate", x, x @ self.gate_kernel[...].astype(dt))  # add_lora: no-op without adapters
        u = add_lora(self, "up", x, x @ self.up_kernel[...].astype(dt))
        h = constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return constrain(add_lora(self, "down", h, h @ self.down_kernel[...].astype(dt)), ("batch", "length", "act_embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenConfig, rngs: nnx.Rngs, stack: int | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, stack)
        self.self_attn = Attention(cfg, rngs, stack)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, stack)
        self.mlp = MLP(cfg, rngs, stack)

    def __call__(self, x, cos, sin, kv_mask, q_slots, cache_kv=None, write_index=None, paged=None):
        h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, kv_mask, q_slots, cache_kv, write_index,
                                   paged)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


class KVCache(NamedTuple):
    """Functional KV cache. k/v: [L, B, S, kv_heads, head_dim]; mask: [B, S] valid slots;
    index: [B] next write slot per row; pos: [B] RoPE position of the next token per row."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array
    pos: jax.Array

    @classmethod
    def init(cls, cfg: QwenConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        # Separate buffers for k and v: the engine donates the cache to its jitted steps.
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool), jnp.zeros((batch,), jnp.int32),
                   jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


CACHE_AXES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")
# One layer's paged pool: [num_pages * page_size, kv_heads, head_dim]; token t of page p at p * size + t.
PAGE_POOL_AXES = ("cache_tokens", "act_kv_heads", "head_dim")


def _remat_policy(name: str):
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None  # "full": save nothing but the layer inputs


class Qwen(nnx.Module):
    """Qwen2/Qwen3 causal LM. Parameters follow `QwenConfig.param_shapes()`."""

    def __init__(self, cfg: QwenConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype),
                                      logical_axes=("vocab", "embed"))
        if cfg.scan_layers:
            self.layers = DecoderLayer(cfg, rngs, stack=cfg.num_layers)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype),
                                     logical_axes=("embed", "vocab"))

    # ---- public API ---------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Logits [B, T, V] (float32) for a (possibly padded) batch without a cache."""
        B, T = input_ids.shape
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(mask)
        return self._logits(self.hidden_states(input_ids, mask, positions), normed=True)

    def hidden_states(self, input_ids, attention_mask=None, positions=None):
        """Final-norm hidden states [B, T, H] in the compute dtype, without the vocab projection.

        Training projects only the target positions (`logits_from_hidden`): at a 16k cutoff the
        full [B, T, vocab] float32 tensor would be ~10 GB per sequence.
        """
        B, T = input_ids.shape
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(mask)
        q_slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self._run_layers(self._embed(input_ids), positions, mask, q_slots, None, None)[0]
        return self.norm(x)

    def logits_from_hidden(self, h):
        """float32 logits [..., V] for normed hidden states [B, K, H] from `hidden_states`."""
        return self._logits(h, normed=True)

    def forward_with_cache(self, input_ids, cache: KVCache, attention_mask=None, positions=None, logits_at=None,
                           kv_len: int | None = None):
        """Appends T tokens per row at slots cache.index[b]...; returns (logits [B,T,V], new cache).

        Prefill: a padded batch (left or right padding) into an empty cache. Decode: T=1 per step.
        Padding tokens are written but masked out, so every row keeps its own positions.
        `logits_at` [B] (token index per row) returns only those logits, [B, 1, V]: a prefill needs
        the last prompt token's, and the full [B, T, vocab] tensor would dominate its cost.
        `kv_len` (static) limits attention to the first kv_len cache slots; the caller guarantees
        every row's tokens end before it (index + T <= kv_len), which saves the work of empty slots.
        """
        B, T = input_ids.shape
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = cache.pos[:, None] + default_positions(mask)
        q_slots = cache.index[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        upd = jax.vmap(lambda m, new, i: jax.lax.dynamic_update_slice_in_dim(m, new, i, axis=0))
        kv_mask = upd(cache.mask, mask, cache.index)
        attn_mask = kv_mask if kv_len is None else kv_mask[:, :kv_len]
        x, k, v = self._run_layers(self._embed(input_ids), positions, attn_mask, q_slots, (cache.k, cache.v),
                                   cache.index)
        n_real = mask.sum(axis=1).astype(jnp.int32)
        last_pos = jnp.max(jnp.where(mask, positions, -1), axis=1) + 1
        new_cache = KVCache(k, v, kv_mask, cache.index + T, jnp.where(n_real > 0, last_pos, cache.pos))
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
        return self._logits(x), new_cache

    def forward_paged(self, input_ids, positions, pools, write_idx, read_idx, logits_at=None):
        """T new tokens per row against a paged KV cache; the serving engine's one call path.

        pools: per layer (k_pool, v_pool), each [num_pages * page_size, kv_heads, head_dim]; a
        non-scanned model only (the engine unstacks scanned weights). positions [B, T]: each token's
        position in its sequence. write_idx [B, T]: pool slot of each new token (>= pool size for
        padding). read_idx [B, S]: pool slot of each of the row's first S positions (any in-range
        slot past the row's end: masked by position). Writes land in place when the caller donates
        the pools, so a step costs what it reads, not the pool's size.
        Returns (logits [B, T or 1, V], new pools).
        """
        if self.cfg.scan_layers:
            raise ValueError("forward_paged needs per-layer weights; build the model with scan_layers=False")
        cfg = self.cfg
        x = self._embed(input_ids)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        new_pools = []
        for layer, (kp, vp) in zip(self.layers, pools):
            x, kv = layer(x, cos, sin, None, positions, paged=(kp, vp, write_idx, read_idx))
            new_pools.append(kv)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
        return self._logits(x), new_pools

    # ---- internals ----------------------------------------------------------------------------
    def _embed(self, ids):
        # Gather from a table replicated along embed: a gather from an FSDP-sharded embed dim makes
        # XLA fall back to full rematerialisation.
        table = constrain(self.embed_tokens[...], ("vocab", None))
        x = jnp.take(table, ids, axis=0).astype(self.cfg.compute_dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def _logits(self, x, normed: bool = False):
        if not normed:
            x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            logits = jnp.einsum("bth,vh->btv", x, self.embed_tokens[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bth,hv->btv", x, self.lm_head[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def _run_layers(self, x, positions, kv_mask, q_slots, cache_kv, write_index):
        cfg = self.cfg
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

        def make_body(graphdef):
            def body(layer_state, h, layer_kv):
                return nnx.merge(graphdef, layer_state)(h, cos, sin, kv_mask, q_slots, layer_kv, write_index)
            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=_remat_policy(cfg.remat))
            return body

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            body = make_body(graphdef)

            def step(h, xs):
                return body(xs[0], h, xs[1])

            x, new_kv = jax.lax.scan(step, x, (state, cache_kv))
            return (x, None, None) if cache_kv is None else (x, new_kv[0], new_kv[1])

        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
            x, new_kv = make_body(graphdef)(state, x, layer_kv)
            if new_kv is not None:
                ks.append(new_kv[0])
                vs.append(new_kv[1])
        return (x, None, None) if cache_kv is None else (x, jnp.stack(ks), jnp.stack(vs))


def default_positions(mask: jax.Array) -> jax.Array:
    """RoPE positions that skip padding: the i-th real token of a row gets position i."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


# --------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------


def abstract_model(cfg: QwenConfig) -> Qwen:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Qwen(cfg, nnx.Rngs(0)))


def init_model(cfg: QwenConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None, rules=None) -> Qwen:
    """Random init; with a mesh, each parameter is created directly in its sharding."""
    if mesh is None:
        return Qwen(cfg, nnx.Rngs(seed))
    from automem_jax.parallel.mesh import state_shardings
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(abs_state, mesh, rules)

    def make():
        return nnx.state(Qwen(cfg, nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# CLI: python -m automem_jax.models.qwen --preset qwen2.5-32b --describe --mesh fsdp=64
# --------------------------------------------------------------------------------------------


def describe(cfg: QwenConfig, mesh_axes: Mapping[str, int] | None = None, rules=None) -> str:
    from automem_jax.parallel.mesh import bytes_per_device
    mesh_axes = dict(mesh_axes or {})
    n_dev = math.prod(mesh_axes.values()) if mesh_axes else 1
    from automem_jax.parallel.mesh import logical_to_spec
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    total = 0
    per_dev = 0
    per_dev_f32 = 0
    lines = []
    for name, (shape, axes) in cfg.param_shapes().items():
        n = math.prod(shape)
        total += n
        b = bytes_per_device(shape, itemsize, axes, mesh_axes, rules)
        per_dev += b
        per_dev_f32 += bytes_per_device(shape, 4, axes, mesh_axes, rules)
        spec = logical_to_spec(axes, shape, mesh_axes, rules)
        lines.append(f"  {name:40s} {str(shape):26s} {str(axes):44s} -> {spec}")
    gib = 1024 ** 3
    head = [
        f"model: {cfg.arch}  layers={cfg.num_layers} hidden={cfg.hidden_size} heads={cfg.num_heads}/"
        f"{cfg.num_kv_heads} head_dim={cfg.head_dim} mlp={cfg.intermediate_size} vocab={cfg.vocab_size} "
        f"tied={cfg.tie_word_embeddings} qkv_bias={cfg.qkv_bias} qk_norm={cfg.qk_norm} rope_theta={cfg.rope_theta:g}",
        f"parameters: {total:,} ({total / 1e9:.3f}B)",
        f"mesh: {mesh_axes or {'(single device)': 1}}  devices={n_dev}",
        f"parameter bytes per device ({cfg.param_dtype}): {per_dev / gib:.3f} GiB "
        f"(total {total * itemsize / gib:.2f} GiB)",
        f"full fine-tuning state per device (f32 master + AdamW mu, nu): {3 * per_dev_f32 / gib:.3f} GiB",
    ]
    return "\n".join(head + ["parameters (name, shape, logical axes -> mesh spec):"] + lines)


def main(argv=None) -> int:
    from automem_jax.parallel.mesh import parse_axes
    ap = argparse.ArgumentParser(prog="python -m automem_jax.models.qwen",
                                 description="Describe a Qwen preset without allocating it.")
    ap.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    ap.add_argument("--describe", action="store_true", help="print parameter count and bytes per device")
    ap.add_argument("--mesh", default="", help="mesh axes, e.g. fsdp=64 or data=2,fsdp=16,tensor=4")
    ap.add_argument("--param_dtype", default="bfloat16", help="storage dtype used for the byte count")
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset, param_dtype=args.param_dtype)
        axes = parse_axes(args.mesh)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.describe:
        ap.print_help()
        return 0
    print(describe(cfg, axes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

