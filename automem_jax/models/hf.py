"""Hugging Face interop: import safetensors folders (or GGUF files, `models/gguf.py`, and packaged
`pkg:<name>` checkpoints, `models/packaged.py`) into the NNX Qwen, export back.

Import reads one tensor at a time and places it straight into its target sharding
(`jax.make_array_from_callback`), so no host ever holds the whole model; gs:// shards are
downloaded one file at a time. Export gathers one tensor at a time and writes sharded
safetensors + index that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    model, config = load_pretrained(path, dtype="bfloat16", mesh=None)
    save_pretrained(model, config, out_dir, tokenizer=None)
    save_peft_adapter(model, config, lora_config, out_dir)   # PEFT LoRA folder; load_peft_adapter reads one
    python -m automem_jax.models.hf {import,export,inspect} ...   # import x.gguf --format hf --out folder
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automem_jax import storage
from automem_jax.models.qwen import Qwen, abstract_model
from automem_jax.models.qwen import QwenConfig
from automem_jax.parallel.mesh import named_sharding

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights.
IGNORED_TENSORS = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Our parameter (path inside one layer, or global) <-> one HF tensor."""

    ours: str
    hf: str
    to_ours: Callable[[np.ndarray, QwenConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, QwenConfig], np.ndarray]


def _same(x, cfg):
    return x


def _t(x, cfg):
    return np.ascontiguousarray(x.T)


def _rules(cfg: QwenConfig) -> tuple[list[_Rule], list[_Rule]]:
    """(global rules, per-layer rules); layer rules' HF names have a `{i}` slot."""
    Q, K, D, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

    def in_heads(n):  # HF [n*D, H] -> ours [H, n, D]
        return (lambda x, c: np.ascontiguousarray(x.T.reshape(H, n, D)),
                lambda x, c: np.ascontiguousarray(x.reshape(H, n * D).T))

    def bias_heads(n):
        return (lambda x, c: x.reshape(n, D), lambda x, c: x.reshape(n * D))

    glob = [_Rule("embed_tokens", "model.embed_tokens.weight", _same, _same),
            _Rule("norm/scale", "model.norm.weight", _same, _same)]
    if not cfg.tie_word_embeddings:
        glob.append(_Rule("lm_head", "lm_head.weight", _t, _t))
    p = "model.layers.{i}."
    layer = [
        _Rule("input_layernorm/scale", p + "input_layernorm.weight", _same, _same),
        _Rule("post_attention_layernorm/scale", p + "post_attention_layernorm.weight", _same, _same),
        _Rule("self_attn/q_kernel", p + "self_attn.q_proj.weight", *in_heads(Q)),
        _Rule("self_attn/k_kernel", p + "self_attn.k_proj.weight", *in_heads(K)),
        _Rule("self_attn/v_kernel", p + "self_attn.v_proj.weight", *in_heads(K)),
        _Rule("self_attn/o_kernel", p + "self_attn.o_proj.weight",
              lambda x, c: np.ascontiguousarray(x.T.reshape(Q, D, H)),
              lambda x, c: np.ascontiguousarray(x.reshape(Q * D, H).T)),
        _Rule("mlp/gate_kernel", p + "mlp.gate_proj.weight", _t, _t),
        _Rule("mlp/up_kernel", p + "mlp.up_proj.weight", _t, _t),
        _Rule("mlp/down_kernel", p + "mlp.down_proj.weight", _t, _t),
    ]
    if cfg.qkv_bias:
        layer += [_Rule("self_attn/q_bias", p + "self_attn.q_proj.bias", *bias_heads(Q)),
                  _Rule("self_attn/k_bias", p + "self_attn.k_proj.bias", *bias_heads(K)),
                  _Rule("self_attn/v_bias", p + "self_attn.v_proj.bias", *bias_heads(K))]
    if cfg.o_bias:
        layer.append(_Rule("self_attn/o_bias", p + "self_attn.o_proj.bias", _same, _same))
    if cfg.qk_norm:
        layer += [_Rule("self_attn/q_norm/scale", p + "self_attn.q_norm.weight", _same, _same),
                  _Rule("self_attn/k_norm/scale", p + "self_attn.k_norm.weight", _same, _same)]
    return glob, layer


def expected_tensors(cfg: QwenConfig) -> dict[str, tuple[tuple[str, int | None], _Rule]]:
    """HF tensor name -> ((our param path, layer index or None), rule)."""
    glob, layer = _rules(cfg)
    out = {r.hf: ((r.ours, None), r) for r in glob}
    for i in range(cfg.num_layers):
        for r in layer:
            out[r.hf.format(i=i)] = ((r.ours, i), r)
    return out


