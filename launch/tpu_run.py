"""The main job: `python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny`.

Run the same command on every host of a TPU pod. The workdir (local or gs://) records each
finished phase in phases/<name>/DONE, so re-running the command resumes after the last one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from automem_jax import storage

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "ml_collections config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "run folder: local path or gs://bucket/path")
_PHASES = flags.DEFINE_string("phases", None, "comma-separated subset of the config's phases to run")

log = logging.getLogger("automem_jax")



def _phase_done(workdir: str, name: str) -> bool:
    return storage.exists(storage.join(workdir, "phases", name, "DONE"))


def _mark_done(workdir: str, name: str, result: dict) -> None:
    if not storage.primary_host():
        return
    storage.write_text(storage.join(workdir, "phases", name, "result.json"),
                       json.dumps(result, indent=2, default=str) + "\n")
    storage.write_text(storage.join(workdir, "phases", name, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n"))


def _sync(tag: str) -> None:
    """Multi-host barrier: what process 0 wrote is visible to every host before any reads it."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(tag)


def run(cfg, workdir: str, phases: list[str]) -> None:
    import jax  # noqa: F401  (loaded first: storage.primary_host() asks jax for the process index)

    from launch.phases import PHASES, Run
    storage.makedirs(workdir)
    if storage.primary_host():
        storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2) + "\n")
    _sync("automem start")
    ctx = Run(cfg, workdir)
    for name in phases:
        if _phase_done(workdir, name):
            log.info("phase %s: already done in %s, skipping", name, workdir)
            continue
        log.info("phase %s: start", name)
        t0, tin, tout = time.perf_counter(), ctx.tokens_in, ctx.tokens_out
        result = PHASES[name](ctx)
        result.update(seconds=time.perf_counter() - t0, tokens_in=ctx.tokens_in - tin,
                      tokens_out=ctx.tokens_out - tout)
        _mark_done(workdir, name, result)
        _sync(f"automem phase {name}")
        log.info("phase %s: done in %.1f s", name, result["seconds"])


def validate_config(cfg, phases: list[str]) -> None:
    """Cheap checks before anything is written, so a typo never costs a half-written workdir."""
    from automem_jax.models import qwen
    from automem_jax.parallel.mesh import MeshConfig
    from launch import phases as ph
    try:
        runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)
        if not cfg.model.checkpoint:
            qwen.preset(cfg.model.preset, **runtime)
        else:
            qwen.QwenConfig.from_hf(cfg.model.checkpoint, **runtime)
        MeshConfig.from_any(cfg.mesh.to_dict())
        from automem_jax.envs import KNOWN_ENVS
        names = ph.env_names(cfg)
        if not names:
            raise ValueError("env.name is empty")
        for env in names:
            if env not in KNOWN_ENVS and not env.startswith("minihack:"):
                raise ValueError(f"env.name {env!r}: expected one of {', '.join(KNOWN_ENVS)} or minihack:<task>")
        ph.load_structure(cfg).validate()
        for field in ("eval.seeds", "bootstrap.seeds"):
            sec, key = field.split(".")
            try:
                ph.parse_seeds(cfg[sec][key])
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
        if cfg.final_eval.seeds:
            ph.parse_seeds(cfg.final_eval.seeds)
        for sec in ("bootstrap", "loop2"):
            try:
                ph.train_config(cfg[sec].train)
                ph.data_config(cfg[sec].data)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{sec}: {e}") from None
        vocab = cfg.bootstrap.get("tokenizer_vocab", 0)
        if vocab < 0 or 0 < vocab < 384:
            raise ValueError(f"bootstrap.tokenizer_vocab {vocab}: expected 0 (keep the tokenizer) or at least 384")
        if cfg.bootstrap.enabled and "bootstrap" in phases:
            if any(n not in ("craftax", "crafter") for n in names):
                raise ValueError("bootstrap.enabled: the scripted teacher plays Craftax/Crafter only; "
                                 f"env.name is {cfg.env.name!r}")
        if "loop1" in phases:
            ph.loop1_config(cfg)
        if "loop1" in phases or ("loop2" in phases and cfg.loop2.judge == "critic"):
            ph.make_critic(cfg)
        if cfg.collect.policy not in ("base", "teacher"):
            raise ValueError(f"collect.policy {cfg.collect.policy!r}: expected base or teacher")
        if cfg.collect.policy == "teacher" and any(n not in ("craftax", "crafter") for n in names):
            raise ValueError("collect.policy=teacher: the scripted teacher plays Craftax/Crafter only")
        if cfg.loop2.judge not in ("critic", "heuristic"):
            raise ValueError(f"loop2.judge {cfg.loop2.judge!r}: expected critic or heuristic")
    except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
        raise app.UsageError(f"config: {e}") from None


def _resolve_phases(cfg) -> list[str]:
    from launch.phases import PHASES
    text = _PHASES.value if _PHASES.value is not None else cfg.phases
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        raise app.UsageError(f"unknown phase(s) {unknown}; known phases: {', '.join(PHASES)}")
    return names


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # orbax logs every save through absl at INFO; keep one line per unit of work.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    phases = _resolve_phases(cfg)
    validate_config(cfg, phases)
    if cfg.mesh.multi_host:
        from automem_jax.parallel.mesh import MeshConfig, maybe_initialize_distributed
        maybe_initialize_distributed(MeshConfig.from_any(cfg.mesh.to_dict()))
    run(cfg, _WORKDIR.value, phases)


if __name__ == "__main__":
    app.run(main)
