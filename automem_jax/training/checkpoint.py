"""orbax checkpoints for training: async saves, keep-N, local or gs://, resharding restores.

A checkpoint step holds three items: `params` (the trainable state only — LoRA adapters in LoRA
mode, so a 32B base is never rewritten), `opt_state`, and `meta` (JSON: step, configs, base
reference, loss history). The data position needs no state of its own: batches are a pure
function of (seed, step).

Restoring takes templates whose arrays carry the *current* shardings, so a checkpoint written on
one mesh restores onto another. A read that fails is retried with a short backoff (storage
hiccups: a GCS 503, a timeout). A step whose reads keep failing with storage-unavailable errors is
left alone and the restore raises. Otherwise a second, independent read (a fresh manager) must
fail too before the step counts as damaged: process 0 then moves it aside to
`<dir>/<step>.damaged-<time>` (never deletes it) and the next older step is tried. Orbax's own
temporary folders (interrupted saves) are never listed as steps.

Resuming also refuses a changed run (`_check_compatible`): another mode or model shape, LoRA
shape, dataset hash, base model or schedule. Fields a checkpoint's meta lacks (older
checkpoints) are not compared.
"""
from __future__ import annotations

import logging
import os
import re
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from automem_jax import storage

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


# Restore retries: attempts per step and the first backoff (doubled after each failure). Read when
# a Checkpointer is made, so tests can shorten them.
RESTORE_ATTEMPTS = 3
RESTORE_BACKOFF_S = 1.0

_OK, _DAMAGED, _UNAVAILABLE = 0, 1, 2
# Storage outages rather than damage: gRPC/tensorstore status names, HTTP 429/5xx, network errors.
_UNAVAILABLE_RE = re.compile(
    r"UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|service unavailable|too many requests|"
    r"internal server error|bad gateway|gateway time-?out|(?:response|status|code)\W{0,3}(?:429|5\d\d)\b|"
    r"^(?:429|5\d\d) |timed out|connection (?:reset|refused|aborted)|temporar(?:y|ily) (?:failure|unavailable)",
    re.IGNORECASE | re.MULTILINE)


def _path(directory: str) -> str:
    return directory if storage.is_gcs(directory) else os.path.abspath(directory)


def _describe(e: BaseException) -> str:
    def one(x, n):
        return f"{type(x).__name__}: {str(x).splitlines()[0][:n] if str(x) else ''}"
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    # orbax wraps tensorstore's error (the useful part) in a generic one
    return one(e, 300) if root is e else f"{one(e, 160)} <- {one(root, 300)}"


def _status(e: BaseException | None) -> int:
    if e is None:
        return _OK
    seen = []
    while e is not None and e not in seen and len(seen) < 10:  # the wrapped errors too
        if isinstance(e, (ConnectionError, TimeoutError)) or _UNAVAILABLE_RE.search(str(e)):
            return _UNAVAILABLE
        seen.append(e)
        e = e.__cause__ or e.__context__
    return _DAMAGED