def _key(cfg: QwenConfig, ours: str, layer: int | None) -> str:
    """Flat path of our parameter; scanned layers share one stacked parameter."""
    if layer is None:
        return ours
    return f"layers/{ours}" if cfg.scan_layers else f"layers/{layer}/{ours}"


# --------------------------------------------------------------------------------------------
# Reading a folder
# --------------------------------------------------------------------------------------------


class _Folder:
    """Tensor name -> file, from model.safetensors or the sharded index (local or gs://)."""

    def __init__(self, path: str):
        self.path = str(path)
        names = storage.listdir(self.path)
        if not names and not storage.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such model folder")
        if INDEX_FILE in names:
            idx_path = storage.join(self.path, INDEX_FILE)
            index = storage.read_json(idx_path)
            try:
                weight_map = index["weight_map"]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{idx_path}: not a valid safetensors index ({e})") from None
            self.weight_map: dict[str, str] = dict(weight_map)
        elif SINGLE_FILE in names:
            from safetensors import safe_open
            with storage.local_file(storage.join(self.path, SINGLE_FILE)) as local, \
                    safe_open(local, framework="numpy") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                    f"(files: {names[:10]})")

    def close(self) -> None:
        """Nothing held open (GGUFModel's counterpart holds memory maps)."""

    def by_file(self, tensor_names) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for name in tensor_names:
            groups[self.weight_map[name]].append(name)
        return dict(sorted(groups.items()))


