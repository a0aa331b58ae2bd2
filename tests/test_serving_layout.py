"""The serving layout on 8 simulated CPU devices: a decode step gathers no weight.

The engine serves under its own mesh (data x tensor) and SERVING_RULES (weights replicated over
data, split over tensor, never on embed). We compile the engine's real decode step
(`Engine.lower_decode`) and scan the optimized HLO for all-gathers whose result is a weight (a
parameter, or one layer of it, possibly still split by the mesh). Under the training rules
(`embed -> fsdp`) the same scan must find them: the control shows the scan can fail.
"""

import math
import re

import jax
import pytest
from flax import nnx

from automem_jax.models import qwen, qwen_presets
from automem_jax.parallel import mesh as pmesh

# heads 8 / KV heads 4 / mlp 256 / vocab 1024 divide tensor = 2 and 4; every weight dimension
# differs from the activation dimensions (batch 4, kv length 64), so a weight-shaped all-gather is a weight.
CFG = qwen_presets.preset("tiny", num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=4, head_dim=16,
                  intermediate_size=256, vocab_size=1024, tie_word_embeddings=False)
MAX_BATCH, MAX_LEN, PAGE = 4, 64, 16


# --- HLO scan ----------------------------------------------------------------------------------

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(all-gather(?:-start)?)\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def all_gathers(hlo: str) -> list[tuple[str, list[tuple[int, ...]], str]]:
    """(op name, result shapes, line) of every all-gather (sync or async start) in HLO text."""
    out = []
    for line in hlo.splitlines():
        m = _OP.match(line)
        if m:
            shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(2))]
            out.append((m.group(1), shapes, line.strip()))
    return out


def _divisors(mesh_shape) -> set[int]:
    """Every product of a subset of the mesh axis sizes: how much a mesh can split one dimension."""
    out = {1}
    for n in mesh_shape.values():
        out |= {d * n for d in out}
    return out


def weight_matrices(cfg) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The weight matrices (norm scales and biases are vectors: too small to tell from activations)."""
    return {n: v for n, v in cfg.param_shapes().items() if not n.endswith(("scale", "bias"))}


def weight_shapes(cfg, mesh_shape) -> dict[tuple[int, ...], list[str]]:
    """Shapes a gathered weight can have: each weight matrix and each of its layers, any dimension
    divided by a mesh-axis product (a gather over fsdp keeps the tensor split)."""
    divs = _divisors(mesh_shape)
    out = {}
    for name, (shape, axes) in weight_matrices(cfg).items():
        forms = [shape] + ([shape[1:]] if axes and axes[0] == "layers" else [])
        for form in forms:
            options = [[d // k for k in divs if d % k == 0] for d in form]
            for combo in _product(options):
                names = out.setdefault(tuple(combo), [])
                if name not in names:
                    names.append(name)
    return out


def _product(options):
    if not options:
        yield []
        return
    for head in options[0]:
        for rest in _product(options[1:]):
            yield [head, *rest]


def weight_all_gathers(hlo: str, cfg, mesh_shape) -> list[str]:
    """'<op>: <shape> (<parameters of that shape>)' for every all-gather whose result is weight-shaped."""
    table = weight_shapes(cfg, mesh_shape)
    # The smallest shard a weight gather can have: one layer of the smallest matrix, split every way.
    big = min(math.prod(s[1:] if a[0] == "layers" else s) for s, a in weight_matrices(cfg).values())
    big //= max(_divisors(mesh_shape))
    found = []
    for name, shapes, _ in all_gathers(hlo):
        for s in shapes:
            if s in table and math.prod(s) >= big:
                found.append(f"{name}: {s} ({' | '.join(table[s])})")
    return found


def test_scanner_reads_sync_and_async_all_gathers():
    hlo = """
  %all-gather.16 = f32[128,2,16]{2,1,0} all-gather(%fusion.5), channel_id=1, dimensions={0}
  %ag-start = (bf16[32,1024]{1,0}, bf16[128,1024]{1,0}) all-gather-start(bf16[32,1024]{1,0} %p), dimensions={0}
  ROOT %all-gather.2 = s32[4,1]{1,0} all-gather(%x), dimensions={0}
  %add.1 = f32[128,2,16]{2,1,0} add(%all-gather.16, %all-gather.16)
