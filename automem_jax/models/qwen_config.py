"""The Qwen architecture's numbers: `QwenConfig` (Hugging Face config.json in and out, parameter
and FLOP accounting) and the named presets. The model itself is `qwen.py`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

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
        from automem_jax.models.qwen import abstract_model  # the model module builds on this one
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


def _qwen25(hidden, layers, heads, kv, mlp, vocab, tied):
    return QwenConfig(arch="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied, qkv_bias=True,
                      qk_norm=False, max_position_embeddings=32768, eos_token_id=151645)


def _qwen3(hidden, layers, heads, kv, mlp, tied):
    return QwenConfig(arch="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=mlp,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=tied, qkv_bias=False, qk_norm=True,
                      max_position_embeddings=40960, eos_token_id=151645)


# Shapes follow the Hugging Face Instruct checkpoints (the paper's policy is Qwen2.5-32B-Instruct).
PRESETS: dict[str, QwenConfig] = {
    # Random test/laptop model over the real Qwen3 tokenizer vocabulary.
    "tiny": QwenConfig(arch="qwen3", vocab_size=151936, hidden_size=128, intermediate_size=384,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": _qwen25(5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": _qwen25(5120, 64, 40, 8, 27648, 152064, False),
    "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 8, 6144, True),
    "qwen3-4b": _qwen3(2560, 36, 32, 8, 9728, True),
    "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288, False),
    "qwen3-14b": _qwen3(5120, 40, 40, 8, 17408, False),
    "qwen3-32b": _qwen3(5120, 64, 64, 8, 25600, False),
}


def preset(name: str, **overrides) -> QwenConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
