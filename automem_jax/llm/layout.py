"""Per-chip memory of the serving layout, from shapes only (no devices, no weights).

The inference engine serves under its own mesh (`inference.mesh`: data x tensor) and rules
(`SERVING_RULES`: weights replicated over data, split over tensor, never on embed). What one chip
holds while it serves:

- weights: every parameter's shard under the serving rules (`bytes_per_device` over
  `QwenConfig.param_shapes()`), in the parameter dtype;
- KV pool: per layer two pools `k`, `v` of `[cache_tokens, kv_heads, head_dim]`
  (`("cache_tokens", "act_kv_heads", "head_dim")`: replicated over data, KV heads over tensor);
- temporaries of the larger compiled step. Decode: the keys and values of one layer gathered for
  `max_batch` rows x `max_len`, the f32 scores `max_batch x heads/tensor x max_len` and the f32 logits
  `max_batch x vocab/tensor`. Prefill: f32 scores of `prefill_chunk` query tokens against `max_len`
  keys per heads/tensor, the gathered keys and values of its rows, and their logits. Rows are counted
  whole on every chip (not split over data), which over-counts when the batch shards: headroom.

`serving_memory(...)` returns the breakdown; `.check(device_bytes)` raises ValueError naming the term
that does not fit. `DEVICE_MEMORY` holds the memory of the chips the configs target
(`inference.device_kind`).

    python -m automem_jax.llm.layout --config=configs/crafter_qwen25_32b.py --devices=32
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

GiB = 1024 ** 3

# Memory per chip (JAX device), by the name configs carry in `inference.device_kind`. Nominal
# figures; the runtime reserves a little of each, which the check's headroom covers.
DEVICE_MEMORY: dict[str, int] = {
    "tpu v5p": 95 * GiB,
    "tpu v5e": 16 * GiB,
    "tpu v5 lite": 16 * GiB,  # what JAX reports as device_kind for a v5e chip
    "tpu v6e": 32 * GiB,
    "tpu v6 lite": 32 * GiB,
    "tpu v4": 32 * GiB,
    "tpu v3": 16 * GiB,
    "a100": 40 * GiB,
    "a100-80gb": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * GiB,
    "b200": 180 * GiB,
}


def device_memory(kind: str) -> int:
    """Bytes per chip for a `DEVICE_MEMORY` name or a JAX `device_kind` ("TPU v5p", "NVIDIA H100 80GB HBM3")."""
    k = " ".join(str(kind).lower().replace("_", " ").split())
    if k in DEVICE_MEMORY:
        return DEVICE_MEMORY[k]
    if "a100" in k and "80" in k:
        return DEVICE_MEMORY["a100-80gb"]
    for name in ("h200", "h100", "b200", "a100"):
        if name in k:
            return DEVICE_MEMORY[name]
    raise ValueError(f"device kind {kind!r}: unknown; expected one of {', '.join(DEVICE_MEMORY)}")


def _shard(n: int, name: str, mesh_axes: Mapping[str, int], rules) -> int:
    """Size of one dimension of n on one chip under the rules (replicated when the mesh does not divide it)."""
    from automem_jax.parallel.mesh import bytes_per_device
    return bytes_per_device((n,), 1, (name,), mesh_axes, rules)


class ServingMemory(dict):
    """Bytes per chip: weights, kv_pool, temporaries (max of decode/prefill), total; plus the inputs."""

    TERMS = ("weights", "kv_pool", "temporaries")

    def check(self, device_bytes: int, headroom: float = 0.9) -> "ServingMemory":
        """Raises ValueError naming the first term whose running sum passes headroom x device_bytes."""
        budget = headroom * device_bytes
        running = 0
        for term in self.TERMS:
            running += self[term]
            if running > budget:
                raise ValueError(
                    f"serving memory per chip does not fit: {term} ({_gib(self[term])}) brings the total to "
                    f"{_gib(running)} > {headroom:g} x {_gib(device_bytes)} = {_gib(budget)} "
                    f"[{self.describe()}]; {_HINTS[term]}")
        return self

    def describe(self) -> str:
        parts = [f"{t} {_gib(self[t])}" for t in self.TERMS]
        n = self["engines"]
        head = f"{n} engines x (weights + kv_pool) + temporaries" if n > 1 else "weights + kv_pool + temporaries"
        return f"{head}: " + ", ".join(parts) + f"; total {_gib(self['total'])}"

    def row(self) -> dict[str, str]:
        return {k: _gib(self[k]) for k in (*self.TERMS, "total")}


_HINTS = {
    "weights": "shard the weights over more chips (a larger inference.mesh.tensor)",
    "kv_pool": "lower inference.cache_tokens (or max_batch x max_len), or raise inference.mesh.tensor",
    "temporaries": "lower inference.max_batch, inference.max_len or inference.prefill_chunk",
}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def serving_memory(model_cfg, mesh_axes: Mapping[str, int], rules=None, *, max_batch: int, max_len: int,
                   cache_tokens: int | None = None, page_size: int = 16, prefill_chunk: int = 512,
                   dtype: str | None = None, engines: int = 1) -> ServingMemory:
    """Bytes per chip of the serving layout (see the module docstring).

    model_cfg: a `QwenConfig`; weights are counted in its `param_dtype`. mesh_axes: resolved axis
    sizes ({"data": 8, "tensor": 4}; missing axes are 1). rules: default `SERVING_RULES`.
    cache_tokens: KV pool tokens (0/None = max_batch x max_len), rounded up to whole pages.
    dtype: KV cache and activation dtype (default the model's compute dtype).
    engines: engines held at once (the two-model eval holds the specialist's and the base model's):
    each holds its weights and pool; their steps run one at a time, so temporaries count once.
    """
    import jax.numpy as jnp

    from automem_jax.parallel.mesh import SERVING_RULES, bytes_per_device, normalize_rules
    rules = SERVING_RULES if rules is None else normalize_rules(rules)
    mesh_axes = {k: int(v) for k, v in dict(mesh_axes).items()}
    if any(v < 1 for v in mesh_axes.values()):
        raise ValueError(f"mesh_axes {mesh_axes}: resolve -1 against the device count first")
    for name, v in (("max_batch", max_batch), ("max_len", max_len), ("page_size", page_size),
                    ("prefill_chunk", prefill_chunk), ("engines", engines)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    cache_tokens = cache_tokens or max_batch * max_len
    cache_tokens = -(-cache_tokens // page_size) * page_size
    p_item = jnp.dtype(model_cfg.param_dtype).itemsize
    kv_item = jnp.dtype(dtype or model_cfg.dtype).itemsize
    L, K, D = model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim

    weights = sum(bytes_per_device(shape, p_item, names, mesh_axes, rules)
                  for shape, names in model_cfg.param_shapes().values())
    kv_pool = 2 * L * bytes_per_device((cache_tokens, K, D), kv_item, ("cache_tokens", "act_kv_heads", "head_dim"),
                                       mesh_axes, rules)
    kv_heads = _shard(K, "act_kv_heads", mesh_axes, rules)
    heads = _shard(model_cfg.num_heads, "act_heads", mesh_axes, rules)
    vocab = _shard(model_cfg.vocab_size, "act_vocab", mesh_axes, rules)

    def gathered_kv(rows: int) -> int:  # one layer's keys + values for `rows` rows up to max_len
        return 2 * rows * max_len * kv_heads * D * kv_item

    decode = {"kv": gathered_kv(max_batch), "scores": max_batch * heads * max_len * 4,
              "logits": max_batch * vocab * 4}
    rows = min(max_batch, prefill_chunk)
    prefill = {"kv": gathered_kv(rows), "scores": prefill_chunk * heads * max_len * 4, "logits": rows * vocab * 4}
    temporaries = max(sum(decode.values()), sum(prefill.values()))
    out = ServingMemory(
        weights=engines * weights, kv_pool=engines * kv_pool, temporaries=temporaries,
        total=engines * (weights + kv_pool) + temporaries,
        weights_per_engine=weights, kv_pool_per_engine=kv_pool,
        decode_temporaries=sum(decode.values()), prefill_temporaries=sum(prefill.values()),
        decode_terms=decode, prefill_terms=prefill, engines=engines, cache_tokens=cache_tokens,
        kv_bytes_per_token=kv_pool // cache_tokens, mesh_axes=mesh_axes)
    return out


def serving_memory_for_config(c, n_devices: int, *, model_cfg=None, engines: int = 1) -> ServingMemory:
    """serving_memory() for a main-job config (ml_collections) on `n_devices` chips.

    model_cfg: the loaded model's QwenConfig; default the config's preset shapes."""
    from automem_jax.models import qwen_presets
    from automem_jax.parallel.mesh import serving_mesh_config, serving_rules
    inf = c.inference
    if model_cfg is None:  # the preset's shapes (a checkpoint's config.json gives the same for its preset)
        model_cfg = qwen_presets.preset(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype)
    axes = serving_mesh_config(inf.mesh.to_dict() if hasattr(inf.mesh, "to_dict") else inf.mesh).axis_sizes(n_devices)
    return serving_memory(model_cfg, axes, serving_rules(_rules_list(inf.rules)), max_batch=inf.max_batch,
                          max_len=inf.max_len, cache_tokens=inf.cache_tokens or None, page_size=inf.page_size,
                          prefill_chunk=inf.prefill_chunk, dtype=c.model.dtype, engines=engines)


def _rules_list(rules) -> Sequence:
    return [tuple(r) for r in (rules or ())]


def main(argv=None) -> int:
    import argparse
    import importlib.util
    ap = argparse.ArgumentParser(prog="python -m automem_jax.llm.layout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a configs/*.py file")
    ap.add_argument("--devices", type=int, required=True, help="chips in the slice")
    ap.add_argument("--engines", type=int, default=2, help="engines held at once (two-model eval: 2)")
    a = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("_cfg", a.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    m = serving_memory_for_config(c, a.devices, engines=a.engines)
    print(m.describe())
    kind = c.inference.get("device_kind", "")
    if kind:
        try:
            m.check(device_memory(kind))
        except ValueError as e:
            print(e)
            return 1
        print(f"fits {kind} ({_gib(device_memory(kind))} per chip) with 10% headroom")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
