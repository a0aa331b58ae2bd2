"""The batched engine against a step-by-step greedy reference (full forward, no cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from automem_jax.agent.types import ChatRequest
from automem_jax.llm.engine import Engine
from automem_jax.llm.sampling import SamplingParams
from automem_jax.models import qwen, qwen_presets
from automem_jax.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    # A large init scale makes the random model's greedy outputs varied rather than one repeated token.
    return qwen.init_model(qwen_presets.preset("tiny", initializer_range=0.5), seed=0)


_REF_LEN = 64


@jax.jit
def _full_forward(model, ids, mask):
    return model(ids, mask)


def reference(model, prompt, n, eos):
    """Greedy by full forward passes (no cache); right-padded to one length so it compiles once."""
    ids, out = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, _REF_LEN), np.int32)
        row[0, :len(ids)] = ids
        logits = _full_forward(model, jnp.asarray(row), jnp.asarray(np.arange(_REF_LEN)[None] < len(ids)))
        t = int(jnp.argmax(logits[0, len(ids) - 1]))
        if t in eos:
            break
        out.append(t)
        ids.append(t)
    return out


PROMPTS = ["The quick brown fox", "hello", "a b c d e f g h i j k l m n o p q r s t", "x", "Step 3 action 'Do'",
           "<|SEARCH|>notes.txt|wood<|END|>"]


def test_greedy_matches_reference_with_padding_stops_and_refill(model, tok):
    eng = Engine(model, tok, max_batch=4, max_len=128)  # 6 prompts on 4 slots: refill on finish
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    refs = [reference(model, p, 10, eng.eos_ids) for p in prompts]
    # A stop string taken from the middle of one reference output.
    full_text = tok.decode(refs[2], skip_special_tokens=True)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    assert stop.strip()
    params = [SamplingParams(temperature=0, max_tokens=10) for _ in prompts]
    params[2] = SamplingParams(temperature=0, max_tokens=10, stop=[stop])
    params[4] = SamplingParams(temperature=0, max_tokens=3)
    outs = eng.generate_ids(prompts, params)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if i == 2:
            assert o.finish_reason == "stop"
            assert r[:len(o.token_ids)] == o.token_ids
            assert o.text == full_text[:full_text.find(stop)]
        elif i == 4:
            assert o.token_ids == r[:3] and o.finish_reason == "length"
        else:
            assert o.token_ids == r, i
            assert o.finish_reason == "length" and o.completion_tokens == 10
            assert o.text == tok.decode(r, skip_special_tokens=True)
        assert o.prompt_tokens == len(prompts[i])
    assert eng.stats.prefill_calls >= 2  # the last two requests waited for a free slot
    again = eng.generate_ids(prompts, params)  # now mostly from the prefix cache: same tokens
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    n_compiles = eng.stats.compiles
    eng.generate_ids(prompts, params)  # same shapes again: no new compile
    assert eng.stats.compiles == n_compiles <= 8  # bucketed batch and read lengths


def test_eos_ends_a_row_and_others_continue(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=64)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    r0 = reference(model, prompts[0], 8, set())
    eng.eos_ids = eng.eos_ids | {r0[3]}
    outs = eng.generate_ids(prompts, [SamplingParams(temperature=0, max_tokens=8)] * 2)
    assert outs[0].token_ids == r0[:r0.index(r0[3])] and outs[0].finish_reason == "stop"
    assert outs[0].completion_tokens == len(outs[0].token_ids) + 1  # the EOS counts as generated
    assert outs[1].token_ids == reference(model, prompts[1], 8, eng.eos_ids)


def test_prefix_reuse_gives_identical_tokens(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=256, page_size=4)
    plain = Engine(model, tok, max_batch=2, max_len=256, prefix_cache=False)
    turn1 = [{"role": "user", "content": "You see a tree to the north. What next?"}]
    g = SamplingParams(temperature=0, max_tokens=6)
    first = eng.generate([ChatRequest(turn1, "log", "policy")], g)[0]
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "Results of your commands: none. Continue."}]
    out = eng.generate_full([ChatRequest(turn2, "log", "policy")], g)[0]
    ref = plain.generate_full([ChatRequest(turn2, "log", "policy")], g)[0]
    assert out.cached_tokens >= first.tokens_in - 4 > 0  # the first turn's prompt (whole pages) was not recomputed
    assert out.token_ids == ref.token_ids and ref.cached_tokens == 0
    assert eng.stats.cached_prompt_tokens == out.cached_tokens


def test_sampling_is_seeded_and_filters_work(model, tok):
    eng = Engine(model, tok, max_batch=4, max_len=64)
    p = [tok("Seeded sampling")["input_ids"]] * 3
    greedy = eng.generate_ids(p[:1], [SamplingParams(temperature=0, max_tokens=8)])[0].token_ids
    a = eng.generate_ids(p, [SamplingParams(temperature=1.0, max_tokens=8, seed=s) for s in (1, 1, 2)])
    assert a[0].token_ids == a[1].token_ids != a[2].token_ids
    b = eng.generate_ids(p[:1], [SamplingParams(temperature=1.0, max_tokens=8, seed=1)])[0]
    assert b.token_ids == a[0].token_ids  # independent of batch composition
    assert a[0].token_ids != greedy
    k1 = eng.generate_ids(p[:1], [SamplingParams(temperature=2.0, top_k=1, max_tokens=8, seed=5)])[0]
    tp = eng.generate_ids(p[:1], [SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=8, seed=5)])[0]
    assert k1.token_ids == greedy and tp.token_ids == greedy


def test_bad_requests_fail_alone(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=32)
    good = tok("fine")["input_ids"]
    outs = eng.generate_ids([list(range(40)), good, good, []],
                            [SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=0, max_tokens=4),
                             SamplingParams(top_p=0.0), SamplingParams()])
    assert outs[0].finish_reason == "error" and "at most 31" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 4
    assert "top_p" in outs[2].error and "empty prompt" in outs[3].error
    # max_tokens is capped by the cache: a 30-token prompt in a 32-slot cache gets 2 tokens.
    o = eng.generate_ids([list(range(1000, 1030))], [SamplingParams(temperature=0, max_tokens=50)])[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 2


def test_sharded_engine_matches_single_device(model, tok):
    from automem_jax.models import hf  # noqa: F401 - ensures the hf module imports alongside
    from automem_jax.parallel.mesh import make_mesh, state_shardings
    from flax import nnx
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    params = [SamplingParams(temperature=0, max_tokens=6)] * 4
    a = Engine(model, tok, max_batch=4, max_len=64).generate_ids(prompts, params)
    b = Engine(sharded, tok, max_batch=4, max_len=64, mesh=mesh).generate_ids(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    k = nnx.state(sharded)["layers"][0]["self_attn"]["q_kernel"][...]
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_repetition_penalty_matches_transformers_processor(model, tok):
    """Greedy with repetition_penalty equals greedy over full-forward logits passed through
    transformers' own RepetitionPenaltyLogitsProcessor (the peer the serving engines follow)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor
    model = qwen.init_model(qwen_presets.preset("tiny", vocab_size=64, initializer_range=0.5), seed=0)  # replies reuse tokens
    eng = Engine(model, tok, max_batch=2, max_len=128)
    prompt = [3, 9, 3, 17, 40, 9, 3, 22]
    n = 10
    got = eng.generate_ids([prompt], [SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.8)])[0]
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    ids = list(prompt)
    for _ in range(n):
        row = np.zeros((1, _REF_LEN), np.int32)
        row[0, :len(ids)] = ids
        logits = _full_forward(model, jnp.asarray(row), jnp.asarray(np.arange(_REF_LEN)[None] < len(ids)))
        scores = proc(torch.tensor([ids]), torch.from_numpy(np.asarray(logits[0, len(ids) - 1])[None].copy()))
        t = int(scores.argmax())
        if t in eng.eos_ids:
            break
        ids.append(t)
    assert got.token_ids == ids[len(prompt):]
    plain = eng.generate_ids([prompt], [SamplingParams(temperature=0, max_tokens=n)])[0]
    assert plain.token_ids != got.token_ids  # the penalty changed the reply


def test_unset_sampling_fields_take_the_checkpoint_defaults(model, tok):
    p = [tok("Seeded sampling")["input_ids"]]
    greedy = Engine(model, tok, max_batch=1, max_len=64).generate_ids(
        p, [SamplingParams(temperature=0, max_tokens=6)])[0].token_ids
    # generation_config.json says top_k=1: a request that leaves top_k unset samples greedily ...
    eng = Engine(model, tok, max_batch=1, max_len=64, sampling_defaults={"top_k": 1})
    assert eng.generate_ids(p, [SamplingParams(temperature=2.0, max_tokens=6, seed=3)])[0].token_ids == greedy
    # ... and one that sets it keeps its own value.
    own = eng.generate_ids(p, [SamplingParams(temperature=2.0, top_k=0, max_tokens=6, seed=3)])[0].token_ids
    assert own != greedy


def test_generation_defaults_read_from_the_checkpoint_folder(tmp_path):
    import json

    from automem_jax.llm.sampling import generation_defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "temperature": 0.7, "do_sample": True}))
    assert generation_defaults(str(tmp_path)) == {"top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert generation_defaults(str(tmp_path / "missing")) == {}
