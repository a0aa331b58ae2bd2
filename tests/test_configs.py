"""The pod and one-host configs: same schema as configs/tiny.py, upstream's protocol, memory that fits."""

import importlib
import importlib.util
import math
import os

import pytest
from ml_collections import ConfigDict

from automem_jax.envs import KNOWN_ENVS
from automem_jax.memory.structure import MemoryStructure
from automem_jax.models import qwen, qwen_presets
from automem_jax.parallel.mesh import MeshConfig, bytes_per_device
from automem_jax.training.data import DataConfig
from automem_jax.training.trainer import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3

# name -> (env family, upstream effective batch, upstream min_examples, eval seeds per task)
CONFIGS = {
    "crafter_qwen25_32b": ("crafter", 32, 600, 10),
    "minihack_qwen25_32b": ("minihack", 16, 300, 10),
    "nethack_qwen25_32b": ("nethack", 32, 800, 10),
    "crafter_qwen25_7b": ("crafter", 32, 600, 10),
    "minihack_qwen25_7b": ("minihack", 16, 300, 10),
    "nethack_qwen25_7b": ("nethack", 32, 800, 10),
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


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["crafter_qwen25_05b"])
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
    assert _parse_seeds(c.eval.seeds) == list(range(42, 42 + n_seeds))  # upstream's drivers: 42..51
    # BALROG's invalid-action feedback on; NetHack keeps BALROG's action space exactly.
    assert c.env.feedback_on_invalid_action is True and c.env.extra_commands == "" and c.env.text_style == "balrog"
    assert c.env.max_steps == c.collect.max_steps == {"crafter": 2000, "minihack": 100, "nethack": 100000}[family]
    assert c.critic.kind == "openai" and c.critic.api_key_env == "OPENAI_API_KEY"
    assert not c.bootstrap.enabled and "bootstrap" not in c.stages.split(",")
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
    cfg = qwen_presets.preset(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
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
    tpu_run.validate_config(c, c.stages.split(","))


# --- serving layout: per-chip memory of the inference engine ------------------------------------

# Chips each config may run on: (device_kind, devices, inference overrides). The first row is the
# config as written; the 7B rows after it are the one-host TPU variants its comments give.
SERVING_TARGETS = {
    "32b": [("tpu v5p", 32, {})],
    "7b": [("h100", 1, {}),
           ("tpu v4", 4, {"mesh.tensor": 4}),
           ("tpu v5e", 8, {"mesh.tensor": 4, "cache_tokens": 131072})],
}


def _serving_case(name, kind, n, overrides):
    from automem_jax.llm import layout
    module, c = _load(name)
    for key, value in overrides.items():
        sec, _, field = key.rpartition(".")
        (c.inference[sec] if sec else c.inference)[field] = value
    # The two-model evaluations (Loop 2, final eval) hold two engines: specialist and base.
    mem = layout.serving_memory_for_config(c, n, engines=2)
    return module, c, mem


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serving_memory_fits_the_target_chips(name):
    from automem_jax.llm import layout
    size = "32b" if "32b" in name else "7b"
    for i, (kind, n, overrides) in enumerate(SERVING_TARGETS[size]):
        module, c, mem = _serving_case(name, kind, n, overrides)
        if i == 0:  # the config as written names its chip and is sized for TARGET_DEVICES
            assert c.inference.device_kind == kind and n == module.TARGET_DEVICES
        device = layout.device_memory(kind)
        print(f"\n{name} on {n} x {kind} ({device / GiB:.0f} GiB), serving mesh {mem['mesh_axes']}, "
              f"cache_tokens {mem['cache_tokens']}: " + mem.describe()
              + f" ({100 * mem['total'] / device:.0f}% of the chip)")
        mem.check(device, headroom=0.9)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serving_mesh_and_rules(name):
    from automem_jax.parallel.mesh import param_rules_on, serving_mesh_config, serving_rules
    module, c = _load(name)
    axes = serving_mesh_config(c.inference.mesh.to_dict()).axis_sizes(module.TARGET_DEVICES)
    assert math.prod(axes.values()) == module.TARGET_DEVICES and axes["fsdp"] == 1
    if "32b" in name:  # one replica per host (8 hosts x 4 chips), tensor parallel within the host
        assert (axes["data"], axes["tensor"]) == (8, 4)
    rules = serving_rules(c.inference.rules)
    assert param_rules_on(rules, "fsdp") == [] and param_rules_on(rules, "data") == []
    assert dict(rules)["embed"] is None
    cfg = qwen_presets.preset(c.model.preset)
    for dim in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size):
        assert dim % axes["tensor"] == 0, (dim, axes)
    inf = c.inference
    assert inf.page_size >= 1 and inf.prefill_chunk >= inf.page_size and inf.prefix_cache
    assert inf.cache_tokens == 0 or inf.cache_tokens >= inf.max_len
    # Upstream's vLLM took top_p / top_k / repetition_penalty from the checkpoint's generation_config.json.
    assert inf.generation_config == "auto" and inf.repetition_penalty is None and inf.top_p is None