def _check_names(cfg: QwenConfig, folder: _Folder) -> dict:
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in folder.weight_map]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{folder.path}: missing tensor(s) {missing[:5]}{more} for a {cfg.arch} model "
                         f"with {cfg.num_layers} layers")
    unexpected = [n for n in folder.weight_map if n not in expected
                  and not n.endswith(IGNORED_TENSORS) and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if unexpected:
        raise ValueError(f"{folder.path}: unexpected tensor(s) {unexpected[:5]} — not part of a {cfg.arch} "
                         "model with this config.json (wrong architecture or layer count?)")
    return expected


def _place(value: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _gguf_or_folder(path: str) -> str:
    """`pkg:<name>` resolved; a folder whose weights are one model.gguf (no safetensors) -> that file."""
    from automem_jax.models import gguf, packaged
    path = packaged.resolve(str(path))
    if not gguf.is_gguf(path) and not storage.exists(storage.join(path, SINGLE_FILE)) \
            and not storage.exists(storage.join(path, INDEX_FILE)) \
            and storage.exists(storage.join(path, packaged.GGUF_FILE)):
        return storage.join(path, packaged.GGUF_FILE)
    return path


def _open_source(path: str, overrides: dict):
    """(config, tensor source with .path / .weight_map / by_file, opener of one file's tensors)
    for a HF folder, a .gguf file, or a folder holding one model.gguf (pkg:<name> resolves to one)."""
    from automem_jax.models import gguf
    path = _gguf_or_folder(path)
    if gguf.is_gguf(path):
        g = gguf.GGUFModel.open(path)
        try:
            cfg = QwenConfig.from_hf(g.hf_config(), **overrides)
        except BaseException:
            g.close()
            raise
        return cfg, g, lambda fname: contextlib.nullcontext(g)
    cfg = QwenConfig.from_hf(path, **overrides)
    folder = _Folder(path)

    @contextlib.contextmanager
    def open_file(fname):
        from safetensors import safe_open
        with storage.local_file(storage.join(folder.path, fname)) as local, safe_open(local, framework="numpy") as f:
            yield f
    return cfg, folder, open_file


def load_pretrained(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, *,
                    param_dtype: str | None = None, rules=None, **config_overrides) -> tuple[Qwen, QwenConfig]:
    """Builds the NNX Qwen from a HF folder, a .gguf file (dequantized to `param_dtype`) or
    `pkg:<name>`. `dtype` sets compute and (unless `param_dtype` is given) storage dtype; other
    keyword arguments override QwenConfig fields (e.g. scan_layers)."""
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
        overrides.setdefault("param_dtype", param_dtype or dtype)
    elif param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg, folder, open_file = _open_source(path, overrides)
    values: dict[str, Any] = {}
    stacked: dict[str, list] = defaultdict(lambda: [None] * cfg.num_layers)
    try:
        expected = _check_names(cfg, folder)
        graphdef, abs_state = nnx.split(abstract_model(cfg))
        abs_flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(abs_state)}
        shardings = {}
        if mesh is not None:
            shardings = {k: named_sharding(mesh, v.get_metadata().get("logical_axes"), v.get_value().shape, rules)
                         for k, v in abs_flat.items()}
        pdt = jnp.dtype(cfg.param_dtype)
        for fname, names in folder.by_file(n for n in expected).items():
            with open_file(fname) as f:
                for name in names:
                    (ours, layer), rule = expected[name]
                    key = _key(cfg, ours, layer)
                    want = abs_flat[key].get_value().shape
                    if cfg.scan_layers and layer is not None:
                        want = want[1:]
                    raw = f.get_tensor(name)
                    try:
                        arr = rule.to_ours(raw, cfg)
                    except ValueError:
                        arr = None
                    if arr is None or arr.shape != tuple(want):
                        raise ValueError(f"{folder.path}: tensor {name} has shape {tuple(raw.shape)}; "
                                         f"the config implies a tensor that maps to {tuple(want)}")
                    arr = np.asarray(arr).astype(pdt)
                    sh = shardings.get(key)
                    if cfg.scan_layers and layer is not None:
                        per_layer = None if sh is None else jax.sharding.NamedSharding(
                            sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
                        stacked[key][layer] = _place(arr, per_layer)
                    else:
                        values[key] = _place(arr, sh)
                    del raw, arr
    finally:
        folder.close()  # a GGUF's memory maps
    for key, parts in stacked.items():
        sh = shardings.get(key)
        stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sh) if sh is not None else \
            (lambda *xs: jnp.stack(xs))
        values[key] = stack(*parts)
        parts.clear()

    state = abs_state
    for path, var in nnx.to_flat_state(state):
        var.set_value(values["/".join(map(str, path))])
    return nnx.merge(graphdef, state), cfg


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _gather(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_pretrained(model: Qwen, config: QwenConfig | None, out_dir: str, tokenizer=None, *,
                    max_shard_size: int | str = "2GB", dtype: str | None = None) -> list[str]:
    """Writes config.json, generation_config.json, sharded safetensors + index and (optionally)
    tokenizer files to a local or gs:// folder. Returns the file names written."""
    from safetensors.numpy import save_file

    cfg = config or model.cfg
    if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        # Writing only the base kernels would silently drop the fine-tuning.
        raise ValueError("save_pretrained: the model has LoRA adapters; export lora.merge_lora(model), "
                         "or the base model plus save_peft_adapter(...)")
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    if out_dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"export dtype {out_dtype.name!r}: expected float32, bfloat16 or float16")
    state = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    expected = expected_tensors(cfg)

    def fetch(name: str) -> np.ndarray:
        (ours, layer), rule = expected[name]
        x = state[_key(cfg, ours, layer)]
        if layer is not None and cfg.scan_layers:
            x = x[layer]
        return rule.to_hf(_gather(x).astype(out_dtype), cfg)

    def nbytes(name: str) -> int:
        (ours, layer), _ = expected[name]
        shape = state[_key(cfg, ours, layer)].shape
        if layer is not None and cfg.scan_layers:
            shape = shape[1:]
        return math.prod(shape) * out_dtype.itemsize

    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name in expected:
        n = nbytes(name)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n

    written = []
    is_writer = jax.process_index() == 0
    # Every host joins the gathers below; the others write nothing (a scratch folder stays empty).
    folder = storage.local_dir_for_writing(out_dir) if is_writer else tempfile.TemporaryDirectory()
    with folder as local:
        total = len(shards)
        weight_map = {}
        for k, names in enumerate(shards):
            fname = SINGLE_FILE if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            tensors = {name: fetch(name) for name in names}  # every host joins the gathers
            if is_writer:
                save_file(tensors, os.path.join(local, fname), metadata={"format": "pt"})
                written.append(fname)
            weight_map.update({name: fname for name in names})
            del tensors
        if not is_writer:
            return []
        if total > 1:
            index = {"metadata": {"total_size": sum(nbytes(n) for n in expected)}, "weight_map": weight_map}
            _write_json(os.path.join(local, INDEX_FILE), index)
            written.append(INDEX_FILE)
        hf_cfg = cfg.to_hf()
        hf_cfg["torch_dtype"] = out_dtype.name
        _write_json(os.path.join(local, "config.json"), hf_cfg)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
               "temperature": 1.0}
        _write_json(os.path.join(local, "generation_config.json"), gen)
        written += ["config.json", "generation_config.json"]
        if tokenizer is not None:
            written += [os.path.basename(p) for p in tokenizer.save_pretrained(local)]
    return written


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
# PEFT's saved keys: the PeftModel prefix, no adapter name (peft strips "default" when saving).
_PEFT_KEY = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"


