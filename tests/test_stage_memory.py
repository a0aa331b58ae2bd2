"""Loop 2's training holds at most two model copies: the in-process engines (base and the
previous specialist, weights and KV cache) are released before the trainer loads its copy.

The probe samples the device buffers of every live jax.Array (each buffer once: a shard viewed
as its own array is not a second copy) on a thread while the real `Run.on_accelerator("loop2_train")`
runs (tiny preset, a 2-step LoRA fit, the merge and the exports). A model copy is the training
layout's buffers (sharded over fsdp). The same probe first reads the engines' buffers, so it is
shown to see them (they replicate the weights over the serving mesh, so they count several copies).
"""

import gc
import importlib
import json
import threading

import jax
import pytest

pytestmark = pytest.mark.slow  # ~75 s: a model load, two engines and a LoRA fit


def _buffer_bytes(arrays) -> int:
    seen = {}
    for a in arrays:
        try:
            for shard in a.addressable_shards:
                seen[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
        except Exception:  # noqa: BLE001 - deleted while we looked (the trainer runs meanwhile)
            continue
    return sum(seen.values())


def _live_bytes() -> int:
    return _buffer_bytes(jax.live_arrays())


class _Peak:
    def __init__(self, base: int):
        self.base = base
        self.peak, self.at_load, self._stop = 0, None, threading.Event()
        self.lock = threading.Lock()  # a sample's array list holds the arrays alive while it is taken
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            with self.lock:
                self.peak = max(self.peak, _live_bytes() - self.base)
            self._stop.wait(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _live_bytes() - self.base)


def test_loop2_training_holds_at_most_two_model_copies(tmp_path, monkeypatch):
    from automem_jax import storage
    from automem_jax.models import hf
    from launch.run import Run
    cfg = importlib.import_module("configs.tiny").get_config()
    cfg.bootstrap.enabled = False  # the random preset is the base
    cfg.inference.max_batch, cfg.inference.max_len = 2, 128
    cfg.inference.page_size, cfg.inference.prefill_chunk = 16, 32
    t = cfg.loop2.train
    t.max_steps, t.batch_size, t.grad_accum, t.loss_chunk, t.target_multiple = 2, 8, 1, 32, 32
    cfg.loop2.data.cutoff_len, cfg.loop2.data.bucket_multiple = 128, 32
    run = Run(cfg, str(tmp_path / "run"))
    gc.collect()
    before = _live_bytes()  # what earlier tests in this process left alive is not ours to count

    # The previous iteration's specialist: a saved folder the engine loads as a second model.
    model, mcfg = run.load_model("")
    copy_bytes = _buffer_bytes(jax.tree.leaves(__import__("flax").nnx.state(model)))
    spec = str(tmp_path / "specialist")
    hf.save_pretrained(model, mcfg, spec, tokenizer=run.tok)
    del model
    run.engine("")
    run.engine(spec)
    with_engines = _live_bytes() - before
    assert with_engines >= 2 * copy_bytes, (with_engines, copy_bytes)  # the probe sees both engines

    data = tmp_path / "dataset"
    rows = [{"id": f"x{i}", "conversations": [
        {"role": "user", "content": f"step {i}: what is in memory?"},
        {"role": "assistant", "content": "<|READ|>strategy.txt<|END|>"}],
        "meta": {"env": "craftax", "task": "Craftax-Classic", "episode": 0, "step": i, "phase": "log", "edits": []}}
        for i in range(8)]
    storage.write_text(str(data / "selected.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    # The peak counts from the moment the unit loads its model (on_accelerator has released by then).
    probe = _Peak(before)
    load = Run.load_model

    def load_and_reset(self, source):
        with probe.lock:
            probe.peak, probe.at_load = 0, _live_bytes() - before
        return load(self, source)

    monkeypatch.setattr(Run, "load_model", load_and_reset)
    with probe:
        out = run.on_accelerator("loop2_train", dataset_dir=str(data), out_dir=str(tmp_path / "train"), iteration=0)
    assert out["steps"] == 2 and not run._engines
    assert probe.at_load < 0.5 * copy_bytes, probe.at_load / copy_bytes  # nothing of the engines is left
    # The copy being trained (merged in place at the end), adapters, optimizer state and batches:
    # under 2.5 copies. With the engines kept it would start above 2 + 1.
    assert probe.peak < 2.5 * copy_bytes, (probe.peak / copy_bytes, with_engines / copy_bytes)
    print(f"live buffers: engines up {with_engines / copy_bytes:.2f} copies; peak in the training unit "
          f"{probe.peak / copy_bytes:.2f} copies (one copy = {copy_bytes / 2**20:.1f} MiB)")
