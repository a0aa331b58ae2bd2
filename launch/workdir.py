"""The main job's records in its workdir, as every host sees them: process 0 writes, and what it
reads is handed to the other hosts so that all of them decide alike.

A unit of work (a dataset, a trained model, a tokenizer) is finished when its folder holds DONE;
a stage is finished when `stages/<name>/DONE` exists (launch/tpu_run.py).
"""
from __future__ import annotations

import json
import time

from automem_jax import storage
from automem_jax.parallel import hosts


def is_writer() -> bool:
    return storage.primary_host()


def read_json(path: str):
    """The JSON file as process 0 reads it (None when missing): every host decides alike."""
    return hosts.primary(lambda: storage.read_json(path, default=None), f"read {path}")


def unit_done(path: str) -> bool:
    return hosts.primary(lambda: storage.exists(storage.join(path, "DONE")), f"done {path}")


def mark_unit(path: str, info: dict | None = None) -> None:
    if is_writer():
        if info is not None:
            storage.write_text(storage.join(path, "info.json"), json.dumps(info, indent=2, sort_keys=True) + "\n")
        storage.write_text(storage.join(path, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def copy_folder(src: str, dst: str) -> list[str]:
    """File-by-file copy between any two local / gs:// folders (flat HF and PEFT folders)."""
    names = [n for n in storage.listdir(src) if not n.endswith("/")]
    for n in names:
        storage.write_bytes(storage.join(dst, n), storage.read_bytes(storage.join(src, n)))
    return names
