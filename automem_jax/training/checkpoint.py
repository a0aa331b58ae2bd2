"""orbax checkpoints for training: async saves, keep-N, local or gs://, resharding restores.

A checkpoint step holds three items: `params` (the trainable state only — LoRA adapters in LoRA
mode, so a 32B base is never rewritten), `opt_state`, and `meta` (JSON: step, configs, base
reference, loss history). The data position needs no state of its own: batches are a pure
function of (seed, step).

Restoring takes templates whose arrays carry the *current* shardings, so a checkpoint written on
one mesh restores onto another. A step that fails to restore (a truncated or corrupt file) is
reported and the next older step is tried; orbax's own temporary folders (interrupted saves) are
never listed as steps.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import orbax.checkpoint as ocp

from automem_jax import storage

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def _path(directory: str) -> str:
    return directory if storage.is_gcs(directory) else os.path.abspath(directory)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, save_interval: int = 1, async_save: bool = True):
        self.directory = _path(directory)
        storage.configure_tensorstore()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval,
                                            enable_async_checkpointing=async_save, create=True)
        # The GCS emulator lacks the conditional writes OCDBT's shared manifest relies on (tensorstore
        # fails mid-save there), so emulated buckets get one zarr folder per array instead.
        ocdbt = not (storage.is_gcs(self.directory) and os.environ.get("STORAGE_EMULATOR_HOST"))
        handlers = {"params": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    "opt_state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    "meta": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = True) -> None:
        """Starts an async save; the previous one is finished first (orbax serialises them)."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(meta))
        self._mgr.save(step, args=args, force=force)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def restore(self, step: int, params_template, opt_template=None):
        """(params, opt_state | None, meta) of one step, placed like the templates."""
        items = {"params": ocp.args.StandardRestore(_abstract(params_template)),
                 "meta": ocp.args.JsonRestore()}
        if opt_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_template))
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_template is not None else None, out["meta"]

    def restore_latest(self, params_template, opt_template=None, *, config: dict | None = None):
        """Newest step that restores cleanly: (step, params, opt_state, meta), or None if there is none.

        `config` (the caller's meta) must agree on mode and model shape: a checkpoint of another
        recipe is an error, not something to silently skip.
        """
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if config is not None:
                    # Before the arrays: another recipe's checkpoint is an error, not damage.
                    _check_compatible(meta, config, self.directory, step)
                params, opt_state, meta = self.restore(step, params_template, opt_template)
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types for a damaged step
                first = str(e).splitlines()[0][:300] if str(e) else ""
                msg = f"step {step}: {type(e).__name__}: {first}"
                log.error("checkpoint %s could not be restored (%s); trying an older one",
                          self.directory, msg)
                errors.append(msg)
                self._quarantine(step)
                continue
            if errors:
                log.warning("restored step %d of %s after skipping damaged step(s): %s", step,
                            self.directory, "; ".join(errors))
            return step, params, opt_state, meta
        if errors:
            raise CheckpointError(f"{self.directory}: no checkpoint could be restored: " + "; ".join(errors))
        return None

    def _quarantine(self, step: int) -> None:
        """Move a damaged step out of the way (kept for inspection) so the step can be re-saved."""
        src = storage.join(self.directory, str(step))
        if storage.is_gcs(self.directory):
            self._mgr.delete(step)  # no rename on GCS; the step is unreadable anyway
        else:
            dst = f"{src}.damaged-{int(time.time())}"
            os.rename(src, dst)
            log.error("moved damaged checkpoint step %d to %s", step, dst)
        self._mgr.reload()

    def close(self) -> None:
        self._mgr.close()


def _abstract(tree):
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(one, tree)


def _check_compatible(meta: dict, config: dict, directory: str, step: int) -> None:
    if meta.get("mode") != config.get("mode"):
        raise CheckpointError(f"{directory} step {step} was written in mode {meta.get('mode')!r}, "
                              f"this run trains in mode {config.get('mode')!r}; use another out_dir")
    a, b = meta.get("model_config", {}), config.get("model_config", {})
    for k in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "intermediate_size", "head_dim"):
        if k in a and k in b and a[k] != b[k]:
            raise CheckpointError(f"{directory} step {step}: model {k}={a[k]} but this run's model has {k}={b[k]}")
    ta, tb = meta.get("train_config", {}), config.get("train_config", {})
    for k in ("lora_rank", "lora_targets"):
        if meta.get("mode") == "lora" and ta.get(k) != tb.get(k):
            raise CheckpointError(f"{directory} step {step}: {k}={ta.get(k)!r} but this run has {k}={tb.get(k)!r}")
