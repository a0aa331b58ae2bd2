"""The stages of the main job, composed from the library. `launch/tpu_run.py` runs them in order.

    bootstrap* -> baseline -> loop1 -> collect -> loop2 -> final_eval -> export -> report

Every stage writes `stages/<name>/result.json` + `DONE` when it ends; inside a stage each unit of
work (an episode, a Loop-1 candidate, a Loop-2 dataset / training step / evaluation) leaves its own
record in the workdir, so the same command resumes after a crash or a preemption without redoing
finished units. (*bootstrap: only with bootstrap.enabled; it warm-starts the random tiny model, or a
real checkpoint that does not yet follow the op grammar, on scripted-teacher demonstrations.)

The shared run (model, engines, evaluation) is `launch/run.py`; the units that need the
accelerator are `launch/units.py`; the config read into library objects is `launch/config.py`.
"""
from __future__ import annotations

import logging
import os
import tempfile

from automem_jax import storage
from automem_jax.critic import HeuristicCritic
from automem_jax.loops.loop1_structure import run_loop1
from automem_jax.loops.loop2 import read_ledger, run_loop2
from automem_jax.loops.loop2_data import NotEnoughExamples
from automem_jax.loops.teacher import TeacherClient, teacher_examples
from automem_jax.memory.structure import MemoryStructure
from automem_jax.models.tokenizer import train_domain_tokenizer
from automem_jax.parallel import hosts
from automem_jax.report import build_report
from automem_jax.rollout.traces import dumps_pretty
from automem_jax.training.data import SFTDataset, build_dataset
from launch.config import (collect_seeds, data_config, heldout_seeds, load_structure, loop1_config, make_critic,
                           make_decider, parse_seeds)
from launch.run import Run, combined_summary, hygiene, progress_line
from launch.workdir import copy_folder, is_writer, mark_unit, read_json, unit_done

log = logging.getLogger("automem_jax")


def stage_bootstrap(run: Run) -> dict:
    """Scripted teacher episodes -> SFT dataset -> fine-tune -> bootstrap/model, a HF folder.

    Random preset (tiny): a domain tokenizer is fitted to the teacher's chats first
    (bootstrap.tokenizer_vocab) and the preset gets its vocabulary. model.checkpoint: its own
    tokenizer and chat template render the chats and the checkpoint itself is fine-tuned, LoRA
    (merged) or full per bootstrap.train.mode."""
    cfg = run.cfg
    b = cfg.bootstrap
    if not b.enabled:
        return {"skipped": "bootstrap.enabled is False"}
    structure = load_structure(cfg)
    teacher = TeacherClient(seed=cfg.seed, redundant_write_rate=b.redundant_write_rate,
                            useless_read_rate=b.useless_read_rate, tokenizer=run.base_tok)
    traces = run.path("bootstrap", "teacher")
    summary = run.play(teacher, structure, traces, parse_seeds(b.seeds), max_steps=b.max_steps, solo=True)
    log.info(progress_line("bootstrap teacher", summary))

    tok_dir = run.path("bootstrap", "tokenizer")
    if run.trained_tokenizer() and not unit_done(tok_dir):
        def train_tokenizer() -> dict:
            texts = [m["content"] for e in teacher_examples(traces) for m in e["conversations"]]
            tok = train_domain_tokenizer(texts, run.base_tok, int(b.tokenizer_vocab))
            with tempfile.TemporaryDirectory() as tmp:
                tok.save_pretrained(tmp)
                storage.copy_tree(tmp, tok_dir)
            info = {"vocab": len(tok), "requested": int(b.tokenizer_vocab), "texts": len(texts)}
            mark_unit(tok_dir, info)
            return info

        # Trained once, on process 0; every host then loads the saved folder.
        info = hosts.primary(train_tokenizer, "bootstrap tokenizer")
        run._tok = None
        log.info("bootstrap tokenizer: %d tokens trained on %d teacher messages", info["vocab"], info["texts"])

    data_dir = run.path("bootstrap", "dataset")
    if unit_done(data_dir):
        ds = SFTDataset.load(data_dir, run.tok)
    else:
        ds = build_dataset(teacher_examples(traces), run.tok, data_config(b.data), source=traces)
        if is_writer():
            ds.save(data_dir)
        mark_unit(data_dir, ds.manifest)
    log.info("bootstrap dataset: %d examples, %d target tokens (tokenizer: %s)", len(ds),
             ds.manifest.get("tokens", {}).get("target", 0),
             "bootstrap/tokenizer" if run.trained_tokenizer() else (run.cfg.model.checkpoint or "configured"))

    model_dir = run.path("bootstrap", "model")
    if not unit_done(model_dir):
        run.on_accelerator("bootstrap_train")
    info = read_json(storage.join(model_dir, "info.json")) or {}
    return {"teacher_summary": storage.join(traces, "summary.json"),
            "teacher_progression": summary["average_progress"], "teacher_hygiene": hygiene(summary),
            "examples": len(ds), "model": model_dir, "train": info}


