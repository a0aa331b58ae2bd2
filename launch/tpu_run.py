"""The main job: `python -m launch.tpu_run --config=configs/tiny.py --workdir=runs/tiny`.

Run the same command on every host of a TPU pod. The workdir (local or gs://) records each
finished phase in phases/<name>/DONE, so re-running the command resumes after the last one.
"""

from __future__ import annotations

import dataclasses
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
    import jax
    if jax.process_index() != 0:
        return
    storage.write_text(storage.join(workdir, "phases", name, "result.json"), json.dumps(result, indent=2) + "\n")
    storage.write_text(storage.join(workdir, "phases", name, "DONE"), time.strftime("%Y-%m-%dT%H:%M:%SZ\n"))


def build_model(cfg):
    """The policy from config: a Hugging Face checkpoint, or a random preset."""
    from automem_jax.models import hf, qwen
    from automem_jax.parallel.mesh import make_mesh
    mesh = make_mesh(cfg.mesh.to_dict())
    runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers,
                   remat=cfg.model.remat)
    if cfg.model.checkpoint:
        model, mcfg = hf.load_pretrained(cfg.model.checkpoint, mesh=mesh, **runtime)
    else:
        mcfg = qwen.preset(cfg.model.preset, **runtime)
        model = qwen.init_model(mcfg, seed=cfg.seed, mesh=mesh)
    return model, mcfg, mesh


def phase_model_smoke(cfg, workdir: str) -> dict:
    """Policy + tokenizer + HF round trip + greedy generation through the engine."""
    import jax
    import numpy as np
    from flax import nnx

    from automem_jax.agent.types import ChatRequest
    from automem_jax.llm.engine import Engine, SamplingParams
    from automem_jax.models import hf
    from automem_jax.models.tokenizer import apply_chat_template, load_tokenizer

    t0 = time.perf_counter()
    model, mcfg, mesh = build_model(cfg)
    tok = load_tokenizer(cfg.tokenizer or None)
    log.info("model %s: %s parameters on mesh %s", cfg.model.checkpoint or cfg.model.preset,
             f"{mcfg.num_params():,}", dict(mesh.shape))
    result = {"parameters": mcfg.num_params(), "mesh": dict(mesh.shape)}
    if cfg.smoke.export:
        out = storage.join(workdir, "export", "hf")
        hf.save_pretrained(model, mcfg, out, tokenizer=tok)
        again, _ = hf.load_pretrained(out, mesh=mesh, dtype=mcfg.dtype, param_dtype=mcfg.param_dtype,
                                      scan_layers=mcfg.scan_layers, remat=mcfg.remat)
        a = jax.tree.leaves(nnx.state(model, nnx.Param))
        b = jax.tree.leaves(nnx.state(again, nnx.Param))
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
        if not same:
            raise RuntimeError(f"export round trip changed the parameters ({out})")
        log.info("exported to %s and re-imported: parameters identical", out)
        result["export"] = out
    request = ChatRequest([{"role": "user", "content": cfg.smoke.prompt}], phase="chat", model_role="policy")
    max_len = len(apply_chat_template(tok, request.messages)) + cfg.smoke.max_new_tokens + 1
    engine = Engine(model, tok, max_batch=1, max_len=max_len, mesh=mesh, seed=cfg.seed)
    t1 = time.perf_counter()
    out = engine.generate_full([request], SamplingParams(temperature=0, max_tokens=cfg.smoke.max_new_tokens))[0]
    if out.error:
        raise RuntimeError(f"smoke generation failed: {out.error}")
    gen_s = time.perf_counter() - t1
    ids, new, text = out.prompt_tokens, out.token_ids, out.text
    log.info("prompt: %d tokens; generated %d tokens in %.2f s (compile included): %r", ids, len(new), gen_s,
             text)
    result.update(prompt_tokens=ids, generated=new, finish_reason=out.finish_reason, text=text, generate_s=gen_s,
                  total_s=time.perf_counter() - t0)
    return result


def phase_rollout_smoke(cfg, workdir: str) -> dict:
    """A short Craftax rollout: MemoryAgents driven by the local engine, traces + summary.json."""
    from automem_jax.llm.client import EngineClient
    from automem_jax.llm.engine import Engine
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.models.tokenizer import load_tokenizer
    from automem_jax.rollout.runner import Runner

    r = cfg.rollout
    model, mcfg, mesh = build_model(cfg)
    engine = Engine(model, load_tokenizer(cfg.tokenizer or None), max_batch=r.max_batch, max_len=r.max_len,
                    mesh=mesh, seed=cfg.seed, model_name=cfg.model.checkpoint or cfg.model.preset)
    client = EngineClient(engine, max_tokens=r.max_tokens, temperature=r.temperature)
    structure = MemoryStructure.load(r.structure) if r.structure else MemoryStructure.default(r.structure_env)
    runner = Runner(client, structure, storage.join(workdir, "rollout_smoke"), r.env, num_envs=r.num_envs,
                    max_steps=r.max_steps)
    seeds = list(range(r.first_seed, r.first_seed + r.episodes))
    summary = runner.run(seeds)
    env = next(iter(summary["environments"].values()))
    task = next(iter(env.values()))
    log.info("rollout: %d episodes x %d steps, progression %.2f%% ± %.2f%%, %d compiles, %.2f agent-steps/s",
             task["episodes"], r.max_steps, task["progression_percentage"], task["standard_error"],
             engine.stats.compiles, runner.stats.agent_steps / max(runner.stats.wall_s, 1e-9))
    return {"summary": storage.join(workdir, "rollout_smoke", "summary.json"),
            "progression": task["progression"], "progression_se": task["progression_se"],
            "engine": engine.stats.as_dict(), "runner": dataclasses.asdict(runner.stats)}


PHASES = {"model_smoke": phase_model_smoke, "rollout_smoke": phase_rollout_smoke}


def run(cfg, workdir: str, phases: list[str]) -> None:
    storage.makedirs(workdir)
    import jax
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2) + "\n")
    for name in phases:
        if _phase_done(workdir, name):
            log.info("phase %s: already done in %s, skipping", name, workdir)
            continue
        log.info("phase %s: start", name)
        result = PHASES[name](cfg, workdir)
        _mark_done(workdir, name, result)
        log.info("phase %s: done", name)


def validate_config(cfg) -> None:
    """Cheap checks before anything is written, so a typo never costs a half-written workdir."""
    from automem_jax.models import qwen
    from automem_jax.parallel.mesh import MeshConfig
    try:
        runtime = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                       scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)
        if not cfg.model.checkpoint:
            qwen.preset(cfg.model.preset, **runtime)
        else:
            qwen.QwenConfig.from_hf(cfg.model.checkpoint, **runtime)
        MeshConfig.from_any(cfg.mesh.to_dict())
        if "rollout" in cfg:
            from automem_jax.envs import KNOWN_ENVS
            from automem_jax.memory.structure import MemoryStructure
            env = cfg.rollout.env
            if env not in KNOWN_ENVS and not env.startswith("minihack:"):
                raise ValueError(f"rollout.env {env!r}: expected one of {', '.join(KNOWN_ENVS[:4])}, ...")
            structure = (MemoryStructure.load(cfg.rollout.structure) if cfg.rollout.structure
                         else MemoryStructure.default(cfg.rollout.structure_env))
            structure.validate()
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(f"config: {e}") from None


def _resolve_phases(cfg) -> list[str]:
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
    cfg = _CONFIG.value
    phases = _resolve_phases(cfg)
    validate_config(cfg)
    run(cfg, _WORKDIR.value, phases)


if __name__ == "__main__":
    app.run(main)