"""
    ags = all_gathers(hlo)
    assert [(n, s) for n, s, _ in ags] == [("all-gather.16", [(128, 2, 16)]),
                                           ("ag-start", [(32, 1024), (128, 1024)]), ("all-gather.2", [(4, 1)])]
    found = weight_all_gathers(hlo, CFG, {"data": 1, "fsdp": 4, "tensor": 2})
    assert any("all-gather.16: (128, 2, 16)" in f and "k_kernel" in f for f in found), found
    assert any("lm_head" in f for f in found) and not any("all-gather.2" in f for f in found)


# --- the engine's decode step under each rules table ------------------------------------------

def _model(mesh, rules):
    """The test model, scanned as the pod configs are (the engine unstacks the layers itself)."""
    with pmesh.use_rules(rules):
        return qwen.init_model(CFG.replace(scan_layers=True), seed=0, mesh=mesh, rules=rules)


def _mesh(axes):
    return pmesh.make_mesh(axes) if "fsdp" in axes else pmesh.make_serving_mesh(axes)


SERVING = [{"data": 4, "tensor": 2}, {"data": 2, "tensor": 4}]
TRAINING = {"data": 1, "fsdp": 4, "tensor": 2}


def _engine(axes, rules):
    from automem_jax.llm.engine import Engine
    from automem_jax.models.tokenizer import load_tokenizer
    mesh = _mesh(axes)
    model = _model(mesh, rules)
    return Engine(model, load_tokenizer(), max_batch=MAX_BATCH, max_len=MAX_LEN, page_size=PAGE, mesh=mesh,
                  rules=rules, prefill_chunk=32)


@pytest.mark.parametrize("axes", SERVING, ids=lambda a: f"data{a['data']}-tensor{a['tensor']}")
def test_engine_decode_gathers_no_weight(axes):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    eng = _engine(axes, pmesh.SERVING_RULES)
    mesh_shape = dict(eng.mesh.shape)
    assert mesh_shape == {"data": axes["data"], "fsdp": 1, "tensor": axes["tensor"]}
    # The weights are in the serving layout: never split on embed, split over tensor.
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(eng._state)}
    for name, arr in flat.items():
        assert "fsdp" not in str(arr.sharding.spec) and "data" not in str(arr.sharding.spec), (name, arr.sharding)
    q = next(v for k, v in flat.items() if k.endswith("q_kernel"))
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "tensor"), q.sharding.spec
    hlo = eng.lower_decode(kv_tokens=MAX_LEN).compile().as_text()
    found = weight_all_gathers(hlo, CFG, mesh_shape)
    assert not found, "decode all-gathers weights under SERVING_RULES:\n" + "\n".join(found)


def _gathered_over_fsdp(cfg, mesh_shape) -> set[tuple[int, ...]]:
    """Each weight matrix's per-layer shape with its tensor split kept and its fsdp split undone:
    what a decode step under the training rules all-gathers."""
    no_fsdp = {k: v for k, v in mesh_shape.items() if k != "fsdp"}
    out = set()
    for shape, axes in weight_matrices(cfg).values():
        if axes[0] == "layers":
            shape, axes = shape[1:], axes[1:]
        spec = pmesh.logical_to_spec(axes, shape, no_fsdp, pmesh.DEFAULT_RULES)
        out.add(tuple(d // pmesh._axis_size(no_fsdp, spec[i] if i < len(spec) else None)
                      for i, d in enumerate(shape)))
    return out


def _shapes(found: list[str]) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in re.search(r": \(([\d, ]+)\)", f).group(1).split(",")) for f in found}


def test_engine_decode_under_training_rules_gathers_weights():
    """The control: the same scan over the training layout (embed -> fsdp) finds every weight matrix
    (q, k, v, o, gate/up, down, embedding, lm_head) all-gathered over fsdp."""
    eng = _engine(TRAINING, pmesh.DEFAULT_RULES)
    hlo = eng.lower_decode(kv_tokens=MAX_LEN).compile().as_text()
    found = weight_all_gathers(hlo, CFG, dict(eng.mesh.shape))
    expected = _gathered_over_fsdp(CFG, dict(eng.mesh.shape))
    assert expected == {(128, 4, 16), (128, 2, 16), (4, 16, 128), (128, 128), (1024 // 2, 128), (128, 1024 // 2)}
    assert expected <= _shapes(found), (sorted(expected - _shapes(found)), found)


# --- the rules table and the mesh ------------------------------------------------------------

def test_serving_rules_keep_weights_off_fsdp_and_embed():
    table = dict(pmesh.SERVING_RULES)
    assert pmesh.param_rules_on(pmesh.SERVING_RULES, "fsdp") == []
    assert pmesh.param_rules_on(pmesh.SERVING_RULES, "data") == []
    assert table["embed"] is None and table["cache_tokens"] is None and table["batch"] == "data"
    for name in ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads", "act_mlp", "act_vocab"):
        assert table[name] == "tensor", name
    # Training keeps FSDP on embed.
    assert dict(pmesh.DEFAULT_RULES)["embed"] == "fsdp" and pmesh.param_rules_on(pmesh.DEFAULT_RULES, "fsdp") == ["embed"]
    # Overrides replace one entry and keep the rest; unknown names and axes are errors.
    rules = dict(pmesh.serving_rules([("vocab", None), ["batch", ["data", "tensor"]]]))
    assert rules["vocab"] is None and rules["batch"] == ("data", "tensor") and rules["mlp"] == "tensor"
    with pytest.raises(ValueError, match="unknown logical axis"):
        pmesh.serving_rules([("embedd", "tensor")])
    with pytest.raises(ValueError, match="unknown mesh axis"):
        pmesh.serving_rules([("embed", "model")])


def test_serving_mesh_from_config():
    m = pmesh.make_serving_mesh({"data": -1, "tensor": 2})
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    m = pmesh.make_serving_mesh({"data": 2, "tensor": -1}, devices=jax.devices()[:4])
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert pmesh.serving_mesh_config({"data": 8, "tensor": 4}).axis_sizes(32) == {"data": 8, "fsdp": 1, "tensor": 4}
    for spec, msg in [({"fsdp": 2}, "unknown axis"), ({"data": 0}, "positive int or -1"),
                      ({"data": -1, "tensor": -1}, "at most one"), ({"data": 3, "tensor": 2}, "use 6 devices but 8")]:
        with pytest.raises(ValueError, match=msg):
            pmesh.make_serving_mesh(spec)


# --- the main job's engine ---------------------------------------------------------------------

def test_run_engine_serves_on_the_inference_mesh(tmp_path):
    """launch.run.Run.engine(): the tiny config's engine on inference.mesh (data 4 x tensor 2),
    over the training mesh's devices, with the paging knobs passed through."""
    import importlib

    from automem_jax.agent.types import ChatRequest
    from launch.run import Run
    cfg = importlib.import_module("configs.tiny").get_config()
    cfg.bootstrap.enabled = False  # the random preset: no teacher, no trained tokenizer
    cfg.inference.mesh.tensor = 2  # tiny: 4 heads, 2 KV heads
    cfg.inference.max_batch, cfg.inference.max_len = 4, 128
    cfg.inference.page_size, cfg.inference.prefill_chunk, cfg.inference.cache_tokens = 8, 32, 256
    run = Run(cfg, str(tmp_path))
    eng = run.engine("")
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # training keeps its own mesh
    assert dict(eng.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert set(eng.mesh.devices.flat) == set(run.mesh.devices.flat)
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(eng._state)}
    for name, arr in flat.items():
        assert "fsdp" not in str(arr.sharding.spec), (name, arr.sharding.spec)
    q = next(v for k, v in flat.items() if k.endswith("q_kernel"))
    assert "tensor" in str(q.sharding.spec) and q.sharding.spec[0] is None, q.sharding.spec
    for knob, want in (("page_size", 8), ("prefill_chunk", 32), ("prefix_cache", True)):
        if hasattr(eng, knob):
            assert getattr(eng, knob) == want, knob
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], phase="plan", model_role="policy", max_tokens=4)
    out = eng.generate([req])
    assert len(out) == 1 and out[0].error is None and out[0].tokens_out >= 1, out
    assert run.engine("") is eng  # cached


def test_run_sampling_defaults_follow_generation_config(tmp_path):
    """inference.generation_config=auto: the served folder's generation_config.json, then the base
    checkpoint's (an exported specialist carries fewer fields); inference.repetition_penalty wins."""
    import importlib
    import json

    from launch.run import Run
    base, spec = tmp_path / "base", tmp_path / "specialist"
    base.mkdir()
    spec.mkdir()
    (base / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True}))
    (spec / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "top_p": 0.9}))
    cfg = importlib.import_module("configs.tiny").get_config()
    cfg.model.checkpoint = str(base)
    run = Run(cfg, str(tmp_path / "run"))
    assert run.sampling_defaults(str(base)) == {"top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert run.sampling_defaults(str(spec)) == {"top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    cfg.inference.repetition_penalty = 1.1
    assert run.sampling_defaults(str(spec))["repetition_penalty"] == 1.1
    cfg.inference.generation_config = "none"
    assert run.sampling_defaults(str(spec)) == {"repetition_penalty": 1.1}
    cfg.model.checkpoint = ""
    cfg.inference.repetition_penalty = None
    assert run.sampling_defaults("") == {}
