"""Export to a transformers-loadable folder, import back, gs:// folders, and bad folders."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from automem_jax import storage
from automem_jax.models import hf, qwen, qwen_presets
from tests.hf_fixtures import padded_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _torch_logits(path, ids, mask):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(pos)).logits.numpy()


def _perturb_norms(model, seed=0):
    """Random init leaves norms at 1 and biases at 0; make them matter for the round trip."""
    rng = np.random.RandomState(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("scale", "q_bias", "k_bias", "v_bias"):
            x = v.get_value()
            v.set_value(x + jnp.asarray(0.2 * rng.randn(*x.shape), x.dtype))


@pytest.mark.parametrize("arch,tied,scan", [("qwen3", True, False), ("qwen2", False, True)])
def test_export_loads_in_transformers_with_same_logits(tmp_path, arch, tied, scan):
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, tie_word_embeddings=tied, scan_layers=scan)
    cfg = qwen.QwenConfig(arch=arch, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", **base)
    model = qwen.init_model(cfg, seed=1)
    _perturb_norms(model)
    out = tmp_path / "export"
    files = hf.save_pretrained(model, cfg, str(out), max_shard_size="40KB")
    assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 1
    ids, mask = padded_batch(512)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = _torch_logits(str(out), ids, mask)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() < 1e-4

    again, cfg2 = hf.load_pretrained(str(out), scan_layers=scan)
    assert cfg2.replace(scan_layers=scan) == cfg
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_import_export_import_is_identity_and_tokenizer_ships(hf_tiny_qwen3, tmp_path):
    from automem_jax.models.tokenizer import load_tokenizer
    model, cfg = hf.load_pretrained(hf_tiny_qwen3.path)
    tok = load_tokenizer()
    files = hf.save_pretrained(model, cfg, str(tmp_path / "x"), tokenizer=tok)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    gen = json.loads((tmp_path / "x" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id
    back, _ = hf.load_pretrained(str(tmp_path / "x"))
    a, b = _params(model), _params(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # The exported tokenizer loads on its own, chat template included.
    tok2 = load_tokenizer(str(tmp_path / "x"))
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_bf16_export_reloads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = qwen_presets.preset("tiny", vocab_size=512)
    model = qwen.init_model(cfg)
    hf.save_pretrained(model, cfg, str(tmp_path), dtype="bfloat16")
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert m.dtype == torch.bfloat16
    ref = np.asarray(model.embed_tokens[...]).astype(jnp.bfloat16).astype(np.float32)
    assert np.array_equal(m.model.embed_tokens.weight.detach().float().numpy(), ref)


def test_gcs_import_and_export(gcs_emulator, hf_tiny_qwen2, tmp_path):
    # Shard the reference folder so the gs:// path reads an index and several files.
    local_model, cfg = hf.load_pretrained(hf_tiny_qwen2.path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(local_model, cfg, str(sharded), max_shard_size="30KB")
    remote = f"{gcs_emulator}/models/qwen2"
    storage.copy_tree(str(sharded), remote)
    assert hf.INDEX_FILE in storage.listdir(remote)
    from_gcs, cfg_gcs = hf.load_pretrained(remote)
    assert cfg_gcs == cfg
    a, b = _params(local_model), _params(from_gcs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    out = f"{gcs_emulator}/exports/qwen2"
    hf.save_pretrained(from_gcs, cfg_gcs, out)
    assert {"config.json", "model.safetensors"} <= set(storage.listdir(out))
    back, _ = hf.load_pretrained(out)
    c = _params(back)
    assert all(np.array_equal(a[k], c[k]) for k in a)


def test_sharded_import_places_params_on_mesh(hf_tiny_qwen3):
    from automem_jax.parallel.mesh import make_mesh
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model, cfg = hf.load_pretrained(hf_tiny_qwen3.path, mesh=mesh)
    q = model.layers[0].self_attn.q_kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 2, 16)
    ref, _ = hf.load_pretrained(hf_tiny_qwen3.path)
    assert np.array_equal(np.asarray(q), np.asarray(ref.layers[0].self_attn.q_kernel[...]))


# ---- bad input ------------------------------------------------------------------------------

def _copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def test_missing_tensor_is_named(hf_tiny_qwen3, tmp_path):
    d = _copy_folder(hf_tiny_qwen3.path, str(tmp_path / "m"))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_pretrained(d)


def test_shape_mismatch_is_named(hf_tiny_qwen3, tmp_path):
    d = _copy_folder(hf_tiny_qwen3.path, str(tmp_path / "m"))
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["intermediate_size"] = 96
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"):
        hf.load_pretrained(d)


def test_unsupported_architecture_is_named(hf_tiny_qwen3, tmp_path):
    d = _copy_folder(hf_tiny_qwen3.path, str(tmp_path / "m"))
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*LlamaForCausalLM"):
        hf.load_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_pretrained(str(tmp_path))
    cfg.update(model_type="qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        hf.load_pretrained(d)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match=r"unknown model preset 'qwen9'.*qwen2\.5-32b.*qwen3-32b"):
        qwen_presets.preset("qwen9")


def test_cli_inspect_import_export(hf_tiny_qwen2, tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "automem_jax.models.hf", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    r = run("inspect", hf_tiny_qwen2.path)
    assert r.returncode == 0, r.stderr
    assert "arch: qwen2" in r.stdout and "complete and consistent" in r.stdout
    r = run("import", hf_tiny_qwen2.path, "--out", str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr
    r = run("export", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", "none", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    a, _ = hf.load_pretrained(hf_tiny_qwen2.path)
    b, _ = hf.load_pretrained(str(tmp_path / "hf"))
    pa, pb = _params(a), _params(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and "error:" in r.stderr