def _peft_key(i: int, name: str, ab: str) -> str:
    from automem_jax.models.lora import HF_MODULES, PROJECTIONS
    return _PEFT_KEY.format(i=i, module=f"{PROJECTIONS[name][0]}.{HF_MODULES[name]}", ab=ab)


def save_peft_adapter(model: Qwen, config: QwenConfig | None, lcfg, out_dir: str, base_model_name_or_path: str = "",
                      *, dtype: str | None = None) -> list[str]:
    """Writes the model's LoRA adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained(base, out_dir)` loads on top of the exported base model.
    Local or gs://. Returns the file names written."""
    from safetensors.numpy import save_file

    from automem_jax.models import lora
    cfg = config or model.cfg
    have = lora.lora_modules(model)
    if not have:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (lora.apply_lora first)")
    if tuple(have) != lcfg.modules:
        raise ValueError(f"save_peft_adapter: LoRAConfig.targets selects {list(lcfg.modules)} but the model's "
                         f"adapters are on {list(have)}")
    if not math.isclose(lora.lora_scale(model), lcfg.scale):
        raise ValueError(f"save_peft_adapter: LoRAConfig alpha/rank = {lcfg.scale} but the model's adapters "
                         f"use {lora.lora_scale(model)}")
    out_dtype = jnp.dtype(dtype or lcfg.param_dtype)
    if out_dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"adapter dtype {out_dtype.name!r}: expected float32, bfloat16 or float16")
    tensors = {}
    r = lcfg.rank
    for (i, name), (a, b) in sorted(lora.adapter_arrays(model).items()):
        if a.shape[-1] != r:
            raise ValueError(f"save_peft_adapter: LoRAConfig.rank is {r} but layer {i} {name} has rank {a.shape[-1]}")
        # ours A [*in, r], B [r, *out] -> PEFT lora_A.weight [r, in], lora_B.weight [out, r] (torch Linear layout)
        tensors[_peft_key(i, name, "A")] = np.ascontiguousarray(_gather(a).astype(out_dtype).reshape(-1, r).T)
        tensors[_peft_key(i, name, "B")] = np.ascontiguousarray(_gather(b).astype(out_dtype).reshape(r, -1).T)
    alpha = lcfg.alpha
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(lcfg.dropout),
        "target_modules": sorted(lora.HF_MODULES[n] for n in have),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    if cfg.num_layers != len({i for i, _ in lora.adapter_arrays(model)}):
        raise ValueError(f"save_peft_adapter: config has {cfg.num_layers} layers but the model's adapters cover "
                         f"{len({i for i, _ in lora.adapter_arrays(model)})}")
    if jax.process_index() != 0:  # every host joined the gathers above; one writes
        return []
    with storage.local_dir_for_writing(out_dir) as local:
        save_file(tensors, os.path.join(local, ADAPTER_FILE), metadata={"format": "pt"})
        _write_json(os.path.join(local, ADAPTER_CONFIG), adapter_cfg)
    return [ADAPTER_FILE, ADAPTER_CONFIG]


