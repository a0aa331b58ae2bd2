"""The pod and one-host configs: same schema as configs/tiny.py, upstream's protocol, memory that fits."""

import importlib
import importlib.util
import math
import os

import pytest
from ml_collections import ConfigDict

from automem_jax.envs import KNOWN_ENVS
from automem_jax.memory.structure import MemoryStructure
from automem_jax.models import qwen
from automem_jax.parallel.mesh import MeshConfig, bytes_per_device
from automem_jax.training.data import DataConfig
from automem_jax.training.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3

# name -> (env family, upstream effective batch, upstream min_examples, eval seeds per task)
CONFIGS = {
    "crafter_qwen25_32b": ("crafter", 32, 600, 10),
    "minihack_qwen25_32b": ("minihack", 16, 300, 5),
    "nethack_qwen25_32b": ("nethack", 32, 800, 5),
    "crafter_qwen25_7b": ("crafter", 32, 600, 10),
    "minihack_qwen25_7b": ("minihack", 16, 300, 5),
    "nethack_qwen25_7b": ("nethack", 32, 800, 5),
}
# Fields a config may add beyond tiny.py's schema (the Boxoban levels folder, MiniHack only).
ALLOWED_EXTRA = {"env.levels_path"}


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ConfigDict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _load(name):
    """Loads the file the way absl's config_flags does (by path), then calls get_config()."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def _parse_seeds(text):
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.fixture(scope="module")
def tiny_flat():
    return _flat(importlib.import_module("configs.tiny").get_config())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_schema_matches_tiny(name, tiny_flat):
    _, cfg = _load(name)
    flat = _flat(cfg)
    missing = sorted(set(tiny_flat) - set(flat))
    extra = sorted(set(flat) - set(tiny_flat) - ALLOWED_EXTRA)
    assert not missing and not extra, (missing, extra)
    for k, v in tiny_flat.items():  # an override keeps the field's type (ConfigDict would coerce silently)
        assert type(flat[k]) is type(v), (k, flat[k], v)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_protocol(name):
    family, eff_batch, min_examples, n_seeds = CONFIGS[name]
    module, c = _load(name)
    # Training and data sections build the real dataclasses.
    for sec in ("bootstrap", "loop2"):
        t = c[sec].train.to_dict()
        t["remat"] = t["remat"] or None
        TrainConfig.from_dict(t)
        DataConfig(**c[sec].data.to_dict())
    t = TrainConfig.from_dict({**c.loop2.train.to_dict(), "remat": c.loop2.train.remat or None})
    assert t.global_batch == eff_batch
    assert (t.mode, t.learning_rate, t.schedule, t.warmup_ratio, t.lora_dropout) == ("lora", 5e-5, "cosine", 0.05, 0.0)
    assert t.lora_alpha == 2 * t.lora_rank
    expected = {"crafter": (256, "ATTN", 4.0), "minihack": (128, "ALL", 3.0), "nethack": (256, "ALL", 1.0)}[family]
    assert (t.lora_rank, t.lora_targets, t.epochs) == expected
    assert c.loop2.data.cutoff_len == 16384 and c.loop2.data.loss_on == "all"
    assert c.loop2.min_examples == min_examples and c.loop2.top_pct == 100 and c.loop2.iterations == 5
    # Loop 1, collection, inference and eval as upstream.
    assert (c.loop1.revisions, c.loop1.fresh_attempts, c.loop1.continuation_retries, c.loop1.accept) == \
        (5, 3, 1, "strict")
    assert (c.collect.episodes, c.collect.seed_base) == (100, 999)
    assert (c.inference.max_len, c.inference.max_tokens, c.inference.temperature) == (32768, 4096, 1.0)
    assert c.inference.max_batch >= 2 * c.env.num_envs
    assert len(_parse_seeds(c.eval.seeds)) == n_seeds and _parse_seeds(c.eval.seeds)[0] == 42
    assert c.env.max_steps == c.collect.max_steps == {"crafter": 2000, "minihack": 100, "nethack": 100000}[family]
    assert c.critic.kind == "openai" and c.critic.api_key_env == "OPENAI_API_KEY"
    assert not c.bootstrap.enabled and "bootstrap" not in c.phases.split(",")
    assert c.model.dtype == c.model.param_dtype == c.export.dtype == "bfloat16"
    assert c.model.scan_layers and c.model.remat in ("full", "save_dots")
    assert c.tokenizer == c.model.checkpoint and c.model.checkpoint.endswith(
        "Qwen2.5-32B-Instruct" if "32b" in name else "Qwen2.5-7B-Instruct")
    # Env names the factory accepts, and the default memory structure for the family.
    names = c.env.name.split(",")
    assert all(n in KNOWN_ENVS for n in names), names
    if family == "minihack":
        assert len(names) == 8 and {"minihack:Boxoban-Hard", "minihack:Quest-Medium"} <= set(names)
        assert "levels_path" in c.env
    MemoryStructure.default(c.env.structure_name).validate()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameters_fit_on_the_target_devices(name):
    module, c = _load(name)
    size = "32b" if "32b" in name else "7b"
    cfg = qwen.preset(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                      scan_layers=c.model.scan_layers, remat=c.model.remat)
    assert c.model.preset == f"qwen2.5-{size}"
    if size == "32b":
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (64, 5120, 40, 8)
    axes = MeshConfig.from_any(c.mesh.to_dict()).axis_sizes(module.TARGET_DEVICES)
    # Tensor parallelism must split heads, KV heads, mlp and vocab evenly (else they are replicated).
    for dim in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size):
        assert dim % axes["tensor"] == 0, (dim, axes)
    per_dev = sum(bytes_per_device(shape, 2, names, axes) for shape, names in cfg.param_shapes().values())
    total = sum(math.prod(shape) for shape, _ in cfg.param_shapes().values()) * 2
    assert per_dev < 16 * GiB, per_dev / GiB
    if module.TARGET_DEVICES > 1:  # sharded close to evenly: at most 10% above total / devices
        assert per_dev <= 1.1 * total / module.TARGET_DEVICES
    # The global micro-batch splits evenly over the batch axes (data x fsdp), one example or more each.
    assert c.loop2.train.batch_size % (axes["data"] * axes["fsdp"]) == 0


@pytest.mark.parametrize("name", ["crafter_qwen25_32b", "minihack_qwen25_7b"])
def test_launcher_accepts_config(name, monkeypatch):
    """launch.tpu_run's own pre-flight checks pass once the placeholders are filled in."""
    from launch import tpu_run

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    _, c = _load(name)
    c.model.checkpoint = ""  # the placeholder bucket cannot be read here; validate the preset shapes instead
    c.critic.base_url = "https://critic.example.com/v1"
    c.critic.model = "some-model"
    tpu_run.validate_config(c, c.phases.split(","))
