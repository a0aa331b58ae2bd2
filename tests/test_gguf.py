"""GGUF import on small synthetic files: every dequantizable type, qwen2/qwen3 against transformers,
split files, bad files, config, the CLI, and `pkg:<name>` checkpoints built from fake packages.

The files are written here with gguf-py's GGUFWriter the way llama.cpp's converter writes them
(ggml dimension order, norms and biases in F32); the expected weights are what `gguf.quants`
dequantizes from the very bytes written, so the importer must reproduce them exactly.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from automem_jax.models import gguf as am_gguf  # noqa: E402
from automem_jax.models import hf, packaged, qwen  # noqa: E402
from tests.hf_fixtures import HFModel, padded_batch  # noqa: E402

# ---- writing synthetic GGUF files ------------------------------------------------------------

# Byte offsets of the f16 scale fields (d, dmin) in one K-quant block; random bytes there can be
# inf/NaN, so they are overwritten with small values (and the magnitude keeps weights ~0.1).
K_SCALE_FIELDS = {T.Q2_K: ((80, 82), 2e-3), T.Q3_K: ((108,), 1e-3), T.Q4_K: ((0, 2), 2e-4),
                  T.Q5_K: ((0, 2), 1e-4), T.Q6_K: ((208,), 1e-4)}
QUANTIZABLE = (T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # gguf.quants.quantize implements these


def gguf_layout(cfg: qwen.QwenConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (transformers name, transformers shape), in llama.cpp's naming."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"token_embd.weight": ("model.embed_tokens.weight", (V, H)),
           "output_norm.weight": ("model.norm.weight", (H,))}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = ("lm_head.weight", (V, H))
    for i in range(cfg.num_layers):
        layer = {"attn_norm.weight": ("input_layernorm.weight", (H,)),
                 "ffn_norm.weight": ("post_attention_layernorm.weight", (H,)),
                 "attn_q.weight": ("self_attn.q_proj.weight", (q, H)),
                 "attn_k.weight": ("self_attn.k_proj.weight", (kv, H)),
                 "attn_v.weight": ("self_attn.v_proj.weight", (kv, H)),
                 "attn_output.weight": ("self_attn.o_proj.weight", (H, q)),
                 "ffn_gate.weight": ("mlp.gate_proj.weight", (I, H)),
                 "ffn_up.weight": ("mlp.up_proj.weight", (I, H)),
                 "ffn_down.weight": ("mlp.down_proj.weight", (H, I))}
        if cfg.qkv_bias:
            layer.update({"attn_q.bias": ("self_attn.q_proj.bias", (q,)),
                          "attn_k.bias": ("self_attn.k_proj.bias", (kv,)),
                          "attn_v.bias": ("self_attn.v_proj.bias", (kv,))})
        if cfg.qk_norm:
            layer.update({"attn_q_norm.weight": ("self_attn.q_norm.weight", (hd,)),
                          "attn_k_norm.weight": ("self_attn.k_norm.weight", (hd,))})
        out.update({f"blk.{i}.{k}": (f"model.layers.{i}.{n}", s) for k, (n, s) in layer.items()})
    return out


def random_value(name: str, shape, rng) -> np.ndarray:
    if name.endswith("norm.weight"):  # norms near 1 and nonzero biases, so both matter in the logits
        return (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def encode(x: np.ndarray, qtype: T, rng):
    """(array for GGUFWriter.add_tensor, raw_dtype, float32 values the file holds or None)."""
    if qtype == T.F32:
        return x, None, x
    if qtype == T.F16:
        a = x.astype(np.float16)
        return a, None, a.astype(np.float32)
    if qtype in QUANTIZABLE:
        raw = quants.quantize(x, qtype)
    else:  # K quants (no quantizer in gguf-py) and types we expect to be refused: valid random blocks
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert x.shape[-1] % block == 0, (x.shape, qtype)
        n = x.size // block
        raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
        offsets, scale = K_SCALE_FIELDS.get(qtype, ((), 0))
        for off in offsets:
            d = (scale * rng.uniform(0.5, 1.0, n)).astype("<f2")
            raw[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
        raw = raw.reshape(*x.shape[:-1], x.shape[-1] // block * size)
    if qtype.name not in am_gguf.DEQUANTIZABLE:
        return raw, qtype, None
    want = np.asarray(quants.dequantize(raw, qtype), np.float32).reshape(x.shape)
    assert np.isfinite(want).all() and np.abs(want).max() < 2, qtype
    return raw, qtype, want


def byte_level_vocab(vocab: int):
    """A tiny byte-level BPE in GGUF form: the 256 byte symbols, merges of letter pairs, and an
    <|endoftext|> control token last (vocab ids = embedding rows)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters][:vocab - 257]
    tokens += [a + b for a, b in pairs] + ["<|endoftext|>"]
    types = [1] * (vocab - 1) + [3]  # NORMAL..., CONTROL
    return tokens, types, [f"{a} {b}" for a, b in pairs]


CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")


def write_gguf(path, cfg: qwen.QwenConfig, types: dict | None = None, *, seed: int = 0, arch: str | None = None,
               tokenizer: bool = False, split_max_tensors: int = 0, extra: dict | None = None,
               drop: tuple = ()) -> dict[str, np.ndarray]:
    """Writes a random model of `cfg` as GGUF (`types`: GGUF name -> GGML type, F32 otherwise);
    returns transformers name -> the float32 tensor the file holds."""
    rng = np.random.default_rng(seed)
    arch = arch or cfg.arch
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    kv = {"block_count": cfg.num_layers, "embedding_length": cfg.hidden_size,
          "feed_forward_length": cfg.intermediate_size, "attention.head_count": cfg.num_heads,
          "attention.head_count_kv": cfg.num_kv_heads, "context_length": cfg.max_position_embeddings,
          "rope.freq_base": float(cfg.rope_theta), "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps)}
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:  # llama.cpp writes it when it is not implied
        kv.update({"attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim})
    kv = {f"{arch}.{k}": v for k, v in kv.items()}
    kv.update(extra or {})  # extra keys, or wrong values for the standard ones
    for key, val in kv.items():
        {str: w.add_string, int: w.add_uint32, float: w.add_float32}[type(val)](key, val)
    if tokenizer:
        tokens, token_types, merges = byte_level_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges(merges)
        w.add_bos_token_id(cfg.vocab_size - 1)
        w.add_eos_token_id(cfg.vocab_size - 1)
        w.add_chat_template(CHAT_TEMPLATE)
    want = {}
    for gname, (hname, shape) in gguf_layout(cfg).items():
        if gname in drop:
            continue
        x = random_value(gname, shape, rng)
        data, raw_dtype, held = encode(x, (types or {}).get(gname, T.F32), rng)
        w.add_tensor(gname, data, raw_dtype=raw_dtype)
        want[hname] = held
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def write_hf_folder(folder, cfg: qwen.QwenConfig, tensors: dict[str, np.ndarray]) -> str:
    """A safetensors folder holding `tensors`: the reference the GGUF import must equal."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return str(folder)


def params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


def logits(model, vocab: int):
    ids, mask = padded_batch(vocab)
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), mask.astype(bool)


# Hidden 256 and MLP 512: every projection's input dimension is a whole number of 256-element
# K-quant blocks. Untied, so both token_embd and output are in the file.
MIXED_CFG = qwen.QwenConfig(arch="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, qkv_bias=True, qk_norm=False, max_position_embeddings=256,
                            bos_token_id=None, eos_token_id=None)
MIXED_TYPES = {
    "token_embd.weight": T.Q8_0, "output.weight": T.Q6_K,
    "blk.0.attn_q.weight": T.Q4_0, "blk.0.attn_k.weight": T.Q5_0, "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.F16, "blk.0.ffn_gate.weight": T.BF16, "blk.0.ffn_up.weight": T.Q4_K,
    "blk.0.ffn_down.weight": T.Q5_K,
    "blk.1.attn_q.weight": T.Q4_1, "blk.1.attn_k.weight": T.Q5_1, "blk.1.attn_v.weight": T.Q6_K,
    "blk.1.attn_output.weight": T.Q4_K, "blk.1.ffn_gate.weight": T.Q2_K, "blk.1.ffn_up.weight": T.Q3_K,
    "blk.1.ffn_down.weight": T.F16,
}
# hidden 64: small, for the tests that need no K quants.
SMALL_QWEN2 = qwen.QwenConfig(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, qkv_bias=True, qk_norm=False, max_position_embeddings=256,
                              bos_token_id=511, eos_token_id=511)


def mixed_type_counts() -> dict[str, int]:
    out: dict[str, int] = {}
    for gname in gguf_layout(MIXED_CFG):
        t = MIXED_TYPES.get(gname, T.F32).name
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed-type qwen2 GGUF, its dequantized contents as a safetensors folder, and that
    folder's model and logits (the reference several tests compare with)."""
    root = tmp_path_factory.mktemp("gguf_mixed")
    path = str(root / "mixed.gguf")
    want = write_gguf(path, MIXED_CFG, MIXED_TYPES)
    folder = write_hf_folder(root / "ref_hf", MIXED_CFG, want)
    ref_model, _ = hf.load_pretrained(folder)
    ref_logits, real = logits(ref_model, MIXED_CFG.vocab_size)
    return dict(root=root, path=path, want=want, folder=folder, model=ref_model, logits=ref_logits, real=real)


@pytest.fixture(scope="module")
def small_qwen2(tmp_path_factory):
    """A tied qwen2 GGUF of F32/F16 tensors with a byte-level tokenizer in its metadata."""
    root = tmp_path_factory.mktemp("gguf_small")
    path = str(root / "small.gguf")
    types = {n: T.F16 for n in gguf_layout(SMALL_QWEN2) if n.endswith(("q.weight", "ffn_up.weight"))}
    want = write_gguf(path, SMALL_QWEN2, types, seed=3, tokenizer=True)
    return dict(root=root, path=path, want=want)


# ---- 1. every type, by name and layout ---------------------------------------------------------

def test_mixed_types_round_trip(mixed):
    with am_gguf.GGUFModel.open(mixed["path"]) as g:
        counts = g.type_counts()
        # Each tensor dequantizes to exactly what gguf-py makes of the bytes written.
        for name, want in mixed["want"].items():
            got = g.get_tensor(name)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            assert np.array_equal(got, want), name
    assert counts == mixed_type_counts() and {"Q4_K", "Q5_K", "Q6_K", "BF16", "Q4_0", "Q5_0", "Q8_0"} <= counts.keys()

    model, cfg = hf.load_pretrained(mixed["path"])
    assert cfg.replace(bos_token_id=None, eos_token_id=None) == MIXED_CFG
    # Same parameters as the safetensors folder of the same values: names, [in, out] and head
    # layouts all map as for a transformers checkpoint.
    assert_same_params(model, mixed["model"])
    ours, real = logits(model, cfg.vocab_size)
    assert np.abs(ours - mixed["logits"])[real].max() < 1e-5
    assert np.abs(mixed["logits"]).max() > 0.1  # the weights really reach the logits


def test_gguf_folder_loads_like_the_file(mixed, tmp_path):
    # A folder holding only model.gguf (what pkg:<name> resolves to, minus config.json) reads as the file.
    shutil.copy(mixed["path"], tmp_path / "model.gguf")
    model, _ = hf.load_pretrained(str(tmp_path))
    assert_same_params(model, mixed["model"])


# ---- 2. transformers as an independent reader ---------------------------------------------------

def _transformers_from_gguf(path):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
    return HFModel(path, m, m.config.model_type)


def test_qwen2_matches_transformers_gguf_loader(small_qwen2):
    pytest.importorskip("torch")
    ref = _transformers_from_gguf(small_qwen2["path"])
    model, cfg = hf.load_pretrained(small_qwen2["path"])
    assert cfg.tie_word_embeddings and cfg.qkv_bias and cfg.bos_token_id == cfg.eos_token_id == 511
    assert ref.torch_model.config.tie_word_embeddings
    ours, real = logits(model, cfg.vocab_size)
    ids, mask = padded_batch(cfg.vocab_size)
    assert np.abs(ours - ref.logits(ids, mask))[real].max() < 1e-4


# qwen3 with head_dim 128 != hidden / heads, so the importer must read attention.key_length;
# transformers' GGUF loader ignores that key, but 128 is Qwen3Config's default, so it agrees.
QWEN3_CFG = qwen.QwenConfig(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, qkv_bias=False, qk_norm=True, max_position_embeddings=256,
                            bos_token_id=511, eos_token_id=511)


def test_qwen3_matches_safetensors_and_transformers(tmp_path):
    path = str(tmp_path / "q3.gguf")
    types = {n: T.Q8_0 for n in gguf_layout(QWEN3_CFG) if n.endswith(("attn_q.weight", "ffn_down.weight"))}
    want = write_gguf(path, QWEN3_CFG, types, seed=5, tokenizer=True)
    assert not any(k.endswith("bias") for k in want) and "model.layers.1.self_attn.k_norm.weight" in want
    model, cfg = hf.load_pretrained(path)
    assert cfg == QWEN3_CFG
    ours, real = logits(model, cfg.vocab_size)
    ref, _ = hf.load_pretrained(write_hf_folder(tmp_path / "hf", QWEN3_CFG, want))
    assert_same_params(model, ref)
    assert np.abs(ours - logits(ref, cfg.vocab_size)[0])[real].max() < 1e-5
    pytest.importorskip("torch")
    theirs = _transformers_from_gguf(path)
    assert theirs.torch_model.config.head_dim == 128
    ids, mask = padded_batch(cfg.vocab_size)
    assert np.abs(ours - theirs.logits(ids, mask))[real].max() < 1e-4


# ---- 3. split files ------------------------------------------------------------------------------

def test_split_files_load_like_one(mixed, tmp_path):
    n = len(gguf_layout(MIXED_CFG))
    # gguf-py's writer splits as llama.cpp's gguf-split does: metadata in the first file,
    # split.no / split.count / split.tensors.count in each.
    want = write_gguf(tmp_path / "m.gguf", MIXED_CFG, MIXED_TYPES, split_max_tensors=(n + 1) // 2)
    assert all(np.array_equal(want[k], mixed["want"][k]) for k in want)  # same seed, same bytes
    first, second = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    assert sorted(os.listdir(tmp_path)) == [first.name, second.name]
    r2 = gguf.GGUFReader(str(second))
    assert "qwen2.block_count" not in r2.fields and r2.fields["split.no"].contents() == 1
    assert 0 < len(r2.tensors) < n

    model, cfg = hf.load_pretrained(str(first))
    assert cfg.replace(bos_token_id=None, eos_token_id=None) == MIXED_CFG
    assert_same_params(model, mixed["model"])
    with am_gguf.GGUFModel.open(str(second)) as g:  # any split's name opens the whole set
        assert len(g.tensors) == n and g.hf_config()["num_hidden_layers"] == 2

    os.remove(second)
    with pytest.raises(FileNotFoundError, match="m-00002-of-00002.gguf"):
        hf.load_pretrained(str(first))


# ---- 4. bad files --------------------------------------------------------------------------------

def test_truncated_file_names_the_tensor(mixed, tmp_path):
    reader = gguf.GGUFReader(mixed["path"])
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    assert t.tensor_type == T.Q6_K
    cut = int(t.data_offset) + int(t.n_bytes) // 2
    del reader
    path = str(tmp_path / "cut.gguf")
    with open(mixed["path"], "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(cut))
    # The first tensor that runs past the end is the one cut in half; later ones are missing too.
    with pytest.raises(ValueError, match=r"cut\.gguf.*tensor blk\.1\.attn_v\.weight \(Q6_K.*truncated"):
        hf.load_pretrained(path)


def test_truncated_header_names_the_path(small_qwen2, tmp_path):
    path = str(tmp_path / "head.gguf")
    with open(small_qwen2["path"], "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(1000))  # inside the metadata (the token list)
    with pytest.raises(ValueError, match=r"head\.gguf"):
        am_gguf.GGUFModel.open(path)
    assert hf.main(["inspect", path]) == 2


def test_tensors_disagreeing_with_metadata_are_named(tmp_path):
    path = str(tmp_path / "missing.gguf")
    write_gguf(path, SMALL_QWEN2, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing\.gguf: missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_pretrained(path)
    path = str(tmp_path / "ffn.gguf")
    write_gguf(path, SMALL_QWEN2, extra={"qwen2.feed_forward_length": 96})
    with pytest.raises(ValueError, match=r"ffn\.gguf: tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight "
                                         r"has shape"):
        hf.load_pretrained(path)


def test_undequantizable_type_is_named(tmp_path):
    path = str(tmp_path / "iq.gguf")
    write_gguf(path, MIXED_CFG, {"blk.0.ffn_up.weight": T.IQ2_XXS})
    # The file opens and inspects; only the import of that tensor is refused.
    report = hf.inspect(path)
    assert "IQ2_XXS 1" in report and "complete and consistent" in report
    with pytest.raises(ValueError, match=r"iq\.gguf: tensor blk\.0\.ffn_up\.weight has type IQ2_XXS"):
        hf.load_pretrained(path)


def test_unknown_type_number_is_named(tmp_path):
    cfg = SMALL_QWEN2
    path = str(tmp_path / "odd.gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    # A float32 array with a raw type outside the GGML enum is written as-is: type id 200.
    w.add_tensor("token_embd.weight", np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32), raw_dtype=200)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"odd\.gguf: tensor token_embd\.weight has unknown GGML type 200"):
        am_gguf.GGUFModel.open(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = str(tmp_path / "llama.gguf")
    write_gguf(path, SMALL_QWEN2, arch="llama")
    with pytest.raises(ValueError, match=r"llama\.gguf: GGUF architecture 'llama' is not supported"):
        hf.load_pretrained(path)
    with pytest.raises(ValueError, match="'llama'"):
        qwen.QwenConfig.from_hf(path)


def test_not_a_gguf_names_the_path(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match=r"bad\.gguf"):
        hf.load_pretrained(str(bad))
    text = tmp_path / "text.gguf"
    text.write_text("this is not a model, only some text long enough to hold a header\n" * 4)
    with pytest.raises(ValueError, match=r"text\.gguf"):
        am_gguf.GGUFModel.open(str(text))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf"):
        am_gguf.GGUFModel.open(str(empty))
    with pytest.raises(FileNotFoundError):
        hf.load_pretrained(str(tmp_path / "absent.gguf"))


# ---- 5. config ----------------------------------------------------------------------------------

def test_config_from_gguf(mixed, small_qwen2, tmp_path):
    cfg = qwen.QwenConfig.from_hf(mixed["path"], dtype="bfloat16")
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", 2, 4, 2, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (256, 512, 512)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 256
    assert cfg.qkv_bias and not cfg.qk_norm and not cfg.tie_word_embeddings
    assert cfg.bos_token_id is None and cfg.dtype == "bfloat16"  # no tokenizer metadata in this file
    tied = qwen.QwenConfig.from_hf(small_qwen2["path"])  # no output.weight: the head is the embedding
    assert tied.tie_word_embeddings and tied.head_dim == 16 and tied.eos_token_id == 511

    path = str(tmp_path / "q3.gguf")
    write_gguf(path, QWEN3_CFG.replace(rope_theta=5e5, rms_norm_eps=1e-5))
    c3 = qwen.QwenConfig.from_hf(path)
    assert c3.arch == "qwen3" and c3.head_dim == 128 and c3.qk_norm and not c3.qkv_bias and not c3.o_bias
    assert c3.rope_theta == 5e5 and c3.rms_norm_eps == 1e-5

    yarn = str(tmp_path / "yarn.gguf")
    write_gguf(yarn, SMALL_QWEN2, extra={"qwen2.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        qwen.QwenConfig.from_hf(yarn)


# ---- 6. command line ----------------------------------------------------------------------------

def test_cli_import_hf_without_tokenizer(mixed, tmp_path, capsys):
    out = str(tmp_path / "hf")
    assert hf.main(["import", mixed["path"], "--format", "hf", "--out", out, "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "no tokenizer written" in err
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors"} <= files and "tokenizer.json" not in files
    model, _ = hf.load_pretrained(out)
    assert_same_params(model, mixed["model"])
    ours, real = logits(model, MIXED_CFG.vocab_size)
    assert np.abs(ours - mixed["logits"])[real].max() < 1e-5


def test_cli_import_hf_ships_the_gguf_tokenizer(small_qwen2, tmp_path, capsys):
    from automem_jax.models.tokenizer import load_tokenizer
    out = str(tmp_path / "hf")
    assert hf.main(["import", small_qwen2["path"], "--format", "hf", "--out", out]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "tokenizer.json" in os.listdir(out)
    tok = load_tokenizer(out)
    assert tok.encode("ab ba", add_special_tokens=False) == \
        am_gguf.load_tokenizer(small_qwen2["path"]).encode("ab ba", add_special_tokens=False)
    model, _ = hf.load_pretrained(out)
    ref, _ = hf.load_pretrained(small_qwen2["path"])
    assert_same_params(model, ref)


def test_cli_import_orbax_and_inspect(mixed, tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert hf.main(["import", mixed["path"], "--out", ckpt, "--format", "orbax"]) == 0
    assert hf.main(["export", "--checkpoint", ckpt, "--tokenizer", "none", out]) == 0
    model, _ = hf.load_pretrained(out)
    assert_same_params(model, mixed["model"])
    ours, real = logits(model, MIXED_CFG.vocab_size)
    assert np.abs(ours - mixed["logits"])[real].max() < 1e-5

    capsys.readouterr()
    assert hf.main(["inspect", mixed["path"]]) == 0
    text = capsys.readouterr().out
    assert "GGUF" in text and "complete and consistent" in text and "arch: qwen2" in text
    types = ", ".join(f"{t} {k}" for t, k in mixed_type_counts().items())
    assert f"27 tensors: {types})" in text and "F32 11, Q2_K 1" in types
    assert hf.main(["inspect", str(tmp_path / "absent.gguf")]) == 2
    assert "error:" in capsys.readouterr().err


# ---- 7. pkg:<name> from installed packages --------------------------------------------------------

def fake_packages(root, data: bytes, n: int = 3) -> tuple[str, ...]:
    """`n` importable packages each holding one chunk of `data` as data/partNN.bin, in order."""
    tag = uuid.uuid4().hex[:8]  # fresh module names: nothing cached from another test
    mods = []
    bounds = [len(data) * k // n for k in range(n + 1)]
    for k in range(n):
        mod = f"amfake_{tag}_{k + 1}"
        os.makedirs(os.path.join(root, mod, "data"))
        open(os.path.join(root, mod, "__init__.py"), "w").close()
        with open(os.path.join(root, mod, "data", f"part{k + 1:02d}.bin"), "wb") as f:
            f.write(data[bounds[k]:bounds[k + 1]])
        mods.append(mod)
    return tuple(mods)


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    """Registers `pkg:fake` over fake packages; returns a function (gguf path, size=None) -> spec."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("AUTOMEM_JAX_CACHE", str(tmp_path / "cache"))

    def register(path, size=None):
        data = open(path, "rb").read()
        mods = fake_packages(str(site), data)
        importlib.invalidate_caches()
        spec = packaged.Packaged(description="fake test model", modules=mods,
                                 requirements=tuple(m.replace("_", "-") + "==0" for m in mods),
                                 size=len(data) if size is None else size)
        monkeypatch.setitem(packaged.PACKAGES, "fake", spec)
        return spec

    register.site = site
    register.cache = tmp_path / "cache" / "pkg"
    return register


def test_packaged_resolve_assembles_and_loads(small_qwen2, fake_pkg):
    from automem_jax.models.tokenizer import load_tokenizer
    spec = fake_pkg(small_qwen2["path"])
    assert packaged.resolve("some/folder") == "some/folder"
    folder = packaged.resolve("pkg:fake")
    assert folder == str(fake_pkg.cache / "fake")
    files = set(os.listdir(folder))
    assert {"model.gguf", "config.json", "SOURCE.json", "DONE", "tokenizer.json"} <= files
    assert open(os.path.join(folder, "model.gguf"), "rb").read() == open(small_qwen2["path"], "rb").read()
    with am_gguf.GGUFModel.open(small_qwen2["path"]) as g:
        assert json.load(open(os.path.join(folder, "config.json"))) == g.hf_config()
    source = json.load(open(os.path.join(folder, "SOURCE.json")))
    assert source["checkpoint"] == "pkg:fake" and source["bytes"] == spec.size
    assert list(source["packages"]) == list(spec.requirements)
    assert os.listdir(fake_pkg.cache) == ["fake"]  # no half-built folder left beside it

    # The second call uses the cache: it works with the packages gone.
    shutil.rmtree(fake_pkg.site)
    importlib.invalidate_caches()
    assert packaged.resolve("pkg:fake") == folder

    model, cfg = hf.load_pretrained("pkg:fake")
    ref, ref_cfg = hf.load_pretrained(small_qwen2["path"])
    assert cfg == ref_cfg == qwen.QwenConfig.from_hf("pkg:fake")
    assert_same_params(model, ref)
    tok = load_tokenizer("pkg:fake")
    # "ab" merges to id 257, " ba" to the byte symbol for " " (32) and merged "ba" (256 + 26).
    assert tok.encode("ab ba", add_special_tokens=False) == [257, 32, 282]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|endoftext|>user: hi"


def test_packaged_model_needs_tokenizer_metadata(mixed, fake_pkg):
    # A named checkpoint is a usable policy: without a tokenizer in its GGUF it is refused, and
    # nothing half-built stays in the cache.
    fake_pkg(mixed["path"])
    with pytest.raises(ValueError, match="no tokenizer could be built"):
        packaged.resolve("pkg:fake")
    assert not os.listdir(packaged.cache_dir())


def test_packaged_errors(small_qwen2, fake_pkg, monkeypatch):
    fake_pkg(small_qwen2["path"])
    with pytest.raises(ValueError, match=r"unknown packaged checkpoint 'pkg:nope'.*pkg:fake.*"
                                         r"pkg:qwen2\.5-coder-0\.5b-instruct"):
        packaged.resolve("pkg:nope")

    # Wrong total size: refused, and nothing left in the cache.
    spec = fake_pkg(small_qwen2["path"], size=os.path.getsize(small_qwen2["path"]) + 1)
    with pytest.raises(ValueError, match=f"expected {spec.size}"):
        packaged.resolve("pkg:fake")
    assert os.listdir(fake_pkg.cache) == []

    missing = packaged.Packaged(description="absent", modules=("amfake_absent_module_1",),
                                requirements=("amfake-absent==1",), size=1)
    monkeypatch.setitem(packaged.PACKAGES, "fake", missing)
    with pytest.raises(FileNotFoundError, match=r"amfake-absent==1.*pip install -e '\.\[models\]'"):
        packaged.resolve("pkg:fake")
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[models\]'"):
        hf.load_pretrained("pkg:fake")

    # A package without its chunk is named.
    (fake_pkg.site / "amfake_nodata").mkdir()
    (fake_pkg.site / "amfake_nodata" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    monkeypatch.setitem(packaged.PACKAGES, "fake", packaged.Packaged("no data", ("amfake_nodata",), ("x==1",), 1))
    with pytest.raises(FileNotFoundError, match=r"amfake_nodata should hold one data/\*\.bin chunk"):
        packaged.resolve("pkg:fake")


def test_assemble_checks_size_and_magic(tmp_path):
    def chunks(*data):
        paths = []
        for chunk in data:
            p = tmp_path / f"p{len(list(tmp_path.iterdir()))}.bin"
            p.write_bytes(chunk)
            paths.append(str(p))
        return paths

    out = str(tmp_path / "out.gguf")
    good = chunks(b"GG", b"UF-and-more")
    packaged.assemble(good, out, expected_size=13)
    assert open(out, "rb").read() == b"GGUF-and-more"
    with pytest.raises(ValueError, match="assembled 13 bytes from 2 parts, expected 14"):
        packaged.assemble(good, out, expected_size=14)
    with pytest.raises(ValueError, match="GGUF magic"):
        packaged.assemble(chunks(b"NOTG", b"GUF"), out)


def test_gguf_on_gcs_loads_like_the_local_file(small_qwen2, gcs_emulator):
    from automem_jax import storage
    from automem_jax.models.tokenizer import load_tokenizer
    remote = f"{gcs_emulator}/gguf/small.gguf"
    storage.upload_file(small_qwen2["path"], remote)
    model, cfg = hf.load_pretrained(remote)
    local, _ = hf.load_pretrained(small_qwen2["path"])
    assert_same_params(model, local)
    assert qwen.QwenConfig.from_hf(remote) == cfg
    tok, want = load_tokenizer(remote), load_tokenizer(small_qwen2["path"])
    assert tok("hello world")["input_ids"] == want("hello world")["input_ids"]
