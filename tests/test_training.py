"""SFT trainer and orbax checkpoints: loss goes down, LoRA freezes the base, exact resume,
resharding restores, damaged checkpoints, gs:// (emulator)."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from automem_jax.models import qwen, qwen_presets
from automem_jax.models.tokenizer import load_tokenizer
from automem_jax.parallel.mesh import MeshConfig, make_mesh
from automem_jax.training import checkpoint
from automem_jax.training.checkpoint import Checkpointer, CheckpointError
from automem_jax.training.data import DataConfig, build_dataset
from automem_jax.training.trainer import TrainConfig, Trainer, flop_counter, lr_schedule

FACTS = ["saw a tree to the north", "collected wood", "placed a table", "drank water", "ate a cow",
         "found stone to the east", "made a wood pickaxe", "slept at night"]


def _conversations(n=16):
    out = []
    for i in range(n):
        fact = FACTS[i % len(FACTS)]
        out.append({"id": f"c{i}", "conversations": [
            {"role": "user", "content": f"LOG step {i}. Observation: you {fact}. Record it in notes.txt."},
            {"role": "assistant", "content": f"<|APPEND|>notes.txt|step {i}: {fact}<|END|>"},
            {"role": "user", "content": "[Appended to notes.txt]"},
            {"role": "assistant", "content": "<|DONE|>"},
        ]})
    return out


@pytest.fixture(scope="module")
def dataset():
    tok = load_tokenizer(None)
    return build_dataset(_conversations(), tok, DataConfig(cutoff_len=256, bucket_multiple=32), source="synthetic")


@pytest.fixture(scope="module")
def cfg():
    return qwen_presets.preset("tiny")


def _params(model, kind=nnx.Param):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, kind))}


def _base(model):
    return {k: v for k, v in _params(model).items() if "lora" not in k}


# ---- FLOPs accounting, counted by hand ------------------------------------------------------------

def _matmuls(c):
    """(fan_in, fan_out) of every projection of one decoder layer, read off the architecture."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"q": (c.hidden_size, q), "k": (c.hidden_size, kv), "v": (c.hidden_size, kv), "o": (q, c.hidden_size),
            "gate": (c.hidden_size, c.intermediate_size), "up": (c.hidden_size, c.intermediate_size),
            "down": (c.intermediate_size, c.hidden_size)}


def _hand_flops(c, lengths, targets, lora_rank=0, lora_targets=()):
    """One step: per real token 2 FLOPs/weight forward, 2 input-gradient, 2 weight-gradient (base
    frozen under LoRA: no weight gradient); the vocab head only at target positions; causal
    attention QK^T + PV = 2 matmuls x 2 FLOPs x heads x head_dim x L/2 keys per token per layer,
    backward twice the forward."""
    base = c.num_layers * sum(i * o for i, o in _matmuls(c).values())
    head = c.hidden_size * c.vocab_size  # tied or not, one [hidden, vocab] projection
    adapters = c.num_layers * sum(lora_rank * (i + o) for n, (i, o) in _matmuls(c).items() if n in lora_targets)
    per_weight = 4 if lora_rank else 6
    total = 0.0
    for L in lengths:
        attn_fwd = c.num_layers * 2 * 2 * c.num_heads * c.head_dim * (L * L / 2)
        total += L * (per_weight * base + 6 * adapters) + 3 * attn_fwd
    return total + per_weight * head * targets


def test_flops_per_token_against_hand_count():
    # Untied head and qkv biases (biases and norms are no matmuls, the input embedding is a lookup).
    c = qwen.QwenConfig(arch="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False, qkv_bias=True,
                        qk_norm=False)
    base = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96)  # q, k, v, o, gate/up/down, 2 layers
    head = 64 * 1000
    attn_per_ctx = 3 * 2 * 2 * 4 * 16 / 2 * 2                      # fwd+bwd, per token per context position
    assert c.flops_per_token(0) == 6 * (base + head)
    assert c.flops_per_token(100) == 6 * (base + head) + attn_per_ctx * 100
    assert c.flops_per_token(100, lm_head=False) == 6 * base + attn_per_ctx * 100
    lora = 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)                     # rank 4 on q and v, 2 layers
    assert c.flops_per_token(100, lora_params=lora, frozen_base=True) == \
        4 * (base + head) + 6 * lora + attn_per_ctx * 100
    tied = c.replace(tie_word_embeddings=True)                     # the embedding counts once, as the head
    assert tied.flops_per_token(0) == c.flops_per_token(0)

    # A step: real lengths only (a padding row has length 0), the head only at target positions.
    lens, targets = np.array([37, 5, 0]), 11
    assert flop_counter(c)(lens, targets) == pytest.approx(_hand_flops(c, lens, targets), rel=1e-12)
    got = flop_counter(c, lora_params=lora, frozen_base=True)(lens, targets)
    assert got == pytest.approx(_hand_flops(c, lens, targets, lora_rank=4, lora_targets=("q", "v")), rel=1e-12)


