"""Device mesh and the logical-axis → mesh-axis rules.

Every parameter and large activation in automem_jax names its dimensions with logical axes
(`embed`, `heads`, `batch`, ...). One rules table maps those names to the physical mesh axes
`data`, `fsdp` and `tensor`, so changing the parallelism is a config change, never a code change.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters use the plain names; activations use `act_*` so the
# embed dimension can be FSDP-sharded in weights while activations stay sharded by batch only.
Rules = tuple[tuple[str, Any], ...]
DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)

# Serving (the inference engine): weights are replicated over `data` and never sharded on `embed`,
# so a decode step reads each chip's own shard of every matrix and all-gathers no weight; heads,
# KV heads, mlp and vocab split over `tensor` (Megatron-style: one all-reduce after o_proj and
# down_proj). Each `data` replica serves its own rows of the batch. The paged KV pool
# (`cache_tokens`) is replicated over `data` and split over `tensor` on its KV heads.
SERVING_RULES: Rules = tuple(
    {**dict(DEFAULT_RULES), "embed": None, "batch": "data", "cache_tokens": None}.items())

# Logical names of parameters (the rest are activations): the serving check "no weight on fsdp" uses it.
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "layers", "lora_rank")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    multi_host: bool = False  # call jax.distributed.initialize() before building the mesh
    coordinator_address: str | None = None  # None: let JAX auto-detect (TPU pods, SLURM)
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_any(cls, spec: "MeshConfig | Mapping | str | None") -> "MeshConfig":
        """Accepts a MeshConfig, a mapping (e.g. an ml_collections ConfigDict) or "fsdp=4,tensor=2"."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(**parse_axes(spec))
        fields = {f.name for f in dataclasses.fields(cls)}
        items = dict(spec.items() if hasattr(spec, "items") else spec)
        unknown = sorted(set(items) - fields)
        if unknown:
            raise ValueError(f"mesh config: unknown field(s) {unknown}; expected some of {sorted(fields)}")
        return cls(**items)

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        """Resolves -1 against the device count and checks the product."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh config: axis '{name}' must be a positive int or -1, got {size!r}")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise ValueError(f"mesh config: at most one axis may be -1, got {free}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if n_devices % fixed:
                raise ValueError(
                    f"mesh config: {n_devices} devices are not divisible by the fixed axes "
                    f"{ {k: v for k, v in sizes.items() if v != -1} } (product {fixed})")
            sizes[free[0]] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise ValueError(
                f"mesh config: axes {sizes} use {math.prod(sizes.values())} devices but {n_devices} are present")
        return sizes


def parse_axes(text: str) -> dict[str, int]:
    """'fsdp=64,tensor=2' -> {'fsdp': 64, 'tensor': 2}; unknown axes are an error."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh spec {text!r}: expected comma-separated axis=size with axes {MESH_AXES}, got {part!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {text!r}: size of '{name}' must be an integer, got {value!r}") from None
    return out


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host start-up: every host calls this before touching devices."""
    if not cfg.multi_host:
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {k: v for k, v in dict(coordinator_address=cfg.coordinator_address,
                                    num_processes=cfg.num_processes,
                                    process_id=cfg.process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(cfg: "MeshConfig | Mapping | str | None" = None, devices: Sequence | None = None) -> Mesh:
    cfg = MeshConfig.from_any(cfg)
    maybe_initialize_distributed(cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Topology-aware placement on TPU/GPU; fails for some device counts on CPU.
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - any layout failure falls back to plain order
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


SERVING_AXES = ("data", "tensor")


def serving_mesh_config(spec: "Mapping | str | None") -> MeshConfig:
    """The serving mesh shape from `inference.mesh` ({data, tensor}, -1 = the remaining devices).

    Serving has no fsdp axis (weights are not gathered per token): the mesh keeps the three axis
    names with fsdp=1, so one rules table vocabulary covers training and serving.
    """
    if spec is None:
        items: dict[str, Any] = {}
    elif isinstance(spec, str):
        items = parse_axes(spec)
    else:
        items = dict(spec.items() if hasattr(spec, "items") else spec)
    unknown = sorted(set(items) - set(SERVING_AXES))
    if unknown:
        raise ValueError(f"inference.mesh: unknown axis(es) {unknown}; the serving mesh has axes "
                         f"{SERVING_AXES} (weights are never fsdp-sharded for serving)")
    cfg = MeshConfig(data=items.get("data", -1), fsdp=1, tensor=items.get("tensor", 1))
    for name in SERVING_AXES:
        size = getattr(cfg, name)
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"inference.mesh.{name}: expected a positive int or -1, got {size!r}")
    if cfg.data == -1 and cfg.tensor == -1:
        raise ValueError("inference.mesh: at most one of data, tensor may be -1")
    return cfg


def make_serving_mesh(spec: "Mapping | str | None", devices: Sequence | None = None) -> Mesh:
    """`make_mesh` for serving: axes (data, fsdp=1, tensor) over `devices` (default: all)."""
    return make_mesh(serving_mesh_config(spec), devices=devices)


def serving_rules(overrides: Sequence[Sequence[Any]] | None = None) -> Rules:
    """SERVING_RULES with `inference.rules` overrides ([logical, mesh_axes] pairs) put in place."""
    extra = normalize_rules(overrides or ())
    table = dict(SERVING_RULES)
    unknown = sorted({name for name, _ in extra} - set(table))
    if unknown:
        raise ValueError(f"unknown logical axis name(s) {unknown}; expected some of {sorted(table)}")
    table.update(extra)
    return tuple(table.items())


def param_rules_on(rules: Rules, axis: str) -> list[str]:
    """The parameter logical names that `rules` maps onto mesh `axis` (serving wants none on fsdp)."""
    out = []
    for name, target in normalize_rules(rules):
        axes = target if isinstance(target, tuple) else (target,)
        if name in PARAM_AXES and axis in axes:
            out.append(name)
    return out


# --- logical axis rules ------------------------------------------------------------------------

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("automem_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: Rules | Sequence[Sequence[Any]]):
    """Overrides the rules table for code run inside (model init, activation constraints)."""
    token = _RULES.set(normalize_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    return _RULES.get()


def normalize_rules(rules) -> Rules:
    out = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"axis rule {item!r}: expected (logical_name, mesh_axes)")
        name, target = item
        if isinstance(target, list):
            target = tuple(target)
        for ax in (target if isinstance(target, tuple) else (target,)):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"axis rule for '{name}': unknown mesh axis {ax!r}; expected one of {MESH_AXES}")
        out.append((str(name), target))
    return tuple(out)


def _axis_size(mesh_shape: Mapping[str, int], target) -> int:
    if target is None:
        return 1
    axes = target if isinstance(target, tuple) else (target,)
    return math.prod(mesh_shape.get(a, 1) for a in axes)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None, rules: Rules | None = None) -> PartitionSpec:
    """Maps logical names to a PartitionSpec.

    A mesh axis is used at most once per array (first dimension wins), and when `shape` and
    `mesh_shape` are given a dimension the mesh axes do not divide is replicated instead of failing
    (e.g. 2 KV heads on tensor=4): a small model must still run on a big mesh.
    """
    if names is None:
        return PartitionSpec()
    table = dict(rules if rules is not None else current_rules())
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        axes = tuple(a for a in axes if a not in used and (mesh_shape is None or mesh_shape.get(a, 1) > 1))
        if axes and shape is not None and mesh_shape is not None and shape[i] % _axis_size(mesh_shape, axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names, shape=None, rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape), rules))


def _is_variable(x) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Rules | None = None):
    """NamedShardings for every Variable of an (abstract or concrete) NNX state."""
    def one(v):
        value = v.get_value() if _is_variable(v) else v
        names = v.get_metadata().get("logical_axes") if _is_variable(v) else None
        return named_sharding(mesh, names, getattr(value, "shape", None), rules)
    return jax.tree.map(one, state, is_leaf=_is_variable)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), current_rules())
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def bytes_per_device(shape: Sequence[int], itemsize: int, names, mesh_shape: Mapping[str, int],
                     rules: Rules | None = None) -> int:
    """Bytes of one shard of an array, computed from shapes only (no devices needed)."""
    spec = logical_to_spec(names, shape, mesh_shape, rules)
    n = 1
    for i, dim in enumerate(shape):
        target = spec[i] if i < len(spec) else None
        n *= math.ceil(dim / _axis_size(mesh_shape, target))
    return n * itemsize
