"""LoRA adapters for the NNX Qwen: add, train, merge.

`apply_lora(model, LoRAConfig(...))` attaches a low-rank pair (A, B) to every targeted projection as
`nnx.LoRAParam` variables next to the base kernel (`q_lora_a`, `q_lora_b`, ...). LoRAParam is a
Param subclass, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only the adapters and the
base weights stay bit-identical. The forward (`qwen.Attention` / `qwen.MLP`) adds
`alpha/r * (dropout(x) @ A) @ B` in the compute dtype, the same update as PEFT's LoRA layer.

Shapes keep the base kernel's split axes so every adapter is sharded like its base weight:
  q/k/v: A [embed, r]            B [r, heads, head_dim]
  o:     A [heads, head_dim, r]  B [r, embed]
  mlp:   A [in, r]               B [r, out]
with a leading `layers` axis when the model is scanned, so lax.scan slices adapters per layer.

Dropout is off unless a key is in scope: inside the (jitted) training step write
`with lora.dropout_rng(key): loss = loss_fn(model, batch)`. The key is read when the forward is
traced, so enter the scope inside the traced function with the key as one of its arguments;
a scope entered outside a jit is baked into that jit's cached trace.

`merge_lora(model)` folds the adapters into the kernels for a plain export (`hf.save_pretrained`);
`hf.save_peft_adapter` / `hf.load_peft_adapter` write and read PEFT's adapter folder format.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from automem_jax.parallel.mesh import constrain, named_sharding

# Projection short name -> (sub-module attribute of a decoder layer, number of input dims of the kernel).
PROJECTIONS: dict[str, tuple[str, int]] = {
    "q": ("self_attn", 1), "k": ("self_attn", 1), "v": ("self_attn", 1), "o": ("self_attn", 2),
    "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1),
}
ORDER = tuple(PROJECTIONS)
# The transformers module name of each projection (PEFT's target_modules).
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
              "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# LLaMA-Factory's aliases; ALL is every linear layer but lm_head (PEFT's "all-linear").
TARGETS: dict[str, tuple[str, ...]] = {
    "ATTN": ("q", "k", "v", "o"),
    "QV": ("q", "v"),
    "MLP": ("gate", "up", "down"),
    "ALL": ORDER,
}
_PROJ_ID = {name: i for i, name in enumerate(ORDER)}  # folded into dropout keys: one mask per projection


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """'ATTN' | 'QV' | 'MLP' | 'ALL' | 'all-linear' | 'q,v,down' | ['q_proj', 'v_proj'] -> canonical tuple."""
    if isinstance(targets, str):
        alias = targets.strip()
        if alias.upper() in TARGETS:
            return TARGETS[alias.upper()]
        if alias == "all-linear":
            return TARGETS["ALL"]
        items = [t for t in (p.strip() for p in alias.split(",")) if t]
    else:
        items = [str(t).strip() for t in targets]
    by_hf = {v: k for k, v in HF_MODULES.items()}
    chosen = set()
    for t in items:
        name = by_hf.get(t, t)
        if name not in PROJECTIONS:
            raise ValueError(f"LoRAConfig.targets: unknown projection {t!r}; expected one of {sorted(TARGETS)} "
                             f"or a comma-separated list of {list(ORDER)} (or their HF names {list(HF_MODULES.values())})")
        chosen.add(name)
    if not chosen:
        raise ValueError(f"LoRAConfig.targets: no projection selected in {targets!r}")
    return tuple(n for n in ORDER if n in chosen)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8  # r: inner dimension of each adapter
    alpha: float = 16.0  # scaling = alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # dropout on the adapter input, only inside a `dropout_rng` scope
    targets: str | tuple[str, ...] = "ATTN"  # ATTN | QV | MLP | ALL | explicit list "q,v,down"
    param_dtype: str = "float32"  # adapters are tiny: keep f32 masters even for bf16 base weights

    def __post_init__(self):
        if isinstance(self.targets, list):  # keep the frozen config hashable
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank: expected a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha: expected a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout: expected a number in [0, 1), got {self.dropout!r}")
        parse_targets(self.targets)
        try:
            jnp.dtype(self.param_dtype)
        except TypeError:
            raise ValueError(f"LoRAConfig.param_dtype: unknown dtype {self.param_dtype!r}") from None

    @property
    def modules(self) -> tuple[str, ...]:
        """Targeted projections in canonical order, e.g. ('q', 'k', 'v', 'o')."""
        return parse_targets(self.targets)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


class LoRASeed(nnx.Variable):
    """Per-layer integer folded into dropout keys (stacked over `layers` when scanned): distinct masks
    per layer even though a scanned body is traced once. Not a Param, so never trained or exported."""


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("automem_lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_rng(key: jax.Array | None) -> Iterator[None]:
    """Turns on LoRA dropout for forwards traced inside the block (training); None turns it off."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def add_lora(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y + scale * (dropout(x) @ A) @ B when `module` has an adapter `name`, else y unchanged.

    x holds the projection input with the kernel's input dims last ([B, T, H], or [B, T, heads, head_dim]
    for o); the result has y's shape. Computed in x's (compute) dtype.
    """
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    dt = x.dtype
    rate = module.lora_dropout
    key = _DROPOUT_KEY.get()
    if key is not None and rate > 0:
        key = jax.random.fold_in(jax.random.fold_in(key, module.lora_seed[...]), _PROJ_ID[name])
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(dt)
    A = a[...].astype(dt)
    B = getattr(module, f"{name}_lora_b")[...].astype(dt)
    h = jnp.tensordot(x, A, axes=A.ndim - 1)
    h = constrain(h, ("batch", "length", "lora_rank")) * jnp.asarray(module.lora_scale, dt)
    return y + jnp.tensordot(h, B, axes=1).astype(y.dtype)


# --------------------------------------------------------------------------------------------
# Adding, inspecting and merging adapters
# --------------------------------------------------------------------------------------------


def decoder_layers(model) -> list[tuple[int | None, nnx.Module]]:
    """(layer index, decoder layer); a scanned model has one stacked layer with index None."""
    if model.cfg.scan_layers:
        return [(None, model.layers)]
    return list(enumerate(model.layers))


def _model_mesh(model):
    """The mesh the model's weights live on, or None for single-device weights."""
    sh = getattr(model.embed_tokens[...], "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
        return sh.mesh
    return None


def has_lora(model) -> bool:
    return len(jax.tree.leaves(lora_state(model))) > 0


def lora_state(model) -> nnx.State:
    """The adapter parameters only (what an adapter checkpoint or optimizer needs)."""
    return nnx.state(model, nnx.LoRAParam)


def lora_modules(model) -> tuple[str, ...]:
    """Projections that carry adapters, in canonical order."""
    found = set()
    for _, layer in decoder_layers(model):
        for name, (sub, _) in PROJECTIONS.items():
            if getattr(getattr(layer, sub), f"{name}_lora_a", None) is not None:
                found.add(name)
    return tuple(n for n in ORDER if n in found)


def adapter_shapes(kernel: nnx.Variable, n_in: int, rank: int, stacked: bool):
    """((A shape, A axes), (B shape, B axes), fan_in) for one (possibly stacked) kernel."""
    shape = tuple(kernel.get_value().shape)
    axes = tuple(kernel.get_metadata()["logical_axes"])
    lead_s, lead_a = (shape[:1], axes[:1]) if stacked else ((), ())
    shape, axes = (shape[1:], axes[1:]) if stacked else (shape, axes)
    a = ((*lead_s, *shape[:n_in], rank), (*lead_a, *axes[:n_in], "lora_rank"))
    b = ((*lead_s, rank, *shape[n_in:]), (*lead_a, "lora_rank", *axes[n_in:]))
    return a, b, math.prod(shape[:n_in])


def apply_lora(model, lcfg: LoRAConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None, rules=None):
    """Adds adapters to every targeted projection (in place) and returns the model.

    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform with a=sqrt(5)) and B = 0, so the
    adapted model starts equal to the base. With a mesh (default: the mesh the weights already live
    on) adapters are created directly in the shardings their logical axes give.
    """
    if not isinstance(lcfg, LoRAConfig):
        raise TypeError(f"apply_lora: expected a LoRAConfig, got {type(lcfg).__name__}")
    if has_lora(model):
        raise ValueError(f"apply_lora: the model already has LoRA adapters on {list(lora_modules(model))}; "
                         "merge_lora() them first or start from the base model")
    mesh = mesh if mesh is not None else _model_mesh(model)
    cfg = model.cfg
    r, pdt = lcfg.rank, jnp.dtype(lcfg.param_dtype)
    L = cfg.num_layers

    specs = {}  # key -> (shape, axes, init kind, fan_in, layer index or None, projection)
    for i, layer in decoder_layers(model):
        for name in lcfg.modules:
            sub, n_in = PROJECTIONS[name]
            kernel = getattr(getattr(layer, sub), f"{name}_kernel")
            (a_s, a_ax), (b_s, b_ax), fan_in = adapter_shapes(kernel, n_in, r, stacked=i is None)
            specs[f"{i}/{name}/a"] = (a_s, a_ax, fan_in, i, name)
            specs[f"{i}/{name}/b"] = (b_s, b_ax, fan_in, i, name)

    def make():
        key = jax.random.key(seed)
        out = {}
        for k, (shape, _, fan_in, i, name) in specs.items():
            if k.endswith("/b"):
                out[k] = jnp.zeros(shape, pdt)
                continue
            bound = 1.0 / math.sqrt(fan_in)
            pkey = jax.random.fold_in(key, _PROJ_ID[name])

            def one(layer_idx, shape=shape[1:] if i is None else shape, pkey=pkey, bound=bound):
                return jax.random.uniform(jax.random.fold_in(pkey, layer_idx), shape, jnp.float32, -bound, bound)

            # Layer l of a scanned model gets the same values as layer l of an unscanned one.
            out[k] = (jax.vmap(one)(jnp.arange(L)) if i is None else one(i)).astype(pdt)
        return out

    if mesh is None:
        values = jax.jit(make)()
        seed_sh = None
    else:
        shardings = {k: named_sharding(mesh, ax, s, rules) for k, (s, ax, *_) in specs.items()}
        with jax.set_mesh(mesh):
            values = jax.jit(make, out_shardings=shardings)()
        seed_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    for i, layer in decoder_layers(model):
        for sub in sorted({PROJECTIONS[n][0] for n in lcfg.modules}):
            mod = getattr(layer, sub)
            # Static attributes: part of the graphdef, identical for every layer of a scan.
            mod.lora_scale = lcfg.scale
            mod.lora_dropout = float(lcfg.dropout)
            ids = jnp.arange(L, dtype=jnp.int32) if i is None else jnp.asarray(i, jnp.int32)
            if seed_sh is not None:
                ids = jax.device_put(ids, seed_sh)
            mod.lora_seed = LoRASeed(ids, logical_axes=("layers",) if i is None else ())
        for name in lcfg.modules:
            mod = getattr(layer, PROJECTIONS[name][0])
            for ab in ("a", "b"):
                k = f"{i}/{name}/{ab}"
                setattr(mod, f"{name}_lora_{ab}", nnx.LoRAParam(values[k], logical_axes=specs[k][1]))
    return model


def merge_lora(model, inplace: bool = False):
    """The model with `kernel += alpha/r * A @ B` (float32, cast to the kernel dtype, sharding kept)
    and every adapter removed, ready for `hf.save_pretrained`. Copies the module tree unless inplace
    (arrays are shared, nothing is copied on device)."""
    if not inplace:
        model = nnx.clone(model)

    for i, layer in decoder_layers(model):
        for sub in ("self_attn", "mlp"):
            mod = getattr(layer, sub)
            if not hasattr(mod, "lora_scale"):
                continue
            for name, (s, _) in PROJECTIONS.items():
                if s != sub or getattr(mod, f"{name}_lora_a", None) is None:
                    continue
                kernel = getattr(mod, f"{name}_kernel")
                kv = kernel[...]
                # One kernel at a time: peak memory is one extra kernel, not a second model.
                new = _fold_fn(i is None, getattr(kv, "sharding", None))(
                    kv, getattr(mod, f"{name}_lora_a")[...], getattr(mod, f"{name}_lora_b")[...], mod.lora_scale)
                kernel.set_value(new)
            _remove_adapters(mod)
    return model


@functools.lru_cache(maxsize=None)
def _fold_fn(stacked: bool, sharding):
    """Jitted kernel + scale * A @ B, cached so the layers of an unscanned model share one compile."""
    def fold(kernel, a, b, scale):
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1,
                              precision=jax.lax.Precision.HIGHEST)
        return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return jax.jit(jax.vmap(fold, in_axes=(0, 0, 0, None)) if stacked else fold, out_shardings=sharding)