def _step_flops(row, tc):
    """The FLOPs behind a history row's MFU (one device, no mesh)."""
    return row["mfu"] * row["seconds"] * tc.peak_flops


def test_full_finetune_lowers_masked_loss(tmp_path, dataset, cfg):
    model = qwen.init_model(cfg, 0)
    tc = TrainConfig(mode="full", learning_rate=3e-3, batch_size=4, grad_accum=1, max_steps=24,
                     warmup_ratio=0.1, peak_flops=1e12)
    res = Trainer(model, cfg, tc, str(tmp_path)).fit(dataset)
    first = np.mean([h["loss"] for h in res.history[:2]])
    last = np.mean([h["loss"] for h in res.history[-2:]])
    # Random init sits near ln(vocab) ~ 11.9; the formulaic targets are learned quickly.
    assert first > 9.0
    assert last < 0.5 * first, (first, last)
    assert all("mfu" in h and h["tokens_per_s"] > 0 for h in res.history)
    for row in res.history[:3]:
        lens = dataset.batch_at(row["step"] - 1, tc.global_batch)["attention_mask"].sum(axis=1)
        assert _step_flops(row, tc) == pytest.approx(_hand_flops(cfg, lens, row["targets"]), rel=1e-9)
    assert os.path.exists(tmp_path / "train_log.jsonl")


def test_lora_trains_adapters_only(tmp_path, dataset, cfg):
    model = qwen.init_model(cfg, 0)
    before = _base(model)
    tc = TrainConfig(mode="lora", lora_rank=8, lora_alpha=16, lora_targets="ALL", learning_rate=5e-3,
                     batch_size=4, grad_accum=2, max_steps=10, warmup_ratio=0.0, peak_flops=1e12)
    res = Trainer(model, cfg, tc, str(tmp_path)).fit(dataset)
    # MFU counts the frozen base at 4 FLOPs/weight/token and the adapters at 6.
    row = res.history[0]
    lens = dataset.batch_at(0, tc.global_batch)["attention_mask"].sum(axis=1)
    want = _hand_flops(cfg, lens, row["targets"], lora_rank=8, lora_targets=tuple(_matmuls(cfg)))
    assert _step_flops(row, tc) == pytest.approx(want, rel=1e-9)
    after = _base(res.model)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    lora = _params(res.model, nnx.LoRAParam)
    assert any("lora_b" in k and np.abs(v).max() > 0 for k, v in lora.items())
    assert res.final_loss < res.first_loss


def test_interrupted_run_resumes_exactly(tmp_path, dataset, cfg):
    tc = TrainConfig(mode="lora", lora_rank=4, lora_targets="ATTN", learning_rate=1e-2, batch_size=2,
                     grad_accum=2, max_steps=6, warmup_ratio=0.2, save_every=2, keep=3)
    ref = Trainer(qwen.init_model(cfg, 0), cfg, tc, str(tmp_path / "ref")).fit(dataset)

    out = str(tmp_path / "cut")
    part = Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset, stop_after=3)
    assert part.steps == 3
    resumed = Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)
    assert resumed.resumed_from == 3
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    a, b = _params(ref.model), _params(resumed.model)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [h["loss"] for h in ref.history] == [h["loss"] for h in resumed.history]


