"""Presets have the Hugging Face shapes; --describe works without allocating."""

import os
import subprocess
import sys

import pytest

from automem_jax.models import qwen, qwen_presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published parameter counts (model cards), in billions.
PUBLISHED = {"qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7,
             "qwen2.5-32b": 32.76, "qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19,
             "qwen3-14b": 14.8, "qwen3-32b": 32.8}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    n = qwen_presets.preset(name).num_params() / 1e9
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n)


def test_qwen25_32b_shapes():
    c = qwen_presets.preset("qwen2.5-32b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == \
        (5120, 64, 40, 8, 27648, 152064)
    assert c.rope_theta == 1e6 and c.qkv_bias and not c.qk_norm and not c.tie_word_embeddings


def test_tiny_uses_qwen3_tokenizer_vocabulary():
    from automem_jax.models.tokenizer import load_tokenizer
    tok = load_tokenizer()
    assert len(tok) <= qwen_presets.preset("tiny").vocab_size
    assert tok.convert_tokens_to_ids("<|im_end|>") == qwen_presets.preset("tiny").eos_token_id


def test_hf_config_round_trip():
    for name in ("qwen2.5-7b", "qwen3-8b", "tiny"):
        c = qwen_presets.preset(name)
        assert qwen.QwenConfig.from_hf(c.to_hf()) == c


def test_describe_cli_32b_fsdp64():
    r = subprocess.run([sys.executable, "-m", "automem_jax.models.qwen", "--preset", "qwen2.5-32b", "--describe",
                        "--mesh", "fsdp=64"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XLA_FLAGS=""))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("parameters:"))
    count = int(line.split()[1].replace(",", ""))
    assert abs(count - 32.76e9) / 32.76e9 < 0.005
    per_dev = next(ln for ln in r.stdout.splitlines() if ln.startswith("parameter bytes per device"))
    gib = float(per_dev.split(":")[1].split()[0])
    assert abs(gib - count * 2 / 64 / 2**30) < 0.05  # bf16, fully sharded 64 ways
    bad = subprocess.run([sys.executable, "-m", "automem_jax.models.qwen", "--preset", "nope", "--describe"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=""))
    assert bad.returncode == 2 and "known presets: tiny" in bad.stderr