def stage_baseline(run: Run) -> dict:
    """The base policy with the start structure on the fixed eval seeds."""
    structure = load_structure(run.cfg)
    out = run.path("eval", "baseline")
    s = run.evaluate(structure, out, parse_seeds(run.cfg.eval.seeds))
    log.info(progress_line("baseline", s))
    if is_writer():
        storage.write_text(run.path("structures", "v0.yaml"), structure.to_yaml())
    result = {"summary": storage.join(out, "summary.json"), "average_progress": s["average_progress"],
              "standard_error": s["standard_error"], "hygiene": hygiene(s)}
    held = heldout_seeds(run.cfg)
    if held:
        # Measured before anything is tuned, on seeds no loop ever sees.
        h = _eval_once(run, run.path("eval", "baseline_heldout"), lambda d: run.evaluate(structure, d, held))
        log.info(progress_line("baseline (held-out seeds)", h))
        result["heldout"] = {"summary": run.path("eval", "baseline_heldout", "summary.json"), "seeds": held,
                             "average_progress": h["average_progress"], "standard_error": h["standard_error"]}
    return result


def _eval_once(run: Run, out: str, play) -> dict:
    """An evaluation whose summary.json already exists is read, not replayed."""
    s = read_json(storage.join(out, "summary.json"))
    return s if s is not None else play(out)


def best_structure(run: Run):
    """The newest accepted Loop-1 structure, or the start structure when Loop 1 has not run."""
    def newest() -> str | None:
        path = run.path("structures", "best.json")
        best = storage.read_json(path, default=None)
        if best and best.get("structure") and storage.exists(best["structure"]):
            return storage.read_text(best["structure"])
        if best and best.get("version") is not None:
            p = run.path("structures", f"v{best['version']}.yaml")
            if storage.exists(p):
                return storage.read_text(p)
        return None

    text = hosts.primary(newest, "best structure")
    return MemoryStructure.from_text(text) if text is not None else load_structure(run.cfg)


