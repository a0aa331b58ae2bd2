"""The named Qwen configs (shapes of the Hugging Face Instruct checkpoints, plus a random tiny one)
and the CLI that describes one without allocating it:
`python -m automem_jax.models.qwen --preset qwen2.5-32b --describe --mesh fsdp=64`."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping

import jax.numpy as jnp

from automem_jax.models.qwen import QwenConfig


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


# --------------------------------------------------------------------------------------------
# CLI: python -m automem_jax.models.qwen (or .qwen_presets) --preset qwen2.5-32b --describe --mesh fsdp=64
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