def _agree(status: int) -> int:
    """The worst status over all hosts, so every host takes the same branch (each reads its own shards)."""
    if jax.process_count() == 1:
        return status
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray([status], np.int32))))


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 2, save_interval: int = 1, async_save: bool = True,
                 restore_attempts: int | None = None, restore_backoff_s: float | None = None):
        self.directory = _path(directory)
        self.restore_attempts = max(1, RESTORE_ATTEMPTS if restore_attempts is None else restore_attempts)
        self.restore_backoff_s = RESTORE_BACKOFF_S if restore_backoff_s is None else restore_backoff_s
        self._opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_interval,
                                                  enable_async_checkpointing=async_save, create=True)
        self._mgr = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        storage.configure_tensorstore()
        # The GCS emulator lacks the conditional writes OCDBT's shared manifest relies on (tensorstore
        # fails mid-save there), so emulated buckets get one zarr folder per array instead.
        ocdbt = not (storage.is_gcs(self.directory) and os.environ.get("STORAGE_EMULATOR_HOST"))
        handlers = {"params": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    "opt_state": ocp.StandardCheckpointHandler(use_ocdbt=ocdbt),
                    "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=self._opts, item_handlers=handlers)

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
        return self._read(self._mgr, step, params_template, opt_template, None)

    def _read(self, mgr, step, params_template, opt_template, config):
        if config is not None:
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            # Before the arrays: another recipe's checkpoint is an error, not damage.
            _check_compatible(meta, config, self.directory, step)
        items = {"params": ocp.args.StandardRestore(_abstract(params_template)),
                 "meta": ocp.args.JsonRestore()}
        if opt_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_template))
        out = mgr.restore(step, args=ocp.args.Composite(**items))
        return out["params"], out.get("opt_state") if opt_template is not None else None, out["meta"]

    def _read_retrying(self, step, params_template, opt_template, config):
        """(restored, None) or (None, the last error) after `restore_attempts` tries."""
        err = None
        for attempt in range(1, self.restore_attempts + 1):
            try:
                return self._read(self._mgr, step, params_template, opt_template, config), None
            except CheckpointError:
                raise
            except Exception as e:  # orbax/tensorstore raise many types, for outages and damage alike
                err = e
                if attempt < self.restore_attempts:
                    delay = self.restore_backoff_s * 2 ** (attempt - 1)
                    log.warning("checkpoint %s step %d: restore attempt %d/%d failed (%s); retrying in %.1f s",
                                self.directory, step, attempt, self.restore_attempts, _describe(e), delay)
                    time.sleep(delay)
        return None, err

    def _read_confirming(self, step, params_template, opt_template, config):
        """One more read through a fresh manager (nothing cached from the failed reads)."""
        time.sleep(self.restore_backoff_s)
        _forget_listings(self.directory)
        mgr = self._manager()
        try:
            return self._read(mgr, step, params_template, opt_template, config), None
        except CheckpointError:
            raise
        except Exception as e:
            return None, e
        finally:
            mgr.close()

    def restore_latest(self, params_template, opt_template=None, *, config: dict | None = None):
        """Newest step that restores cleanly: (step, params, opt_state, meta), or None if there is none.

        `config` (the caller's meta) must describe the same run (`_check_compatible`): a checkpoint
        of another recipe or dataset is an error, not something to silently skip. A step that
        stays unreadable because storage is unavailable raises CheckpointError and is kept as it
        is; a damaged one (confirmed by a second read) is moved aside and the next older is tried.
        """
        from automem_jax.parallel import hosts
        errors = []
        # The steps as process 0 lists them: every host tries the same ones in the same order.
        for step in reversed(hosts.primary(self.steps, f"checkpoint steps {self.directory}")):
            got, err = self._read_retrying(step, params_template, opt_template, config)
            status = _agree(_status(err))
            confirmed = False
            if status == _DAMAGED:
                log.warning("checkpoint %s step %d failed %d read(s) (%s); reading it once more before "
                            "treating it as damaged", self.directory, step, self.restore_attempts,
                            _describe(err) if err else "failed on another host")
                got, err = self._read_confirming(step, params_template, opt_template, config)
                status, confirmed = _agree(_status(err)), True
            what = _describe(err) if err else "failed on another host"
            if status == _UNAVAILABLE:
                raise CheckpointError(
                    f"{self.directory} step {step}: storage looks unavailable ({what}) after "
                    f"{self.restore_attempts + confirmed} attempts; the step is left in place, retry later")
            if status == _DAMAGED:
                msg = f"step {step}: {what}"
                log.error("checkpoint %s step %d could not be restored (%s; a second read confirmed it); "
                          "moving it aside and trying an older one", self.directory, step, what)
                errors.append(msg)
                self._quarantine(step)
                continue
            if confirmed:
                log.warning("checkpoint %s step %d restored on the confirming read", self.directory, step)
            if errors:
                log.warning("restored step %d of %s after moving aside damaged step(s): %s", step,
                            self.directory, "; ".join(errors))
            params, opt_state, meta = got
            return step, params, opt_state, meta
        if errors:
            raise CheckpointError(f"{self.directory}: no checkpoint could be restored: " + "; ".join(errors))
        return None

    def _quarantine(self, step: int) -> None:
        """Move a damaged step aside (kept for inspection, never deleted) so the step can be re-saved.

        Process 0 alone moves it; the other hosts wait for it (`hosts.primary`, which also hands
        them its error) before re-listing the steps.
        """
        from automem_jax.parallel import hosts
        hosts.primary(lambda: self._move_aside(step) if storage.primary_host() else None,
                      f"checkpoint quarantine {step}")
        _forget_listings(self.directory)
        self._mgr.reload()

    def _move_aside(self, step: int) -> str:
        src = storage.join(self.directory, str(step))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dst, n = f"{src}.damaged-{stamp}", 1
        while storage.exists(dst):
            n += 1
            dst = f"{src}.damaged-{stamp}-{n}"
        try:
            if storage.is_gcs(src):
                what = f"{_move_gcs(src, dst)} objects"
            else:
                os.rename(src, dst)
                what = "renamed"
        except Exception as e:
            raise CheckpointError(f"{src} is damaged but could not be moved aside to {dst} ({_describe(e)}); "
                                  "move it out of the way by hand (nothing was deleted)") from e
        log.error("moved damaged checkpoint step %d to %s (%s)", step, dst, what)
        return dst

    def close(self) -> None:
        self._mgr.close()


