"""One accelerator unit of the main job in a process of its own: `python -m launch.child SPEC`.

With managed replicas (inference.backend=server) the serving engines own the chips while they
serve, and a TPU chip has one owner at a time, so the main job's process runs on the CPU and every
unit that needs the accelerator (training, writing merged weights: `launch.units.UNITS`) runs here,
between serving rounds, as upstream alternated `vllm serve` with LLaMA-Factory runs. On a
multi-host run every host starts its child at the same point; the children form their own
`jax.distributed` group (coordinator: the job's coordinator host, the next ports).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile

import jax
from jax._src import distributed

log = logging.getLogger("automem_jax")


def _distributed(round_: int) -> dict | None:
    if jax.process_count() == 1:
        return None
    host, _, port = distributed.global_state.coordinator_address.rpartition(":")
    return {"coordinator_address": f"{host}:{int(port) + 1 + round_ % 16}",
            "num_processes": jax.process_count(), "process_id": jax.process_index()}


def run_child(cfg, workdir: str, unit: str, kwargs: dict, *, round_: int = 0) -> dict:
    """Runs `unit` in a child process on this host; returns its result (RuntimeError if it fails)."""
    with tempfile.TemporaryDirectory(prefix="automem-unit-") as tmp:
        spec, result = os.path.join(tmp, "spec.pkl"), os.path.join(tmp, "result.json")
        with open(spec, "wb") as f:
            pickle.dump({"cfg": cfg, "workdir": workdir, "unit": unit, "kwargs": kwargs, "result": result,
                         "distributed": _distributed(round_)}, f)
        log.info("%s: running in a child process (the accelerator is free of serving replicas)", unit)
        sys.stdout.flush()
        code = subprocess.run([sys.executable, "-m", "launch.child", spec]).returncode
        if code != 0 or not os.path.exists(result):
            raise RuntimeError(f"{unit} failed in its child process (exit code {code}); its log is above")
        with open(result) as f:
            return json.load(f)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m launch.child SPEC (written by launch.child.run_child)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [child]: %(message)s",
                        stream=sys.stdout, force=True)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    with open(argv[0], "rb") as f:
        spec = pickle.load(f)
    if spec["distributed"]:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only when on CPU
        jax.distributed.initialize(**spec["distributed"])
        log.info("%s: process %d of %d, %d devices", spec["unit"], jax.process_index(), jax.process_count(),
                 jax.device_count())
    # Imported after jax.distributed.initialize, which must come before anything touches a backend.
    from launch.run import Run
    from launch.units import UNITS
    out = UNITS[spec["unit"]](Run(spec["cfg"], spec["workdir"]), **spec["kwargs"])
    with open(spec["result"], "w") as f:
        json.dump(out, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