def load_peft_adapter(model: Qwen, path: str, *, mesh: jax.sharding.Mesh | None = None, rules=None):
    """Reads a PEFT LoRA folder (local or gs://) into the model: adds adapters if it has none, else
    overwrites adapters of the same rank and targets. Returns (model, LoRAConfig)."""
    from safetensors import safe_open

    from automem_jax.models import lora
    cfg_path = storage.join(str(path), ADAPTER_CONFIG)
    d = storage.read_json(cfg_path, missing=f"no {ADAPTER_CONFIG}; expected a PEFT adapter folder")
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {d.get('peft_type')!r}; only LORA adapters are supported")
    # Options that change the math or the layout; absent / null / empty means PEFT's plain LoRA.
    plain = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
             "modules_to_save": None, "layers_to_transform": None, "rank_pattern": None, "alpha_pattern": None}
    for field, ok in plain.items():
        v = d.get(field)
        if v not in (None, ok, [], {}):
            raise ValueError(f"{cfg_path}: {field}={v!r} is not supported (expected {ok!r})")
    targets = d.get("target_modules")
    if targets is None:
        raise ValueError(f"{cfg_path}: missing target_modules")
    try:
        lcfg = lora.LoRAConfig(rank=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)),
                               dropout=float(d.get("lora_dropout", 0.0)),
                               targets=targets if isinstance(targets, str) else tuple(targets))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    cfg, r = model.cfg, lcfg.rank
    if lora.has_lora(model):
        have = lora.lora_modules(model)
        rank = next(iter(lora.adapter_arrays(model).values()))[0].shape[-1]
        if have != lcfg.modules or rank != r:
            raise ValueError(f"{path}: adapter (r={r}, targets {list(lcfg.modules)}) does not fit the model's "
                             f"adapters (r={rank}, targets {list(have)})")
    # Read and check every tensor before touching the model: a bad folder leaves it as it was.
    values = {}
    with storage.local_file(storage.join(str(path), ADAPTER_FILE)) as local, \
            safe_open(local, framework="numpy") as f:
        available = set(f.keys())
        wanted = {_peft_key(i, n, ab) for i in range(cfg.num_layers) for n in lcfg.modules for ab in "AB"}
        missing = sorted(wanted - available)
        if missing:
            raise ValueError(f"{path}: missing adapter tensor(s) {missing[:3]}"
                             f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''}")
        extra = sorted(available - wanted)
        if extra:
            raise ValueError(f"{path}: unexpected tensor(s) {extra[:3]} for a {cfg.num_layers}-layer "
                             f"{cfg.arch} model with targets {list(lcfg.modules)}")
        for i, layer in lora.decoder_layers(model):
            for name in lcfg.modules:
                sub, n_in = lora.PROJECTIONS[name]
                kernel = getattr(getattr(layer, sub), f"{name}_kernel")
                (a_shape, _), (b_shape, _), _ = lora.adapter_shapes(kernel, n_in, r, stacked=i is None)
                for ab, shape in (("a", a_shape), ("b", b_shape)):
                    shape = shape[1:] if i is None else shape
                    parts = []
                    for l in (range(cfg.num_layers) if i is None else [i]):
                        key = _peft_key(l, name, ab.upper())
                        raw = f.get_tensor(key)
                        # PEFT lora_A.weight [r, in] -> ours [*in, r]; lora_B.weight [out, r] -> [r, *out]
                        want = (r, math.prod(shape[:-1])) if ab == "a" else (math.prod(shape[1:]), r)
                        if tuple(raw.shape) != want:
                            raise ValueError(f"{path}: tensor {key} has shape {tuple(raw.shape)}; expected {want}")
                        parts.append(np.ascontiguousarray(raw.T).reshape(shape))
                    values[(i, name, ab)] = np.stack(parts) if i is None else parts[0]
    if not lora.has_lora(model):
        lora.apply_lora(model, lcfg, mesh=mesh, rules=rules)
    layers = dict(lora.decoder_layers(model))
    for (i, name, ab), value in values.items():
        var = getattr(getattr(layers[i], lora.PROJECTIONS[name][0]), f"{name}_lora_{ab}")
        cur = var[...]
        sh = getattr(cur, "sharding", None)
        var.set_value(_place(value.astype(cur.dtype), sh if isinstance(sh, jax.sharding.NamedSharding) else None))
    return model, lcfg


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def inspect(path: str) -> str:
    from automem_jax.models import gguf
    path = _gguf_or_folder(path)
    if gguf.is_gguf(path):
        with gguf.GGUFModel.open(path) as g:
            cfg = QwenConfig.from_hf(g.hf_config())
            types = ", ".join(f"{k} {v}" for k, v in g.type_counts().items())
            lines = [f"file: {path} (GGUF, {len(g.tensors)} tensors: {types})"]
            try:
                _check_names(cfg, g)
                lines.append("tensor names: complete and consistent with the metadata")
            except ValueError as e:
                lines.append(f"tensor names: PROBLEM: {e}")
        return "\n".join(lines + [f"arch: {cfg.arch}  layers={cfg.num_layers} hidden={cfg.hidden_size} "
                                  f"heads={cfg.num_heads}/{cfg.num_kv_heads} vocab={cfg.vocab_size} "
                                  f"tied={cfg.tie_word_embeddings}", f"parameters: {cfg.num_params():,}"])
    cfg = QwenConfig.from_hf(path)
    folder = _Folder(path)
    lines = [f"folder: {path}", f"arch: {cfg.arch}  layers={cfg.num_layers} hidden={cfg.hidden_size} "
             f"heads={cfg.num_heads}/{cfg.num_kv_heads} head_dim={cfg.head_dim} mlp={cfg.intermediate_size} "
             f"vocab={cfg.vocab_size} tied={cfg.tie_word_embeddings}",
             f"parameters (from config): {cfg.num_params():,}",
             f"tensors in folder: {len(folder.weight_map)} in {len(set(folder.weight_map.values()))} file(s)"]
    try:
        _check_names(cfg, folder)
        lines.append("tensor names: complete and consistent with config.json")
    except ValueError as e:
        lines.append(f"tensor names: PROBLEM: {e}")
    return "\n".join(lines)


