"""Shared by the model benchmarks: one random Qwen3, as a transformers model and as ours."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936, help="default: the Qwen3 vocabulary")


def model_pair(args, dtype: str = "float32", initializer_range: float = 0.02):
    """(transformers model, our model): the same random weights, ours imported from the HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from automem_jax.models import hf

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                      tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=initializer_range)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = AutoModelForCausalLM.from_config(cfg).to(tdtype).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours, _ = hf.load_pretrained(d, dtype=dtype)
    return ref, ours