def test_checkpoint_restores_onto_another_mesh(tmp_path, dataset, cfg):
    out = str(tmp_path)
    tc = TrainConfig(mode="full", learning_rate=1e-3, batch_size=8, grad_accum=1, max_steps=2, warmup_ratio=0.0)
    mesh_a = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    first = Trainer(qwen.init_model(cfg, 0, mesh=mesh_a), cfg, tc, out, mesh=mesh_a).fit(dataset, stop_after=1)
    saved = _params(first.model)

    mesh_b = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model_b = qwen.init_model(cfg, 1, mesh=mesh_b)   # different init: the restore must overwrite it
    tr = Trainer(model_b, cfg, tc, out, mesh=mesh_b)
    with jax.set_mesh(mesh_b):
        params, _, meta = tr.ckpt.restore(1, tr.params)
    assert meta["step"] == 1
    restored = nnx.merge(tr.graphdef, params, tr.frozen)
    got = _params(restored)
    for k in saved:
        np.testing.assert_array_equal(saved[k], got[k], err_msg=k)
    q = restored.layers[0].self_attn.q_kernel[...]
    assert q.sharding.mesh.shape == mesh_b.shape
    assert tuple(q.sharding.spec)[:2] == ("fsdp", "tensor")

    # And training goes on under the new mesh (the same run: a changed schedule would be refused).
    res = tr.fit(dataset)
    assert res.resumed_from == 1 and res.steps == 2


def _damage(step_dir):
    """Truncate every array data file of a step, as a crash mid-copy would."""
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        for f in files:
            if not f.endswith(".json") and "metadata" not in f:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
                n += 1
    assert n > 0


def test_damaged_checkpoint_falls_back_to_previous(tmp_path, dataset, cfg, caplog, monkeypatch):
    monkeypatch.setattr(checkpoint, "RESTORE_BACKOFF_S", 0.0)  # damage is retried and re-read; no need to wait
    out = str(tmp_path)
    tc = TrainConfig(mode="lora", lora_rank=4, learning_rate=1e-2, batch_size=4, grad_accum=1, max_steps=4,
                     warmup_ratio=0.0, save_every=2, keep=3)
    ref = Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)
    ckdir = os.path.join(out, "checkpoints")
    assert Checkpointer(ckdir).steps() == [2, 4]
    _damage(os.path.join(ckdir, "4"))
    # An interrupted save leaves an orbax temporary folder; it must never count as a step.
    os.makedirs(os.path.join(ckdir, "6.orbax-checkpoint-tmp-123", "params"))

    with caplog.at_level(logging.ERROR):
        res = Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)
    assert res.resumed_from == 2
    assert any("step 4" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)
    # Moved aside, not deleted.
    assert [d for d in os.listdir(ckdir) if d.startswith("4.damaged-")]
    a, b = _params(ref.model), _params(res.model)   # steps 3-4 redone from step 2: same result
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    for s in Checkpointer(ckdir).steps():
        _damage(os.path.join(ckdir, str(s)))
    with pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)


def test_checkpoint_of_another_recipe_is_an_error(tmp_path, dataset, cfg):
    out = str(tmp_path)
    tc = TrainConfig(mode="lora", lora_rank=4, batch_size=4, grad_accum=1, max_steps=1)
    Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)
    tc8 = TrainConfig(mode="lora", lora_rank=8, batch_size=4, grad_accum=1, max_steps=1)
    with pytest.raises(CheckpointError, match="lora_rank=4"):
        Trainer(qwen.init_model(cfg, 0), cfg, tc8, out).fit(dataset)


def test_training_checkpoints_on_gcs(gcs_emulator, dataset, cfg):
    out = f"{gcs_emulator}/runs/sft"
    tc = TrainConfig(mode="lora", lora_rank=4, batch_size=4, grad_accum=1, max_steps=2, save_every=1)
    Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset, stop_after=1)
    res = Trainer(qwen.init_model(cfg, 0), cfg, tc, out).fit(dataset)
    assert res.resumed_from == 1 and res.steps == 2
    from automem_jax import storage
    assert storage.exists(storage.join(out, "train_log.jsonl"))
    assert Checkpointer(storage.join(out, "checkpoints")).steps()[-1] == 2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="mode='qlora'"):
        TrainConfig(mode="qlora")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"lr": 1e-4})


def test_schedule_warmup_then_cosine():
    tc = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, schedule="cosine")
    s = lr_schedule(tc, 100)
    assert s(0) < s(9) <= 1e-3 + 1e-12
    assert abs(float(s(10)) - 1e-3) < 1e-9
    assert float(s(99)) < 1e-5
