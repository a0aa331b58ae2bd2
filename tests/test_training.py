"""SFT trainer and orbax checkpoints: loss goes down, LoRA freezes the base, exact resume,
resharding restores, damaged checkpoints, gs:// (emulator)."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from automem_jax.models import qwen
from automem_jax.models.tokenizer import load_tokenizer
from automem_jax.parallel.mesh import MeshConfig, make_mesh
from automem_jax.training.checkpoint import Checkpointer, CheckpointError
from automem_jax.training.data import DataConfig, build_dataset
from automem_jax.training.trainer import TrainConfig, Trainer, lr_schedule

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
    return qwen.preset("tiny")


def _params(model, kind=nnx.Param):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, kind))}


def _base(model):
    return {k: v for k, v in _params(model).items() if "lora" not in k}


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
    assert os.path.exists(tmp_path / "train_log.jsonl")


def test_lora_trains_adapters_only(tmp_path, dataset, cfg):
    model = qwen.init_model(cfg, 0)
    before = _base(model)
    tc = TrainConfig(mode="lora", lora_rank=8, lora_alpha=16, lora_targets="ALL", learning_rate=5e-3,
                     batch_size=4, grad_accum=2, max_steps=10, warmup_ratio=0.0)
    res = Trainer(model, cfg, tc, str(tmp_path)).fit(dataset)
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
    tc = TrainConfig(mode="full", learning_rate=1e-3, batch_size=8, grad_accum=1, max_steps=1, warmup_ratio=0.0)
    mesh_a = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    first = Trainer(qwen.init_model(cfg, 0, mesh=mesh_a), cfg, tc, out, mesh=mesh_a).fit(dataset)
    saved = _params(first.model)

    mesh_b = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model_b = qwen.init_model(cfg, 1, mesh=mesh_b)   # different init: the restore must overwrite it
    tr = Trainer(model_b, cfg, tc, out, mesh=mesh_b)
    res = tr.fit(dataset)                            # step 1 is done: restore only
    assert res.resumed_from == 1
    got = _params(res.model)
    for k in saved:
        np.testing.assert_array_equal(saved[k], got[k], err_msg=k)
    q = res.model.layers[0].self_attn.q_kernel[...]
    assert q.sharding.mesh.shape == mesh_b.shape
    assert tuple(q.sharding.spec)[:2] == ("fsdp", "tensor")

    # And training goes on under the new mesh.
    tc2 = TrainConfig(mode="full", learning_rate=1e-3, batch_size=8, grad_accum=1, max_steps=2, warmup_ratio=0.0)
    res2 = Trainer(qwen.init_model(cfg, 1, mesh=mesh_b), cfg, tc2, out, mesh=mesh_b).fit(dataset)
    assert res2.resumed_from == 1 and res2.steps == 2


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


def test_damaged_checkpoint_falls_back_to_previous(tmp_path, dataset, cfg, caplog):
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
