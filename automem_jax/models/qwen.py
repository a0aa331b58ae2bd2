"""Decoder-only Qwen2 / Qwen2.5 / Qwen3 in Flax NNX.

One module covers both families: Qwen2 has biases on q/k/v and no q/k norm; Qwen3 has RMSNorm on
each query and key head and no biases. Parameters keep Hugging Face's layout up to a transpose
(kernels are [in, out], attention kernels split the head axis), so the converter in `hf.py` is a
table of names. Every parameter carries `logical_axes` metadata and large activations are
constrained with logical names (see `automem_jax.parallel.mesh`). `QwenConfig` (Hugging Face
config.json in and out, parameter and FLOP accounting) is here; the named presets and the CLI that
describes them are `qwen_presets.py`.

Two call paths:
  * `model(input_ids, attention_mask=None, positions=None)` -> logits [B, T, V]; training and scoring.
  * `model.forward_with_cache(input_ids, cache, attention_mask, positions)` -> (logits, cache); the
    KV cache is a plain pytree (`KVCache`), so the generation engine can jit and donate it.
"""

from __future__ import annotations

import dataclasses
import math
import runpy
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from automem_jax.models.lora import add_lora
from automem_jax.parallel.mesh import constrain

REMAT_POLICIES = ("none", "full", "save_dots")
ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    # architecture (mirrors the Hugging Face config.json fields)
    arch: str = "qwen3"  # "qwen2" (Qwen2 / Qwen2.5) or "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = True
    max_position_embeddings: int = 40960
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    initializer_range: float = 0.02
    # runtime (not part of the exported architecture)
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of parameters
    scan_layers: bool = False  # one scanned layer body: compile time flat in depth
    remat: str = "none"  # none | full | save_dots (recompute all but matmul outputs)
    attn_chunk: int = 512  # query block size of causal block-skipping attention; 0 = one block

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"QwenConfig.arch: expected one of {sorted(ARCHS)}, got {self.arch!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"QwenConfig.remat: expected one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"QwenConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"QwenConfig.{name}: unknown dtype {getattr(self, name)!r}") from None

    def replace(self, **kw) -> "QwenConfig":
        return dataclasses.replace(self, **kw)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    # ---- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | Mapping[str, Any], **overrides) -> "QwenConfig":
        """Reads a transformers config (dict, config.json path, or folder with config.json; local or gs://),
        or a .gguf file's metadata, or `pkg:<name>`'s."""
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
            where = "config"
        else:
            from automem_jax import storage
            from automem_jax.models import gguf, packaged
            p = packaged.resolve(str(path_or_dict))
            if gguf.is_gguf(p):
                with gguf.GGUFModel.open(p) as g:
                    return cls.from_hf(g.hf_config(), **overrides)
            if not p.endswith(".json"):
                p = storage.join(p, "config.json")
            where = p
            d = storage.read_json(p, missing="no config.json; expected a Hugging Face model folder")
        model_type = d.get("model_type")
        if model_type not in ARCHS:
            archs = d.get("architectures")
            raise ValueError(f"{where}: unsupported model_type {model_type!r} (architectures={archs}); "
                             f"supported: {sorted(ARCHS)}")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: unsupported hidden_act {d['hidden_act']!r}; expected 'silu'")
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true is not supported")
        # transformers v5 nests RoPE settings in rope_parameters; v4 has rope_theta + rope_scaling.
        theta = d.get("rope_theta")
        for field in ("rope_parameters", "rope_scaling"):
            rope = d.get(field) or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in (None, "default"):
                raise ValueError(f"{where}: unsupported RoPE scaling {rope_type!r} (field {field}); "
                                 "only default RoPE is implemented")
            theta = rope.get("rope_theta", theta)
        theta = 10000.0 if theta is None else theta
        heads = d["num_attention_heads"]
        qwen3 = model_type == "qwen3"
        kw = dict(
            arch=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", False)) if qwen3 else True,
            o_bias=bool(d.get("attention_bias", False)) if qwen3 else False,
            qk_norm=qwen3,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": [ARCHS[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype if self.param_dtype in ("float32", "bfloat16", "float16") else "float32",
        }
        if self.arch == "qwen3":
            d["head_dim"] = self.head_dim
            d["attention_bias"] = self.qkv_bias
        elif self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError("Qwen2 configs require head_dim * num_heads == hidden_size for export")
        return d

    # ---- accounting ---------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """'path/to/param' -> (shape, logical axes), read off the abstract (unallocated) model."""
        abstract = abstract_model(self.replace(scan_layers=True))
        out = {}
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
            out["/".join(map(str, path))] = (tuple(var.get_value().shape), var.get_metadata()["logical_axes"])
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s, _ in self.param_shapes().values())

    def flops_per_token(self, seq_len: int, *, lora_params: int = 0, frozen_base: bool = False,
                        lm_head: bool = True) -> float:
        """Training FLOPs per token (forward + backward) at context length `seq_len`; MaxText's accounting.

        A matmul weight costs 2 FLOPs per token forward, 2 for the input gradient and 2 for its own
        gradient: 6. `frozen_base=True` (LoRA) drops the weight gradient of every base matmul, so
        they count 4; `lora_params` adapter weights (trained) count 6 each. `lm_head=False` leaves
        out the vocab projection, for a caller that projects only some positions (it costs the
        difference of the two calls per projected position). Causal attention (QK^T and PV over
        seq_len/2 keys on average) is 2*2*heads*head_dim*seq_len/2 per layer forward and twice that
        backward, with or without LoRA (its inputs are activations). Embedding lookups, norms and
        biases are not matmuls and are not counted; neither is rematerialised work.
        """
        shapes = self.param_shapes()
        # The embedding lookup is not a matmul; a tied embedding counts once, as the LM head.
        head = math.prod(shapes["embed_tokens" if self.tie_word_embeddings else "lm_head"][0])
        n_matmul = sum(math.prod(shape) for name, (shape, _) in shapes.items()
                       if not name.endswith(("scale", "bias")) and name not in ("embed_tokens", "lm_head"))
        if lm_head:
            n_matmul += head
        attn = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2
        return (4 if frozen_base else 6) * n_matmul + 6 * lora_params + attn


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


if __name__ == "__main__":  # the CLI lives with the presets it describes
    runpy.run_module("automem_jax.models.qwen_presets", run_name="__main__")
