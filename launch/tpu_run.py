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
        # The coordinator's barrier, not a device collective: no computation, and a phase may
        # keep hosts apart for hours (process 0 plays while the others' replicas serve).
        from launch.phases import _kv_client
        _kv_client().wait_at_barrier(tag.replace(" ", "_"), 24 * 3600 * 1000)


def run(cfg, workdir: str, phases: list[str]) -> None:
    import jax  # noqa: F401  (loaded first: storage.primary_host() asks jax for the process index)

    from launch.phases import Run
    storage.makedirs(workdir)
    if storage.primary_host():
        storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2) + "\n")
    _sync("automem start")
    ctx = Run(cfg, workdir)
    try:
        _run_phases(ctx, workdir, phases)
    finally:
        ctx.release_inference()  # managed replicas never outlive the job


def _run_phases(ctx, workdir: str, phases: list[str]) -> None:
    from launch.phases import PHASES
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


def validate_config(cfg, phases: list[str]):
    """Cheap checks before anything is written, so a typo never costs a half-written workdir.
    Returns the model's QwenConfig (for `validate_devices`)."""
    from automem_jax.models import qwen
    from automem_jax.parallel.mesh import MeshConfig
    from launch import phases as ph
    try:
        runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)
        if not cfg.model.checkpoint:
            model_cfg = qwen.preset(cfg.model.preset, **runtime)
        else:
            model_cfg = qwen.QwenConfig.from_hf(cfg.model.checkpoint, **runtime)
        MeshConfig.from_any(cfg.mesh.to_dict())
        validate_inference(cfg, phases, model_cfg)
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
    return model_cfg


def validate_devices(cfg, phases: list[str], model_cfg=None) -> None:
    """The checks that need the device count (after jax.distributed starts, before anything is
    written): both meshes fit the devices, and the serving memory per chip fits inference.device_kind."""
    import jax

    from automem_jax.parallel.mesh import MeshConfig
    n = jax.device_count()
    try:
        MeshConfig.from_any(cfg.mesh.to_dict()).axis_sizes(n)
        validate_inference(cfg, phases, model_cfg, n_devices=n)
    except ValueError as e:
        raise app.UsageError(f"config: {e}") from None


GENERATION_CONFIG = ("auto", "none")
BACKENDS = ("local", "server")


def validate_inference(cfg, phases: list[str], model_cfg=None, n_devices: int | None = None) -> None:
    """The serving section: mesh, rules, paging knobs, sampling defaults; with `n_devices`, the
    serving mesh against it; and, when the config names its chip (inference.device_kind) and the
    mesh size is known (n_devices, or no -1), the per-chip serving memory."""
    import math

    from automem_jax.llm import layout
    from automem_jax.parallel.mesh import serving_mesh_config, serving_rules
    inf = cfg.inference
    if inf.backend not in BACKENDS:
        raise ValueError(f"inference.backend {inf.backend!r}: expected one of {', '.join(BACKENDS)}")
    if inf.backend == "server":
        from automem_jax.llm.replicas import ReplicaConfig
        try:
            rcfg = ReplicaConfig.from_any(inf.server)
        except (ValueError, TypeError) as e:
            raise ValueError(f"inference.server: {e}") from None
        if rcfg.api_key_env and not os.environ.get(rcfg.api_key_env):
            raise ValueError(f"inference.server.api_key_env: environment variable {rcfg.api_key_env} is not set")
    if inf.max_batch < 1 or inf.max_len < 2:
        raise ValueError(f"inference.max_batch {inf.max_batch} / max_len {inf.max_len}: expected >= 1 / >= 2")
    mesh = serving_mesh_config(inf.mesh.to_dict())
    if n_devices is not None:
        try:
            mesh.axis_sizes(n_devices)
        except ValueError as e:
            raise ValueError(f"inference.mesh {inf.mesh.to_dict()}: {e}") from None
    try:
        rules = serving_rules(inf.rules)
    except (ValueError, TypeError) as e:
        raise ValueError(f"inference.rules {inf.rules!r}: {e}") from None
    if any("fsdp" in (t if isinstance(t, tuple) else (t,)) for _, t in rules):
        raise ValueError(f"inference.rules {inf.rules!r}: the serving mesh has no fsdp axis; use data or tensor")
    if inf.page_size < 1:
        raise ValueError(f"inference.page_size {inf.page_size}: expected >= 1")
    if inf.prefill_chunk < inf.page_size:
        raise ValueError(f"inference.prefill_chunk {inf.prefill_chunk}: expected >= inference.page_size "
                         f"({inf.page_size})")
    if inf.cache_tokens < 0 or 0 < inf.cache_tokens < inf.max_len:
        raise ValueError(f"inference.cache_tokens {inf.cache_tokens}: expected 0 (max_batch x max_len) or at "
                         f"least inference.max_len ({inf.max_len}), so one request can reach max_len")
    if inf.generation_config not in GENERATION_CONFIG:
        raise ValueError(f"inference.generation_config {inf.generation_config!r}: expected one of "
                         f"{', '.join(GENERATION_CONFIG)}")
    if inf.top_p is not None and not 0 < inf.top_p <= 1:
        raise ValueError(f"inference.top_p {inf.top_p!r}: expected in (0, 1] or unset")
    rp = inf.repetition_penalty
    if rp is not None and not rp > 0:
        raise ValueError(f"inference.repetition_penalty {rp!r}: expected > 0 (1.0 = off) or unset")
    if inf.device_kind:
        device = layout.device_memory(inf.device_kind)
        n = n_devices if n_devices is not None else (
            math.prod((mesh.data, mesh.tensor)) if -1 not in (mesh.data, mesh.tensor) else None)
        if n is not None and model_cfg is not None:
            # Two engines (specialist + base) are held at once by the two-model evaluations.
            engines = 2 if {"loop2", "final_eval"} & set(phases) else 1
            mem = layout.serving_memory_for_config(cfg, n, model_cfg=model_cfg, engines=engines)
            try:
                mem.check(device)
            except ValueError as e:
                raise ValueError(f"inference (device_kind {inf.device_kind!r}, mesh {mesh.data}x{mesh.tensor}): "
                                 f"{e}") from None


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
    for name in ("httpx2", "httpcore2"):  # one INFO line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    # orbax logs every save through absl at INFO; keep one line per unit of work.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = _CONFIG.value
    phases = _resolve_phases(cfg)
    model_cfg = validate_config(cfg, phases)
    if cfg.inference.backend == "server":
        # The replicas own the accelerator while they serve; this process stays on the CPU and
        # runs training in child processes (launch/child.py), which check the devices themselves.
        import jax
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.mesh.multi_host:
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only; TPUs ignore it
        from automem_jax.parallel.mesh import MeshConfig, maybe_initialize_distributed
        maybe_initialize_distributed(MeshConfig.from_any(cfg.mesh.to_dict()))
    if cfg.inference.backend != "server":
        validate_devices(cfg, phases, model_cfg)
    run(cfg, _WORKDIR.value, phases)


if __name__ == "__main__":
    app.run(main)
