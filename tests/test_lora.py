"""LoRA: adapters, merge, training only the adapters, sharding, merged and PEFT exports checked
against transformers / peft."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from automem_jax.models import hf, lora, qwen, qwen_presets
from automem_jax.parallel import mesh as pmesh
from tests.hf_fixtures import padded_batch

VOCAB = 512


def _cfg(arch="qwen3", scan=False, **kw):
    # The shapes of tests/hf_fixtures.py: small enough for a 2-core CPU.
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, tie_word_embeddings=True, scan_layers=scan)
    base.update(kw)
    return qwen.QwenConfig(arch=arch, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", **base)


def _flat(state):
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def _randomize_lora(model, seed=1, std=0.1):
    """Fresh B is zero (adapters are a no-op); random A and B make every comparison meaningful.
    Values are drawn per layer, so a scanned and an unscanned model get the same adapters."""
    rng = np.random.RandomState(seed)
    for _, v in sorted(nnx.to_flat_state(lora.lora_state(model)), key=lambda pv: _canon(pv[0])):
        x = v.get_value()
        val = jnp.asarray(std * rng.randn(*x.shape), x.dtype)
        v.set_value(jax.device_put(val, x.sharding) if isinstance(x.sharding, NamedSharding) else val)


def _canon(path):
    return tuple(str(p) for p in path if not isinstance(p, int))


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, mask)  # jitted: eager op-by-op forwards dominate test time on CPU


def _batch():
    ids, mask = padded_batch(VOCAB)
    return jnp.asarray(ids), jnp.asarray(mask)


def _loss(model, ids, mask):
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = mask[:, 1:].astype(jnp.float32)
    return (nll * w).sum() / w.sum()


# --------------------------------------------------------------------------------------------
# Config and structure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"), (dict(targets="q,lm_head"), "targets"), (dict(targets=""), "targets"),
    (dict(param_dtype="float7"), "param_dtype"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
        lora.LoRAConfig(**kw)


def test_target_aliases():
    assert lora.LoRAConfig(targets="ATTN").modules == ("q", "k", "v", "o")
    assert lora.LoRAConfig(targets="all").modules == lora.ORDER
    assert lora.LoRAConfig(targets="down, q,v").modules == ("q", "v", "down")
    assert lora.LoRAConfig(targets=("v_proj", "gate_proj")).modules == ("v", "gate")
    assert lora.LoRAConfig(rank=4, alpha=16).scale == 4.0


@pytest.mark.parametrize("targets,expected,scan", [
    ("ATTN", ("q", "k", "v", "o"), False), ("QV", ("q", "v"), False), ("MLP", ("gate", "up", "down"), False),
    ("ALL", ("q", "k", "v", "o", "gate", "up", "down"), False), ("q,v,down", ("q", "v", "down"), True),
    ("ALL", ("q", "k", "v", "o", "gate", "up", "down"), True),
])
def test_targets_create_exactly_the_expected_adapters(targets, expected, scan):
    cfg = _cfg(scan=scan)
    model = lora.apply_lora(qwen.init_model(cfg), lora.LoRAConfig(rank=4, targets=targets))
    H, Q, K, D, F, r, L = 64, 4, 2, 16, 160, 4, 2
    shapes = {"q": ((H, r), (r, Q, D)), "k": ((H, r), (r, K, D)), "v": ((H, r), (r, K, D)),
              "o": ((Q, D, r), (r, H)), "gate": ((H, r), (r, F)), "up": ((H, r), (r, F)), "down": ((F, r), (r, H))}
    want = {}
    for i in ([None] if scan else range(L)):
        for name in expected:
            sub = "mlp" if name in ("gate", "up", "down") else "self_attn"
            prefix = "layers" if scan else f"layers/{i}"
            for ab, shape in zip("ab", shapes[name]):
                want[f"{prefix}/{sub}/{name}_lora_{ab}"] = (L, *shape) if scan else shape
    got = {k: tuple(v.shape) for k, v in _flat(lora.lora_state(model)).items()}
    assert got == want
    assert lora.lora_modules(model) == expected and lora.has_lora(model)
    # Every adapter is a LoRAParam (so an optimizer with wrt=nnx.LoRAParam finds it), with logical axes.
    for _, v in nnx.to_flat_state(lora.lora_state(model)):
        assert type(v) is nnx.LoRAParam and "lora_rank" in v.get_metadata()["logical_axes"]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, lora.LoRAConfig())


# --------------------------------------------------------------------------------------------
# Forward and merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_are_identity_and_merge_matches_unmerged(scan):
    cfg = _cfg(scan=scan)
    ids, mask = _batch()
    model = qwen.init_model(cfg, seed=3)
    base = np.asarray(_fwd(model, ids, mask))
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, targets="ALL"), seed=5)
    np.testing.assert_array_equal(np.asarray(_fwd(model, ids, mask)), base)

    # A is kaiming-uniform: nonzero, within 1/sqrt(fan_in); B is zero.
    a = np.asarray(_flat(lora.lora_state(model))["layers/self_attn/q_lora_a" if scan else "layers/0/self_attn/q_lora_a"])
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(64)

    _randomize_lora(model)
    unmerged = np.asarray(_fwd(model, ids, mask))
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters do something
    merged = lora.merge_lora(model)
    assert not lora.has_lora(merged) and lora.has_lora(model)  # a copy: the LoRA model is left as it was
    out = np.asarray(_fwd(merged, ids, mask))
    assert np.abs(out - unmerged)[np.asarray(mask, bool)].max() < 1e-5
    np.testing.assert_array_equal(np.asarray(_fwd(model, ids, mask)), unmerged)
    # Only the targeted kernels changed.
    before, after = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(merged, nnx.Param))
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert {k.rsplit("/", 1)[-1] for k in changed} == {f"{n}_kernel" for n in lora.ORDER}
    # Dropping the adapters instead gives back the base.
    np.testing.assert_array_equal(np.asarray(_fwd(lora.without_lora(model), ids, mask)), base)


def test_scanned_and_unscanned_adapters_agree(hf_tiny_qwen3):
    ids, mask = _batch()
    outs, inits = [], []
    for scan in (False, True):
        # Same base weights in both layouts (random init draws differently for stacked layers).
        base, _ = hf.load_pretrained(hf_tiny_qwen3.path, scan_layers=scan)
        m = lora.apply_lora(base, lora.LoRAConfig(rank=4, targets="ALL"), seed=2)
        inits.append(lora.adapter_arrays(m))
        _randomize_lora(m)
        outs.append(np.asarray(_fwd(m, ids, mask)))
    # Same seed -> same per-layer initial values in both layouts.
    for k in inits[0]:
        np.testing.assert_array_equal(np.asarray(inits[0][k][0]), np.asarray(inits[1][k][0]), err_msg=str(k))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_kv_cache_forward_uses_adapters():
    ids, mask = _batch()
    model = lora.apply_lora(qwen.init_model(_cfg()), lora.LoRAConfig(rank=4, targets="ALL"))
    _randomize_lora(model)
    full = np.asarray(_fwd(model, ids[:1], mask[:1]))
    cache = qwen.KVCache.init(model.cfg, 1, 16)
    logits, _ = nnx.jit(lambda m, i, c, k: m.forward_with_cache(i, c, k))(model, ids[:1], cache, mask[:1])
    np.testing.assert_allclose(np.asarray(logits), full, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Training only the adapters
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~15 s of CPU, 30+ s wall on a busy 2-core machine
@pytest.mark.parametrize("scan", [False, True])
def test_gradients_and_optimizer_touch_only_adapters(scan):
    ids, mask = _batch()
    model = lora.apply_lora(qwen.init_model(_cfg(scan=scan, remat="full" if scan else "none")),
                            lora.LoRAConfig(rank=4, targets="ALL"))
    grads = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model, ids, mask)
    g = _flat(grads)
    assert set(g) == set(_flat(lora.lora_state(model)))  # gradients for adapters only
    for k, v in g.items():
        if k.endswith("_lora_b"):
            assert np.abs(np.asarray(v)).max() > 0, k
        else:  # dL/dA = x^T dL/dh B^T is exactly zero while B is zero (the PEFT init)
            assert np.abs(np.asarray(v)).max() == 0, k

    base_before = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items() if "_lora_" not in k}
    seeds_before = _flat(nnx.state(model, lora.LoRASeed))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, ids, mask):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, ids, mask)
        opt.update(model, grads)
        return loss

    loss0 = float(step(model, opt, ids, mask))
    loss1 = float(step(model, opt, ids, mask))
    assert loss1 < loss0
    after = _flat(nnx.state(model, nnx.Param))
    for k, v in base_before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), v, err_msg=k)  # bit-identical base
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in after.items() if k.endswith("_lora_b"))
    for k, v in _flat(nnx.state(model, lora.LoRASeed)).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(seeds_before[k]))


@pytest.mark.slow  # ~15 s of CPU, 30+ s wall on a busy 2-core machine
def test_dropout_only_inside_a_key_scope(hf_tiny_qwen3):
    ids, mask = _batch()

    @nnx.jit
    def fwd(model, key):
        with lora.dropout_rng(key):  # entered inside the trace, key as an argument
            return model(ids, mask)

    outs = {}
    for scan in (False, True):
        base, _ = hf.load_pretrained(hf_tiny_qwen3.path, scan_layers=scan)
        model = lora.apply_lora(base, lora.LoRAConfig(rank=4, dropout=0.5, targets="ALL"))
        _randomize_lora(model, std=0.3)
        k1, k2 = jax.random.key(1), jax.random.key(2)
        a, a2, b = np.asarray(fwd(model, k1)), np.asarray(fwd(model, k1)), np.asarray(fwd(model, k2))
        np.testing.assert_array_equal(a, a2)
        assert np.abs(a - b).max() > 1e-3  # different keys, different masks
        e1, e2 = np.asarray(_fwd(model, ids, mask)), np.asarray(_fwd(model, ids, mask))
        np.testing.assert_array_equal(e1, e2)  # no scope: deterministic, no dropout
        assert np.abs(a - e1).max() > 1e-3
        outs[scan] = (a, e1)
        if not scan:
            # The per-layer seed feeds the key: giving layer 1 layer 0's seed changes the masks.
            model.layers[1].self_attn.lora_seed[...] = jnp.asarray(0, jnp.int32)
            model.layers[1].mlp.lora_seed[...] = jnp.asarray(0, jnp.int32)
            assert np.abs(np.asarray(fwd(model, k1)) - a).max() > 1e-3
    # A scan slices the stacked seeds, so layer l draws the same mask in both layouts.
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=1e-5)
    np.testing.assert_allclose(outs[True][1], outs[False][1], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_adapters_follow_their_base_and_match_single_device(scan):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    cfg = qwen_presets.preset("tiny", vocab_size=VOCAB, scan_layers=scan)
    lcfg = lora.LoRAConfig(rank=4, targets="ALL")
    ids, mask = _batch()
    ids, mask = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, mask[:1]])  # batch 4 divides data*fsdp

    single = lora.apply_lora(qwen.init_model(cfg, seed=0), lcfg, seed=7)
    init_1 = {k: np.asarray(v) for k, v in _flat(lora.lora_state(single)).items()}
    _randomize_lora(single)
    ref = np.asarray(_fwd(single, ids, mask))

    mesh = pmesh.make_mesh(pmesh.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = lora.apply_lora(qwen.init_model(cfg, seed=0, mesh=mesh), lcfg, seed=7)  # mesh read off the weights
    flat = _flat(lora.lora_state(sharded))
    lead = (None,) if scan else ()
    pre = "layers/" if scan else "layers/0/"
    want = {"self_attn/q_lora_a": P("fsdp", None), "self_attn/q_lora_b": P(None, "tensor", None),
            "self_attn/k_lora_b": P(None, "tensor", None), "self_attn/o_lora_a": P("tensor", None, None),
            "self_attn/o_lora_b": P(None, "fsdp"), "mlp/gate_lora_a": P("fsdp", None),
            "mlp/gate_lora_b": P(None, "tensor"), "mlp/down_lora_a": P("tensor", None),
            "mlp/down_lora_b": P(None, "fsdp")}
    for k, spec in want.items():
        arr = flat[pre + k]
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, P(*lead, *spec)), arr.ndim), (k, arr.sharding.spec)
    # Same seed, same initial adapters as on one device.
    for k, v in init_1.items():
        np.testing.assert_allclose(np.asarray(flat[k]), v, rtol=1e-6, atol=1e-8, err_msg=k)

    _randomize_lora(sharded)
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
        out = jax.jit(lambda m, i, k: m(i, k))(sharded, ids_s, mask_s)
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)
        merged = lora.merge_lora(sharded)
        base_sh = _flat(nnx.state(sharded, nnx.Param))
        for k, v in _flat(nnx.state(merged, nnx.Param)).items():
            assert v.sharding == base_sh[k].sharding, k  # merge keeps every kernel's sharding
        out_m = jax.jit(lambda m, i, k: m(i, k))(merged, ids_s, mask_s)
        np.testing.assert_allclose(np.asarray(out_m), ref, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Exports: merged HF folder and PEFT adapter
# --------------------------------------------------------------------------------------------


def _torch_logits(model, ids, mask):
    import torch
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def test_merged_export_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = _cfg("qwen2", scan=True, tie_word_embeddings=False)
    model = lora.apply_lora(qwen.init_model(cfg, seed=1), lora.LoRAConfig(rank=4, targets="ALL"))
    _randomize_lora(model)
    with pytest.raises(ValueError, match="LoRA adapters"):
        hf.save_pretrained(model, cfg, str(tmp_path / "unmerged"))  # would silently drop the fine-tuning
    merged = lora.merge_lora(model)
    hf.save_pretrained(merged, cfg, str(tmp_path / "merged"))
    ids, mask = padded_batch(VOCAB)
    ours = np.asarray(_fwd(merged, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _torch_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval(),
                           ids, mask)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() < 1e-4
    unmerged = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(unmerged - theirs)[mask.astype(bool)].max() < 1e-4


@pytest.mark.slow  # ~15 s of CPU, 30+ s wall on a busy 2-core machine
@pytest.mark.parametrize("fixture,scan", [("hf_tiny_qwen3", False), ("hf_tiny_qwen2", True)])
def test_peft_adapter_matches_peft(request, tmp_path, fixture, scan):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM
    ref = request.getfixturevalue(fixture)
    model, cfg = hf.load_pretrained(ref.path, scan_layers=scan)
    lcfg = lora.LoRAConfig(rank=4, alpha=12, dropout=0.05, targets="ALL")
    lora.apply_lora(model, lcfg)
    _randomize_lora(model)

    hf.save_pretrained(lora.without_lora(model), cfg, str(tmp_path / "base"))
    files = hf.save_peft_adapter(model, cfg, lcfg, str(tmp_path / "adapter"), base_model_name_or_path="base")
    assert set(files) == {hf.ADAPTER_CONFIG, hf.ADAPTER_FILE}
    acfg = json.loads((tmp_path / "adapter" / hf.ADAPTER_CONFIG).read_text())
    assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"], acfg["lora_dropout"], acfg["task_type"]) == \
        ("LORA", 4, 12, 0.05, "CAUSAL_LM")
    assert acfg["target_modules"] == sorted(lora.HF_MODULES.values())
    tensors = load_file(str(tmp_path / "adapter" / hf.ADAPTER_FILE))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 160)
    assert len(tensors) == 2 * 7 * 2

    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask = padded_batch(VOCAB)
    ours = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _torch_logits(peft_model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours - theirs)[valid].max() < 1e-4
    # The adapters matter at this scale (the comparison is not of two base models).
    assert np.abs(ours - ref.logits(ids, mask))[valid].max() > 1e-2

    # Round trip: a fresh base model + load_peft_adapter gives the same adapters and logits.
    fresh, _ = hf.load_pretrained(ref.path, scan_layers=not scan)
    fresh, lcfg2 = hf.load_peft_adapter(fresh, str(tmp_path / "adapter"))
    assert (lcfg2.rank, lcfg2.scale, lcfg2.dropout, lcfg2.modules) == (4, 3.0, 0.05, lora.ORDER)
    a, b = lora.adapter_arrays(model), lora.adapter_arrays(fresh)
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))
    np.testing.assert_allclose(np.asarray(_fwd(fresh, jnp.asarray(ids), jnp.asarray(mask))), ours, atol=1e-5)


def test_peft_adapter_on_gcs_and_bad_folders(gcs_emulator, tmp_path):
    model = lora.apply_lora(qwen.init_model(_cfg()), lora.LoRAConfig(rank=2, targets="QV"))
    _randomize_lora(model)
    url = f"{gcs_emulator}/lora/adapter"
    hf.save_peft_adapter(model, None, lora.LoRAConfig(rank=2, targets="QV"), url)
    back, lcfg = hf.load_peft_adapter(qwen.init_model(_cfg()), url)
    assert lcfg.modules == ("q", "v")
    for k, (x, y) in lora.adapter_arrays(model).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(lora.adapter_arrays(back)[k][0]))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(lora.adapter_arrays(back)[k][1]))

    with pytest.raises(ValueError, match="targets"):  # the config does not describe the model's adapters
        hf.save_peft_adapter(model, None, lora.LoRAConfig(rank=2, targets="ATTN"), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        hf.load_peft_adapter(qwen.init_model(_cfg()), str(tmp_path / "nothing"))
    # An adapter for a different layer count names the tensors it misses.
    hf.save_peft_adapter(model, None, lora.LoRAConfig(rank=2, targets="QV"), str(tmp_path / "ok"))
    three = qwen.init_model(_cfg(num_layers=3))
    with pytest.raises(ValueError, match="missing adapter tensor"):
        hf.load_peft_adapter(three, str(tmp_path / "ok"))
    assert not lora.has_lora(three)  # a bad folder leaves the model untouched
    with pytest.raises(ValueError, match="does not fit"):  # rank 2 adapter onto rank 4 adapters
        hf.load_peft_adapter(lora.apply_lora(qwen.init_model(_cfg()), lora.LoRAConfig(rank=4, targets="QV")),
                             str(tmp_path / "ok"))
    d = json.loads((tmp_path / "ok" / hf.ADAPTER_CONFIG).read_text())
    d["use_dora"] = True
    (tmp_path / "ok" / hf.ADAPTER_CONFIG).write_text(json.dumps(d))
    with pytest.raises(ValueError, match="use_dora"):
        hf.load_peft_adapter(qwen.init_model(_cfg()), str(tmp_path / "ok"))