def _forget_listings(directory: str) -> None:
    """Drop cached gs:// listings: orbax lists steps through etils.epath, whose fsspec backend
    (gcsfs) caches them and would still show a step moved behind its back."""
    if not storage.is_gcs(directory):
        return
    try:
        from etils.epath import backend
        backend.fsspec_backend.fs(directory).invalidate_cache()
    except Exception as e:  # noqa: BLE001 - no fsspec/gcsfs: nothing cached either
        log.debug("could not drop cached listings of %s: %s", directory, e)


def _move_gcs(src: str, dst: str) -> int:
    """gs:// has no rename: copy every object under src to dst, then remove the originals.

    Originals go only after every copy succeeded, so a failure midway leaves the step complete.
    """
    bucket = storage._blob(src).bucket  # storage.py's client (emulator-aware)
    src_prefix = storage._split_gcs(src)[1].rstrip("/") + "/"
    dst_prefix = storage._split_gcs(dst)[1].rstrip("/") + "/"
    blobs = list(bucket.list_blobs(prefix=src_prefix))
    for b in blobs:
        bucket.copy_blob(b, bucket, dst_prefix + b.name[len(src_prefix):])
    for b in blobs:
        b.delete()
    return len(blobs)


def _abstract(tree):
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(one, tree)


# train_config fields a resumed run must share: together they fix the data order and the update.
_SCHEDULE = ("epochs", "max_steps", "learning_rate", "schedule", "warmup_ratio", "min_lr_ratio", "batch_size",
             "grad_accum")
_OPTIMIZER = ("weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip", "seed")


def _check_compatible(meta: dict, config: dict, directory: str, step: int) -> None:
    """Raises CheckpointError unless `meta` (a checkpoint's) and `config` (this run's) describe the
    same run. A field missing on either side (an older checkpoint, a dataset without manifest) is
    not compared."""
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

    changed = []

    def compare(what, old, new):
        if old not in (None, "") and new not in (None, "") and old != new:
            changed.append(f"{what} {old} -> {new}")

    compare("dataset hash changed:", (meta.get("dataset") or {}).get("hash"), (config.get("dataset") or {}).get("hash"))
    compare("base model changed:", meta.get("base_ref"), config.get("base_ref"))
    groups = [("schedule", _SCHEDULE), ("optimizer", _OPTIMIZER)]
    if meta.get("mode") == "lora":
        groups.append(("lora", ("lora_alpha", "lora_dropout")))
    for group, keys in groups:
        for k in keys:
            compare(f"{group} changed: {k}", ta.get(k), tb.get(k))
    compare("schedule changed: total steps", meta.get("total_steps"), config.get("total_steps"))
    if changed:
        raise CheckpointError(f"{directory} step {step} belongs to another run: " + "; ".join(changed)
                              + ". Resume with the original settings or use another out_dir")
