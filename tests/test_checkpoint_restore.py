"""Checkpoint restore robustness: transient read errors are retried, damage is confirmed by a second
read and the step moved aside (never deleted), and a resume refuses a changed run."""
import glob
import logging
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from automem_jax import storage
from automem_jax.models import qwen
from automem_jax.models.tokenizer import load_tokenizer
from automem_jax.training import checkpoint
from automem_jax.training.checkpoint import Checkpointer, CheckpointError
from automem_jax.training.data import DataConfig, build_dataset
from automem_jax.training.trainer import TrainConfig, Trainer

META = {"mode": "lora"}


def _params(step):
    return {"w": jnp.arange(8.0) + step, "b": jnp.ones((2, 3)) * step}


def _opt(step):
    return {"m": jnp.zeros(8) + step}


def _saved(directory, steps=(1, 2), **kw):
    ck = Checkpointer(directory, async_save=False, restore_attempts=2, restore_backoff_s=0.0, **kw)
    for s in steps:
        ck.save(s, _params(s), _opt(s), {**META, "step": s})
    ck.wait()
    return ck


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def _fail_restores(monkeypatch, error, times, step=None):
    """CheckpointManager.restore raises `error` on its first `times` calls (for `step`, if given)."""
    real = ocp.CheckpointManager.restore
    calls = {"failed": 0}

    def restore(self, s, *a, **kw):
        if (step is None or s == step) and calls["failed"] < times:
            calls["failed"] += 1
            raise error
        return real(self, s, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    return calls


def test_transient_read_error_is_retried(tmp_path, monkeypatch, caplog):
    ck = _saved(str(tmp_path))
    calls = _fail_restores(monkeypatch, OSError("503 Service Unavailable"), times=1)
    with caplog.at_level(logging.WARNING):
        step, params, opt, meta = ck.restore_latest(_params(0), _opt(0), config=META)
    assert step == 2 and meta["step"] == 2 and calls["failed"] == 1
    np.testing.assert_array_equal(params["w"], np.arange(8.0) + 2)
    np.testing.assert_array_equal(opt["m"], np.zeros(8) + 2)
    assert any("attempt 1/2 failed" in r.getMessage() for r in caplog.records)
    # Nothing moved or deleted.
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert ck.steps() == [1, 2]


def test_persistent_outage_raises_and_keeps_the_step(tmp_path, monkeypatch):
    ck = _saved(str(tmp_path))
    _fail_restores(monkeypatch, OSError("503 Service Unavailable"), times=10 ** 6)
    with pytest.raises(CheckpointError, match="step 2: storage looks unavailable.*left in place"):
        ck.restore_latest(_params(0), _opt(0), config=META)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_damage_not_confirmed_by_second_read_keeps_the_step(tmp_path, monkeypatch, caplog):
    ck = _saved(str(tmp_path))
    # Fails both regular attempts with a damage-like error; the confirming read succeeds.
    _fail_restores(monkeypatch, ValueError("DATA_LOSS: checksum mismatch"), times=2, step=2)
    with caplog.at_level(logging.WARNING):
        step, params, _, _ = ck.restore_latest(_params(0), _opt(0), config=META)
    assert step == 2
    np.testing.assert_array_equal(params["w"], np.arange(8.0) + 2)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert any("restored on the confirming read" in r.getMessage() for r in caplog.records)


def test_outages_are_told_from_damage():
    wrapped = Exception("Encountered error while reading array index")
    wrapped.__cause__ = ValueError('UNAVAILABLE: Error reading "w/0": HTTP response code: 503 with body: x')
    assert checkpoint._status(wrapped) == checkpoint._UNAVAILABLE
    assert "HTTP response code: 503" in checkpoint._describe(wrapped)
    for e in (TimeoutError("read"), ConnectionResetError(), OSError("429 Too Many Requests")):
        assert checkpoint._status(e) == checkpoint._UNAVAILABLE, e
    for e in (ValueError('OUT_OF_RANGE: Requested byte range [0, 260) is not valid'),
              FileNotFoundError("params/_METADATA"), ValueError("DATA_LOSS: checksum mismatch")):
        assert checkpoint._status(e) == checkpoint._DAMAGED, e


def _corrupt_local(step_dir):
    """Truncate every array data chunk of a step's params, as a crash mid-copy would."""
    n = 0
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        if os.path.basename(root) == "d":
            for f in files:
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
                n += 1
    assert n > 0


def test_corrupt_step_is_moved_aside_not_deleted(tmp_path, caplog):
    ck = _saved(str(tmp_path))
    _corrupt_local(str(tmp_path / "2"))
    before = _files(str(tmp_path / "2"))
    with caplog.at_level(logging.WARNING):
        step, params, opt, _ = ck.restore_latest(_params(0), _opt(0), config=META)
    assert step == 1
    np.testing.assert_array_equal(params["w"], np.arange(8.0) + 1)
    np.testing.assert_array_equal(opt["m"], np.zeros(8) + 1)
    moved = glob.glob(str(tmp_path / "2.damaged-*"))
    assert len(moved) == 1 and not os.path.exists(tmp_path / "2")
    assert _files(moved[0]) == before          # every file kept, at the new place
    assert ck.steps() == [1] and Checkpointer(str(tmp_path)).steps() == [1]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("reading it once more" in m for m in msgs)
    assert any("step 2 could not be restored" in m and "second read confirmed" in m for m in msgs)
    assert any("moved damaged checkpoint step 2 to" in m for m in msgs)
    # The step number is free again: a new save of step 2 works and restores.
    ck.save(2, _params(5), _opt(5), {**META, "step": 2})
    ck.wait()
    assert ck.restore_latest(_params(0), _opt(0), config=META)[0] == 2


def test_only_process_0_moves_a_damaged_step(tmp_path, monkeypatch):
    ck = _saved(str(tmp_path))
    _corrupt_local(str(tmp_path / "2"))
    monkeypatch.setattr(storage, "primary_host", lambda: False)
    assert ck.restore_latest(_params(0), _opt(0), config=META)[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_corrupt_step_on_gcs_is_moved_aside(gcs_emulator):
    directory = f"{gcs_emulator}/restore-test/checkpoints"
    ck = _saved(directory)
    bucket = storage._blob(directory).bucket
    prefix = "restore-test/checkpoints/2/"
    names = [b.name for b in bucket.list_blobs(prefix=prefix)]
    # Emulated buckets hold one zarr folder per array: overwrite the chunks with garbage.
    chunks = [n for n in names if "/params/" in n and not os.path.basename(n).startswith((".", "_"))
              and "metadata" not in n and not n.endswith((".json", ".txt"))]
    assert chunks, names
    for n in chunks:
        bucket.blob(n).upload_from_string(b"xx")
    step, params, _, _ = ck.restore_latest(_params(0), _opt(0), config=META)
    assert step == 1
    np.testing.assert_array_equal(params["w"], np.arange(8.0) + 1)
    assert not list(bucket.list_blobs(prefix=prefix))
    moved = [d for d in storage.listdir(f"{gcs_emulator}/restore-test/checkpoints") if d.startswith("2.damaged-")]
    assert len(moved) == 1
    kept = sorted(b.name.split(moved[0] + "/", 1)[1]
                  for b in bucket.list_blobs(prefix=f"restore-test/checkpoints/{moved[0]}/"))
    assert kept == sorted(n[len(prefix):] for n in names)
    assert ck.steps() == [1]


# ---- resume refuses a changed run -------------------------------------------------------------------

def test_old_meta_without_run_fields_still_resumes(tmp_path):
    ck = _saved(str(tmp_path), steps=(1,))
    config = {**META, "dataset": {"hash": "sha256:new"}, "base_ref": "hf://x", "total_steps": 9,
              "train_config": {"learning_rate": 1.0, "lora_rank": None, "lora_targets": None}}
    assert ck.restore_latest(_params(0), _opt(0), config=config)[0] == 1


def _conversations(n, tag):
    return [{"id": f"{tag}{i}", "conversations": [
        {"role": "user", "content": f"{tag} step {i}: record it."},
        {"role": "assistant", "content": f"<|APPEND|>notes.txt|{tag} {i}<|END|>"}]} for i in range(n)]


def test_resume_refuses_a_changed_run(tmp_path):
    tok = load_tokenizer(None)
    data_cfg = DataConfig(cutoff_len=64, bucket_multiple=32)
    data = build_dataset(_conversations(4, "a"), tok, data_cfg, source="a")
    other = build_dataset(_conversations(4, "b"), tok, data_cfg, source="b")
    # Smallest model over the tokenizer's vocabulary: compile time is most of this test.
    cfg = qwen.QwenConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=16)
    tc = TrainConfig(mode="lora", lora_rank=2, batch_size=2, grad_accum=1, max_steps=1, warmup_ratio=0.0)
    out = str(tmp_path)
    first = Trainer(qwen.init_model(cfg, 0), cfg, tc, out, base_ref="base-A")
    assert first.fit(data).steps == 1
    meta = Checkpointer(os.path.join(out, "checkpoints")).restore(1, first.params)[2]
    assert meta["dataset"]["hash"] == data.manifest["hash"] and meta["base_ref"] == "base-A"
    assert meta["total_steps"] == 1

    def resume(dataset=data, base_ref="base-A", **changes):
        # The model already carries adapters and a refused resume never trains: reuse it (init is slow).
        t = TrainConfig(**{**tc.__dict__, **changes})
        return Trainer(first.model, cfg, t, out, base_ref=base_ref).fit(dataset)

    h_old, h_new = data.manifest["hash"], other.manifest["hash"]
    assert h_old != h_new
    with pytest.raises(CheckpointError, match=f"dataset hash changed: {h_old} -> {h_new}"):
        resume(dataset=other)
    with pytest.raises(CheckpointError, match="base model changed: base-A -> base-B"):
        resume(base_ref="base-B")
    with pytest.raises(CheckpointError, match="schedule changed: learning_rate 5e-05 -> 0.001"):
        resume(learning_rate=1e-3)
    with pytest.raises(CheckpointError, match="max_steps 1 -> 2; schedule changed: total steps 1 -> 2"):
        resume(max_steps=2)
    with pytest.raises(CheckpointError, match="schedule changed: grad_accum 1 -> 2"):
        resume(grad_accum=2)
    # Unchanged, it resumes (step 1 is the last: restore only); the refusals moved nothing aside.
    assert resume().resumed_from == 1
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["1"]