def _save_orbax(model: Qwen, cfg: QwenConfig, out: str) -> None:
    import orbax.checkpoint as ocp
    path = out if storage.is_gcs(out) else os.path.abspath(out)
    storage.configure_tensorstore()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(storage.join(path, "params"), nnx.state(model, nnx.Param))
    ckptr.wait_until_finished()
    storage.write_text(storage.join(path, "model_config.json"),
                       json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))


def _load_orbax(path: str) -> tuple[Qwen, QwenConfig]:
    import orbax.checkpoint as ocp
    path = path if storage.is_gcs(path) else os.path.abspath(path)
    storage.configure_tensorstore()
    cfg = QwenConfig(**storage.read_json(storage.join(path, "model_config.json"),
                                         missing="no model_config.json; expected a folder written by "
                                                 "`python -m automem_jax.models.hf import`"))
    graphdef, abs_state = nnx.split(abstract_model(cfg))
    params = nnx.state(nnx.merge(graphdef, abs_state), nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored = ocp.StandardCheckpointer().restore(storage.join(path, "params"), target)
    model = nnx.merge(graphdef, abs_state)
    nnx.update(model, restored)
    return model, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.models.hf",
                                 description="Import, export and inspect Hugging Face Qwen folders.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("inspect", help="config summary and tensor check of a HF folder")
    a.add_argument("path")
    b = sub.add_parser("import", help="HF folder, .gguf file or pkg:<name> -> orbax checkpoint or HF folder")
    b.add_argument("path")
    b.add_argument("--out", required=True, help="output folder (local or gs://)")
    b.add_argument("--format", choices=("orbax", "hf"), default="orbax",
                   help="orbax: parameter checkpoint for `export --checkpoint`; hf: safetensors folder with "
                        "the source's tokenizer (what transformers and --config.model.checkpoint load)")
    b.add_argument("--dtype", default=None, help="parameter dtype (default: float32)")
    c = sub.add_parser("export", help="random preset or imported checkpoint -> HF folder")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="export a randomly initialised preset (tests, smoke runs)")
    src.add_argument("--checkpoint", help="folder written by `import` (or by training)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default=None, help="dtype of the written tensors")
    c.add_argument("--tokenizer", default="default",
                   help="'default' (offline Qwen3 tokenizer), a tokenizer folder, or 'none'")
    c.add_argument("--max_shard_size", default="2GB")
    c.add_argument("out")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "inspect":
            print(inspect(args.path))
        elif args.cmd == "import":
            model, cfg = load_pretrained(args.path, param_dtype=args.dtype)
            if args.format == "hf":
                from automem_jax.models.tokenizer import load_tokenizer
                try:
                    tok = load_tokenizer(args.path)
                except (OSError, ValueError) as e:
                    tok = None
                    print(f"warning: {args.path}: no tokenizer written ({e})", file=sys.stderr)
                save_pretrained(model, cfg, args.out, tok, dtype=args.dtype)
            else:
                _save_orbax(model, cfg, args.out)
            print(f"imported {cfg.num_params():,} parameters ({cfg.arch}) from {args.path} -> {args.out} "
                  f"({args.format})")
        else:
            if args.preset:
                from automem_jax.models.qwen import init_model
                from automem_jax.models.qwen_presets import preset
                cfg = preset(args.preset)
                model = init_model(cfg, seed=args.seed)
            else:
                model, cfg = _load_orbax(args.checkpoint)
            tok = None
            if args.tokenizer != "none":
                from automem_jax.models.tokenizer import load_tokenizer
                tok = load_tokenizer(None if args.tokenizer == "default" else args.tokenizer)
            files = save_pretrained(model, cfg, args.out, tok, max_shard_size=args.max_shard_size, dtype=args.dtype)
            print(f"exported {cfg.num_params():,} parameters to {args.out}: {', '.join(files)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