def test_serving_memory_arithmetic():
    from automem_jax.llm import layout
    cfg = qwen_presets.preset("qwen2.5-32b", dtype="bfloat16", param_dtype="bfloat16")
    m = layout.serving_memory(cfg, {"data": 8, "tensor": 4}, max_batch=64, max_len=32768, cache_tokens=1000,
                              page_size=16, prefill_chunk=512)
    assert m["cache_tokens"] == 1008  # whole pages
    # KV: 64 layers x (k, v) x 8/4 KV heads x 128 x 2 bytes = 64 KiB per token per chip.
    assert m["kv_bytes_per_token"] == 64 * 1024 and m["kv_pool"] == 1008 * 64 * 1024
    total_params = sum(math.prod(s) for s, _ in cfg.param_shapes().values())
    assert total_params * 2 / 4 <= m["weights"] <= total_params * 2 / 4 * 1.01  # replicated over data only
    # Decode: gathered K+V of one layer, f32 scores over 10 heads per chip, f32 logits of vocab / 4.
    assert m["decode_terms"] == {"kv": 2 * 64 * 32768 * 2 * 128 * 2, "scores": 64 * 10 * 32768 * 4,
                                 "logits": 64 * 152064 // 4 * 4}
    assert m["prefill_terms"]["scores"] == 512 * 10 * 32768 * 4
    assert m["temporaries"] == max(m["decode_temporaries"], m["prefill_temporaries"])
    two = layout.serving_memory(cfg, {"data": 8, "tensor": 4}, max_batch=64, max_len=32768, cache_tokens=1000,
                                engines=2)
    assert two["total"] == 2 * (m["weights"] + m["kv_pool"]) + m["temporaries"]
    # The term that does not fit is named: the KV pool of max_batch x max_len tokens.
    full = layout.serving_memory(cfg, {"data": 8, "tensor": 4}, max_batch=64, max_len=32768)
    with pytest.raises(ValueError, match=r"kv_pool .*lower inference.cache_tokens"):
        full.check(layout.device_memory("tpu v5p"))
    with pytest.raises(ValueError, match="weights"):
        layout.serving_memory(cfg, {"data": 32, "tensor": 1}, max_batch=1, max_len=64).check(16 * GiB)
    assert layout.device_memory("TPU v5 lite") == layout.device_memory("tpu v5e") == 16 * GiB
    assert layout.device_memory("NVIDIA H100 80GB HBM3") == 80 * GiB
    assert layout.device_memory("NVIDIA A100-SXM4-80GB") == 80 * GiB
    with pytest.raises(ValueError, match="unknown"):
        layout.device_memory("tpu v9")


@pytest.mark.parametrize("field,value,msg", [
    ("mesh.data", 0, "inference.mesh.data"),
    ("mesh.tensor", -2, "inference.mesh.tensor"),
    ("mesh.data", -1, None),  # valid: the next row makes both -1
    ("page_size", 0, "inference.page_size 0"),
    ("prefill_chunk", 8, "inference.prefill_chunk 8"),
    ("cache_tokens", 100, "inference.cache_tokens 100"),
    ("cache_tokens", -1, "inference.cache_tokens -1"),
    ("generation_config", "vllm", "inference.generation_config 'vllm'"),
    ("repetition_penalty", 0.0, "inference.repetition_penalty 0.0"),
    ("top_p", 1.5, "inference.top_p 1.5"),
    ("rules", (("embed", "fsdp"),), "no fsdp axis"),
    ("rules", (("embed", "model"),), "unknown mesh axis 'model'"),
    ("rules", (("embedding", "tensor"),), "unknown logical axis"),
    ("device_kind", "tpu v9", "device kind 'tpu v9'"),
])
def test_bad_inference_fields_are_named_before_anything_runs(field, value, msg):
    from absl import app

    from launch import tpu_run
    c = importlib.import_module("configs.tiny").get_config()
    sec, _, key = field.rpartition(".")
    (c.inference[sec] if sec else c.inference)[key] = value
    if msg is None:
        tpu_run.validate_config(c, c.stages.split(","))
        return
    with pytest.raises(app.UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        tpu_run.validate_config(c, c.stages.split(","))


def test_both_serving_axes_free_and_unknown_axis_are_errors():
    from absl import app

    from launch import tpu_run
    c = importlib.import_module("configs.tiny").get_config()
    c.inference.mesh.tensor = -1
    with pytest.raises(app.UsageError, match="at most one of data, tensor"):
        tpu_run.validate_config(c, c.stages.split(","))
    c = importlib.import_module("configs.tiny").get_config()
    c.inference.mesh.fsdp = 2
    with pytest.raises(app.UsageError, match="unknown axis"):
        tpu_run.validate_config(c, c.stages.split(","))


def test_launcher_checks_serving_memory(monkeypatch):
    """A 32B config whose KV pool cannot fit a v5p chip stops in validation, naming the term."""
    from absl import app

    from launch import tpu_run
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    _, c = _load("crafter_qwen25_32b")
    c.model.checkpoint = ""
    c.critic.base_url, c.critic.model = "https://critic.example.com/v1", "some-model"
    tpu_run.validate_config(c, c.stages.split(","))
    c.inference.cache_tokens = 0  # max_batch x max_len = 2M tokens: 128 GiB of KV per chip
    with pytest.raises(app.UsageError, match=r"kv_pool .* > 0.9 x 95.00 GiB"):
        tpu_run.validate_config(c, c.stages.split(","))


@pytest.mark.parametrize("flag,msg", [
    ("--config.inference.prefill_chunk=4", "inference.prefill_chunk 4"),
    ("--config.inference.rules=(('embed', 'fsdp'),)", "no fsdp axis"),
    ("--config.inference.repetition_penalty=-1.0", "inference.repetition_penalty -1.0"),
    ("--config.inference.generation_config=always", "inference.generation_config 'always'"),
    # One CPU device: sizes that need more devices are caught once the device count is known.
    ("--config.inference.mesh.data=3", "inference.mesh {'data': 3, 'tensor': 1}: mesh config: axes"),
])
def test_inference_flags_fail_before_the_workdir_is_written(flag, msg, tmp_path):
    """The command line reaches the new fields (a tuple of rules, an unset float) and a bad value
    stops the main job before it writes anything."""
    import subprocess
    import sys
    wd = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}", flag],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and msg in r.stderr, r.stderr[-2000:]
    assert not wd.exists()


# --- configs/crafter_qwen25_05b.py: the real protocol with a 0.5B checkpoint on one GPU -----------

SMALL_05B = "crafter_qwen25_05b"
PLACEHOLDER_URL, PLACEHOLDER_MODEL = "https://YOUR_CRITIC_ENDPOINT/v1", "YOUR_CRITIC_MODEL"


def _load_05b(monkeypatch):
    for var in ("AUTOMEM_CRITIC_BASE_URL", "AUTOMEM_CRITIC_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return _load(SMALL_05B)


def test_05b_runs_the_real_protocol(monkeypatch):
    from automem_jax.llm import layout
    module, c = _load_05b(monkeypatch)
    assert c.model.checkpoint == "pkg:qwen2.5-coder-0.5b-instruct" and c.model.preset == "qwen2.5-0.5b"
    assert c.tokenizer == ""  # the checkpoint's own tokenizer and chat template
    # No scripted teacher in the loops; critic and judge are one OpenAI-compatible endpoint.
    assert c.collect.policy == "base" and c.critic.kind == "openai" and c.loop2.judge == "critic"
    assert (c.critic.base_url, c.critic.model) == (PLACEHOLDER_URL, PLACEHOLDER_MODEL)
    # Bootstrap off by default, and --config.bootstrap.enabled=True alone turns it on.
    assert not c.bootstrap.enabled and "bootstrap" in c.stages.split(",")
    assert c.bootstrap.train.mode == "lora" and c.bootstrap.tokenizer_vocab == 0
    boot = set(_parse_seeds(c.bootstrap.seeds))
    assert not boot & set(_parse_seeds(c.eval.seeds)) and max(boot) < 1000  # collect seeds are >= 1000
    # Upstream's Crafter seeds, shorter episodes (the docstring says why).
    assert c.env.name == "crafter" and _parse_seeds(c.eval.seeds) == list(range(42, 52))
    assert c.env.max_steps == c.collect.max_steps == 200
    assert c.inference.max_batch >= 2 * c.env.num_envs and c.inference.max_len == 32768
    for sec in ("bootstrap", "loop2"):
        TrainConfig.from_dict({**c[sec].train.to_dict(), "remat": c[sec].train.remat or None})
        DataConfig(**c[sec].data.to_dict())
    loop2 = TrainConfig.from_dict({**c.loop2.train.to_dict(), "remat": c.loop2.train.remat or None})
    assert loop2.global_batch == 32 and (loop2.lora_rank, loop2.lora_targets) == (256, "ATTN")
    assert module.TARGET_DEVICES == 1
    assert MeshConfig.from_any(c.mesh.to_dict()).axis_sizes(1) == {"data": 1, "fsdp": 1, "tensor": 1}
    # Both engines of the two-model evaluation fit the GPU it names.
    mem = layout.serving_memory_for_config(c, module.TARGET_DEVICES, engines=2)
    device = layout.device_memory(c.inference.device_kind)
    mem.check(device, headroom=0.9)
    assert mem["total"] < 16 * GiB, mem.describe()


def test_05b_critic_endpoint_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTOMEM_CRITIC_BASE_URL", "http://127.0.0.1:8001/v1")
    monkeypatch.setenv("AUTOMEM_CRITIC_MODEL", "critic")
    _, c = _load(SMALL_05B)
    assert (c.critic.base_url, c.critic.model) == ("http://127.0.0.1:8001/v1", "critic")


def test_05b_placeholders_are_refused_then_accepted(monkeypatch):
    """The launcher names each unfilled critic field; filled in, the config validates."""
    from absl import app

    from launch import tpu_run
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    _, c = _load_05b(monkeypatch)
    c.model.checkpoint = ""  # the preset's shapes and the offline Qwen3 tokenizer: no packaged weights needed
    stages = c.stages.split(",")
    with pytest.raises(app.UsageError, match=r"critic\.base_url 'https://YOUR_CRITIC_ENDPOINT/v1' is a placeholder; "
                                             r"pass --config\.critic\.base_url=\.\.\."):
        tpu_run.validate_config(c, stages)
    c.critic.base_url = "http://127.0.0.1:8001/v1"
    with pytest.raises(app.UsageError, match=r"critic\.model 'YOUR_CRITIC_MODEL' is a placeholder"):
        tpu_run.validate_config(c, stages)
    c.critic.model = "critic"
    tpu_run.validate_config(c, stages)
    # A local server without auth (the docstring's command): no key variable at all.
    c.critic.api_key_env = ""
    monkeypatch.delenv("OPENAI_API_KEY")
    tpu_run.validate_config(c, stages)
    # Stages without the critic do not need it filled in.
    _, c = _load_05b(monkeypatch)
    c.model.checkpoint = ""
    tpu_run.validate_config(c, ["bootstrap", "baseline"])


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A Qwen2.5-architecture HF folder from a random, shrunk preset, with the offline Qwen3
    tokenizer (151,669 tokens in a 151,936-row embedding): stands in for the packaged checkpoint."""
    from automem_jax.models import hf
    from automem_jax.models.tokenizer import load_tokenizer
    folder = str(tmp_path_factory.mktemp("random_qwen25"))
    cfg = qwen_presets.preset("qwen2.5-0.5b", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    hf.save_pretrained(qwen.init_model(cfg, seed=0), cfg, folder, tokenizer=load_tokenizer())
    return folder


def test_05b_bootstrap_with_a_checkpoint_validates(random_checkpoint, monkeypatch):
    from launch import tpu_run
    _, c = _load_05b(monkeypatch)
    c.model.checkpoint = random_checkpoint
    c.bootstrap.enabled = True
    c.bootstrap.tokenizer_vocab = 4096  # ignored with a checkpoint: its own vocabulary is checked
    model_cfg = tpu_run.validate_config(c, ["bootstrap", "baseline"])
    assert model_cfg.hidden_size == 64 and model_cfg.vocab_size == 151936


@pytest.mark.slow  # ~80 s: two subprocess stages, a LoRA fit and an engine on CPU
def test_05b_bootstrap_warm_starts_the_checkpoint(random_checkpoint, tmp_path):
    """`--stages=bootstrap,baseline` with model.checkpoint: teacher traces in the checkpoint's chat
    template, LoRA merged into bootstrap/model (a HF folder with the checkpoint's vocabulary, no
    domain tokenizer), and the baseline plays that folder."""
    import json
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import load_file

    from automem_jax.models.tokenizer import load_tokenizer
    wd = tmp_path / "run"
    flags = [
        f"--config.model.checkpoint={random_checkpoint}", "--config.bootstrap.enabled=True",
        "--config.bootstrap.tokenizer_vocab=4096",  # asked for, and ignored: a checkpoint keeps its tokenizer
        "--config.bootstrap.seeds=100-101", "--config.bootstrap.max_steps=6",
        "--config.bootstrap.train.max_steps=4", "--config.bootstrap.train.batch_size=4",
        "--config.bootstrap.train.grad_accum=1", "--config.bootstrap.train.learning_rate=1e-3",
        "--config.bootstrap.data.cutoff_len=4096",
        "--config.eval.seeds=42-43", "--config.env.max_steps=3", "--config.env.num_envs=2",
        "--config.inference.max_tokens=32", "--config.inference.max_batch=4", "--config.inference.max_len=4096",
        "--config.inference.cache_tokens=0", "--config.inference.device_kind=",
    ]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    for var in ("AUTOMEM_CRITIC_BASE_URL", "AUTOMEM_CRITIC_MODEL"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", f"--config=configs/{SMALL_05B}.py",
                        f"--workdir={wd}", "--stages=bootstrap,baseline", *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])

    model_dir = wd / "bootstrap" / "model"
    assert (model_dir / "DONE").exists() and not (wd / "bootstrap" / "tokenizer").exists()
    hf_cfg = json.loads((model_dir / "config.json").read_text())
    src_cfg = json.loads(open(os.path.join(random_checkpoint, "config.json")).read())
    assert hf_cfg["vocab_size"] == src_cfg["vocab_size"] == 151936
    assert hf_cfg["model_type"] == "qwen2" and hf_cfg["hidden_size"] == 64
    tok, src_tok = load_tokenizer(str(model_dir)), load_tokenizer(random_checkpoint)
    assert len(tok) == len(src_tok) and tok.chat_template == src_tok.chat_template
    # The dataset was rendered with the checkpoint's tokenizer; the LoRA fit is merged into the weights.
    manifest = json.loads((wd / "bootstrap" / "dataset" / "info.json").read_text())
    assert manifest["vocab_size"] == len(src_tok) and manifest["counts"]["kept"] > 0
    info = json.loads((model_dir / "info.json").read_text())
    assert info["steps"] == 4
    new, old = load_file(str(model_dir / "model.safetensors")), load_file(os.path.join(random_checkpoint,
                                                                                         "model.safetensors"))
    assert set(new) == set(old) and not any(k.endswith("lora_A") for k in new)
    # Both in the run's storage dtype (bf16; the random checkpoint was saved in f32).
    changed = [k for k in new if not np.array_equal(new[k], old[k].astype(new[k].dtype))]
    assert any("q_proj.weight" in k for k in changed), changed  # ALL targets: attention and mlp adapters
    assert not any("embed_tokens" in k for k in changed)  # LoRA leaves the embedding alone

    # The baseline played bootstrap/model, not the checkpoint.
    summary = json.loads((wd / "eval" / "baseline" / "summary.json").read_text())
    assert summary["episodes"] == 2
    assert "bootstrap/model" in r.stdout and f"engine {model_dir}" in r.stdout, r.stdout[-3000:]


def test_env_switches_reach_the_runner(tiny_flat):
    from types import SimpleNamespace

    from launch.run import Run
    assert tiny_flat["env.feedback_on_invalid_action"] is True and tiny_flat["env.extra_commands"] == ""
    cfg = importlib.import_module("configs.tiny").get_config()
    run = SimpleNamespace(cfg=cfg)
    assert Run.env_kwargs(run, "crafter") == {"feedback_on_invalid_action": True}
    cfg.env.feedback_on_invalid_action, cfg.env.extra_commands = False, "travel"
    assert Run.env_kwargs(run, "nethack") == {"feedback_on_invalid_action": False, "extra_commands": "travel",
                                              "text_style": "balrog"}
    cfg.env.text_style = "exact"
    mh = Run.env_kwargs(run, "minihack:Corridor-R3")
    assert "extra_commands" not in mh and mh["text_style"] == "exact"  # extra commands: NetHack only