def without_lora(model, inplace: bool = False):
    """The base model: adapters dropped, kernels untouched (e.g. to export the base next to a PEFT adapter)."""
    if not inplace:
        model = nnx.clone(model)
    for _, layer in decoder_layers(model):
        for sub in ("self_attn", "mlp"):
            _remove_adapters(getattr(layer, sub))
    return model


def _remove_adapters(mod) -> None:
    if not hasattr(mod, "lora_scale"):
        return
    for name in PROJECTIONS:
        for ab in ("a", "b"):
            if hasattr(mod, f"{name}_lora_{ab}"):
                delattr(mod, f"{name}_lora_{ab}")
    for attr in ("lora_seed", "lora_scale", "lora_dropout"):
        delattr(mod, attr)


def adapter_arrays(model) -> dict[tuple[int, str], tuple[jax.Array, jax.Array]]:
    """(layer, projection) -> (A, B) for one layer (slices of stacked adapters when scanned)."""
    out = {}
    for i, layer in decoder_layers(model):
        for name, (sub, _) in PROJECTIONS.items():
            mod = getattr(layer, sub)
            a = getattr(mod, f"{name}_lora_a", None)
            if a is None:
                continue
            b = getattr(mod, f"{name}_lora_b")
            if i is None:
                for l in range(model.cfg.num_layers):
                    out[(l, name)] = (a[...][l], b[...][l])
            else:
                out[(i, name)] = (a[...], b[...])
    return out


def lora_scale(model) -> float | None:
    """alpha / r of the model's adapters, or None without adapters."""
    for _, layer in decoder_layers(model):
        for sub in ("self_attn", "mlp"):
            s = getattr(getattr(layer, sub), "lora_scale", None)
            if s is not None:
                return s
    return None