def stage_loop1(run: Run) -> dict:
    """Critic revisions of the memory structure, kept only when progression on the eval seeds improves."""
    seeds = parse_seeds(run.cfg.eval.seeds)
    baseline_dir = run.path("eval", "baseline")
    baseline = read_json(storage.join(baseline_dir, "summary.json"))
    result = run_loop1(critic=make_critic(run.cfg), start=load_structure(run.cfg),
                       evaluate=lambda structure, run_dir: run.evaluate(structure, run_dir, seeds),
                       workdir=run.workdir, cfg=loop1_config(run.cfg), baseline_summary=baseline,
                       baseline_run_dir=baseline_dir if baseline else None, log=log.info)
    return {"best_version": result.best_version, "best_metric": result.best_metric,
            "candidates": len(result.archive), "accepted": sum(r.get("status") == "accepted" for r in result.archive),
            "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}


def stage_collect(run: Run) -> dict:
    """Training traces: the best structure, the base policy, seeds disjoint from the eval seeds."""
    c = run.cfg.collect
    seeds = collect_seeds(c.episodes, c.seed_base, parse_seeds(run.cfg.eval.seeds))
    out = run.path("traces_collect")
    if c.policy == "teacher":
        # Tiny config: the scripted teacher stands in for a base model that already uses memory.
        b = run.cfg.bootstrap
        client = TeacherClient(seed=run.cfg.seed + 1, redundant_write_rate=b.redundant_write_rate,
                               useless_read_rate=b.useless_read_rate, tokenizer=run.tok)
    else:
        client = run.client(run.base_source())
    s = run.play(client, best_structure(run), out, seeds, max_steps=c.max_steps,
                 solo=run.hosted or c.policy == "teacher")
    log.info(progress_line(f"collect ({c.policy})", s))
    return {"run_dir": out, "episodes": s["episodes"], "average_progress": s["average_progress"],
            "hygiene": hygiene(s), "seeds": seeds, "policy": c.policy}


def _judge(run: Run):
    if run.cfg.loop2.judge == "heuristic" or run.cfg.critic.kind == "heuristic":
        return HeuristicCritic(seed=run.cfg.seed)
    return make_critic(run.cfg)


def stage_loop2(run: Run) -> dict:
    """Mine good memory turns -> postprocess -> LoRA SFT -> two-model eval; one ledger row per iteration."""
    cfg = run.cfg
    l2 = cfg.loop2
    seeds = parse_seeds(cfg.eval.seeds)
    structure = best_structure(run)

    def train_fn(dataset_dir: str, out_dir: str, iteration: int, recipe: dict | None = None) -> dict:
        rows = [x for x in storage.read_text(storage.join(dataset_dir, "selected.jsonl")).splitlines() if x.strip()]
        if not rows:
            raise NotEnoughExamples(0, l2.min_examples, {"dataset": dataset_dir})
        return run.on_accelerator("loop2_train", dataset_dir=dataset_dir, out_dir=out_dir, iteration=iteration,
                                  recipe=recipe)

    def eval_fn(train_result: dict, run_dir: str, iteration: int) -> dict:
        s = run.evaluate(structure, run_dir, seeds, specialist=train_result["checkpoint"],
                         adapter=train_result.get("peft") or None)
        log.info(progress_line(f"loop2 iteration {iteration} (two-model)", s))
        return s

    try:
        rows = run_loop2(workdir=run.workdir, traces_dir=run.path("traces_collect"), judge=_judge(run),
                         train_fn=train_fn, eval_fn=eval_fn, iterations=l2.iterations,
                         min_examples=l2.min_examples, top_pct=l2.top_pct, reuse_dataset=l2.reuse_dataset,
                         allow_fewer=l2.allow_fewer, max_examples=l2.get("max_examples", 0),
                         sample_seed=l2.get("sample_seed", 0), decider=make_decider(cfg))
    except NotEnoughExamples as e:
        if not l2.allow_fewer:
            raise
        # allow_fewer (tiny config): a student that wrote no usable memory turn ends Loop 2 here;
        # final_eval and export then use the base policy, and the report says so.
        log.warning("loop2: %s; no iteration trained (loop2.allow_fewer is set, so the run goes on)", e)
        return {"iterations": 0, "skipped": str(e), "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}
    return {"iterations": len(rows), "ledger": run.path("ledger.jsonl"),
            "progression": [r.get("progression_mean") for r in rows],
            "redundant_write_rate": [r.get("hygiene", {}).get("redundant_write_rate") for r in rows],
            "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}


def best_iteration(workdir: str) -> dict | None:
    rows = read_ledger(workdir)
    if not rows:
        return None
    # Highest progression; ties go to the cleaner memory (fewer redundant writes).
    return max(rows, key=lambda r: (r.get("progression_mean", 0.0),
                                    -r.get("hygiene", {}).get("redundant_write_rate", 0.0)))


def stage_final_eval(run: Run) -> dict:
    """The final system (best structure + best specialist, two-model) against the baseline."""
    cfg = run.cfg
    seeds = parse_seeds(cfg.final_eval.seeds or cfg.eval.seeds)
    same = seeds == parse_seeds(cfg.eval.seeds)
    best = best_iteration(run.workdir)
    out = run.path("eval", "final")
    if best is None:
        log.info("final eval: no Loop-2 iteration finished; evaluating the base policy with the best structure")
        s = run.evaluate(best_structure(run), out, seeds)
    elif same and best.get("eval", {}).get("run_dir"):
        # The chosen iteration already ran on exactly these seeds: reuse, do not replay.
        src = best["eval"]["run_dir"]
        s = hosts.primary(lambda: combined_summary(src), "final summary")
        s["reused_from"] = src
        if is_writer():
            storage.write_text(storage.join(out, "summary.json"), dumps_pretty(s))
    else:
        s = run.evaluate(best_structure(run), out, seeds, specialist=best["train"]["checkpoint"],
                         adapter=best["train"].get("peft") or None)
    base_dir = run.path("eval", "baseline") if same else run.path("eval", "final_baseline")
    base = read_json(storage.join(base_dir, "summary.json"))
    if base is None:
        base = run.evaluate(load_structure(cfg), base_dir, seeds)
    hb, hf_ = hygiene(base), hygiene(s)
    log.info(progress_line("final", s))
    log.info("redundant-write rate: baseline %.1f%% -> final %.1f%%", 100 * hb["redundant_write_rate"],
             100 * hf_["redundant_write_rate"])
    result = {"summary": storage.join(out, "summary.json"), "baseline_summary": storage.join(base_dir, "summary.json"),
              "iteration": None if best is None else best["iteration"], "chosen_on": "eval.seeds",
              "final": {"average_progress": s["average_progress"], "standard_error": s["standard_error"], **hf_},
              "baseline": {"average_progress": base["average_progress"], "standard_error": base["standard_error"],
                           **hb},
              "tokens_in": run.tokens_in, "tokens_out": run.tokens_out}
    held = heldout_seeds(cfg)
    if held:
        # The system was picked on the eval seeds; these seeds say whether the pick generalises.
        structure = best_structure(run)
        fh_dir, bh_dir = run.path("eval", "final_heldout"), run.path("eval", "baseline_heldout")
        if best is None:
            fh = _eval_once(run, fh_dir, lambda d: run.evaluate(structure, d, held))
        else:
            fh = _eval_once(run, fh_dir, lambda d: run.evaluate(structure, d, held,
                                                                specialist=best["train"]["checkpoint"],
                                                                adapter=best["train"].get("peft") or None))
        bh = _eval_once(run, bh_dir, lambda d: run.evaluate(load_structure(cfg), d, held))
        log.info(progress_line("final (held-out seeds)", fh))
        result["heldout"] = {
            "seeds": held, "summary": storage.join(fh_dir, "summary.json"),
            "baseline_summary": storage.join(bh_dir, "summary.json"),
            "final": {"average_progress": fh["average_progress"], "standard_error": fh["standard_error"],
                      **hygiene(fh)},
            "baseline": {"average_progress": bh["average_progress"], "standard_error": bh["standard_error"],
                         **hygiene(bh)}}
    return result


def stage_export(run: Run) -> dict:
    """export/hf: the memory specialist (merged) as a transformers folder; export/peft: its adapter."""
    cfg = run.cfg
    best = best_iteration(run.workdir)
    out = run.path("export", "hf")
    result = {"hf": out}
    if best is None:
        log.info("export: no Loop-2 iteration; exporting the base policy")
        run.on_accelerator("export_base", out=out)
    elif is_writer():
        result["files"] = copy_folder(best["train"]["checkpoint"], out)
        peft = best["train"].get("peft")
        if cfg.export.peft and peft and storage.exists(storage.join(peft, "adapter_config.json")):
            copy_folder(peft, run.path("export", "peft"))
            result["peft"] = run.path("export", "peft")
        result["iteration"] = best["iteration"]
    if cfg.export.hub_repo_id and is_writer():
        result["hub"] = upload_to_hub(out, cfg.export.hub_repo_id, cfg.export.hub_token_env, cfg.export.hub_private)
    log.info("export: %s", out)
    return result


def upload_to_hub(folder: str, repo_id: str, token_env: str, private: bool) -> str:
    token = os.environ.get(token_env or "")
    if not token:
        raise RuntimeError(f"export.hub_repo_id={repo_id!r} needs a Hub token in the environment variable "
                           f"{token_env!r}, which is not set")
    from huggingface_hub import HfApi  # only an export with export.hub_repo_id needs it
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = folder
        if storage.is_gcs(folder):
            local = tmp
            for n in storage.listdir(folder):
                storage.download_file(storage.join(folder, n), os.path.join(tmp, n))
        api.upload_folder(folder_path=local, repo_id=repo_id, commit_message="automem_jax export")
    return f"https://huggingface.co/{repo_id}"


def stage_report(run: Run) -> dict:
    path = build_report(run.workdir) if is_writer() else ""
    log.info("report: %s", path)
    return {"report": path}


STAGES = {
    "bootstrap": stage_bootstrap, "baseline": stage_baseline, "loop1": stage_loop1, "collect": stage_collect,
    "loop2": stage_loop2, "final_eval": stage_final_eval, "export": stage_export, "report": stage_report,
}
STAGE_ORDER = tuple(STAGES)  # the order a full run takes them
