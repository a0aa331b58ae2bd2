"""Loop 2 (memory proficiency): mine good memory decisions from traces and train on them.

One iteration, as in upstream AutoMem's training engine:

    traces ──extract_candidates──> one candidate per LOG phase and per PLAN memory consultation
           ──filter_top_episodes──> (optional) only the best X% of episodes       (both: loop2_mining)
           ──postprocess──────────> upstream's fixed target clean-up (drops carry a reason)
           ──judge_candidates─────> an LLM (or heuristic) critic accepts or rejects each one (judging)
           ──build_iteration_dataset> datasets/<iter>/{selected.jsonl, review_decisions.jsonl,
                                      selection_stats.json}                        (loop2_data)
    run_loop2: dataset -> train_fn -> eval_fn (two-model split) -> one ledger.jsonl row per iteration

Every unit of work (decision, dataset, training, evaluation, ledger row) leaves a marker, so
re-running resumes where it stopped.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from automem_jax import storage
from automem_jax.loops.loop2_data import build_iteration_dataset
from automem_jax.loops.loop2_mining import episodes_of
from automem_jax.parallel import hosts
from automem_jax.rollout.traces import dumps, dumps_pretty

log = logging.getLogger(__name__)

__all__ = ["run_loop2", "read_ledger"]


def read_ledger(workdir: str) -> list[dict]:
    """The ledger as process 0 reads it (every host decides alike)."""
    path = storage.join(workdir, "ledger.jsonl")
    return hosts.primary(lambda: storage.read_jsonl(path) if storage.exists(path) else [], f"ledger {path}")


def _append_ledger(workdir: str, row: dict) -> None:
    # gs:// cannot append: rewrite the (small) file; local writes are atomic, so no torn ledger.
    # Process 0 alone writes it (every host runs the loop); later phases read it after a barrier.
    if not storage.primary_host():
        return
    path = storage.join(workdir, "ledger.jsonl")
    rows = (storage.read_jsonl(path) if storage.exists(path) else []) + [row]  # not read_ledger: one host here
    storage.write_text(storage.join(workdir, "ledger.jsonl"), "".join(dumps(r) + "\n" for r in rows))


def _unit(folder: str, result_name: str, fn: Callable[[], dict]) -> tuple[dict, float | None]:
    """Run ``fn`` once: its result is saved next to a DONE marker and reloaded on a re-run.
    Multi-host: every host runs ``fn`` (SPMD work); process 0's result is the one kept everywhere."""
    done, path = storage.join(folder, "DONE"), storage.join(folder, result_name)
    saved = hosts.primary(lambda: storage.read_json(path) if storage.exists(done) else None,
                          f"unit {folder}")
    if saved is not None:
        return saved, None
    if storage.primary_host():
        storage.makedirs(folder)  # the unit's folder exists for fn
    t = time.perf_counter()
    result = fn()
    if not isinstance(result, Mapping):
        raise TypeError(f"{result_name}: expected a dict from the callable, got {type(result).__name__}")
    result = hosts.primary(lambda: dict(result), f"unit result {folder}")
    if storage.primary_host():
        storage.write_text(path, dumps_pretty(dict(result)))
        storage.write_text(done, "ok\n")
    return dict(result), time.perf_counter() - t


_HYGIENE_KEYS = ("redundant_write_rate", "empty_search_rate", "ops_per_step", "context_tokens_per_step")


def _eval_entry(summary: Mapping, run_dir: str) -> dict:
    per_task, hyg, weights = {}, defaultdict(float), 0
    for env, tasks in (summary.get("environments") or {}).items():
        for task, t in tasks.items():
            h = t.get("hygiene") or {}
            per_task[f"{env}/{task}"] = {"progression_percentage": t.get("progression_percentage"),
                                         "standard_error": t.get("standard_error"),
                                         "episodes": t.get("episodes"), "hygiene": h}
            w = t.get("steps") or 1  # pool the rates over steps across tasks
            weights += w
            for k in _HYGIENE_KEYS:
                hyg[k] += w * float(h.get(k, 0.0))
    episodes = hosts.primary(lambda: episodes_of(run_dir) if storage.exists(run_dir) else [],
                             f"episodes {run_dir}")
    return {
        "run_dir": run_dir,
        "average_progress": summary.get("average_progress"), "standard_error": summary.get("standard_error"),
        "episodes": summary.get("episodes", len(episodes)),
        "per_episode": episodes or summary.get("per_episode", []),
        "per_task": per_task,
        "hygiene": {k: v / weights for k, v in hyg.items()} if weights else {},
    }


def _copy_judge_cache(src_dir: str, dst_dir: str) -> int:
    """Seed a new dataset's judge cache with an earlier one's verdicts (same judge level): a
    re-sample or another episode filter re-asks nothing the judge already answered."""
    src, dst = storage.join(src_dir, "judge_cache"), storage.join(dst_dir, "judge_cache")
    names = [n for n in storage.listdir(src) if n.startswith("batch_") and n.endswith(".jsonl")]
    if not names or storage.listdir(dst):
        return 0
    for n in names:
        storage.write_text(storage.join(dst, n), storage.read_text(storage.join(src, n)))
    return len(names)


def run_loop2(*, workdir: str, traces_dir: str, judge, train_fn: Callable[..., dict],
              eval_fn: Callable[[dict, str, int], dict], iterations: int = 1, min_examples: int = 300,
              top_pct: float = 100, start_iteration: int = 0, reuse_dataset: bool = False,
              allow_fewer: bool = False, batch_size: int = 20, max_examples: int = 0, sample_seed: int = 0,
              decider=None) -> list[dict]:
    """Run Loop-2 iterations ``start_iteration .. start_iteration + iterations - 1``; returns their ledger rows.

    Each iteration: dataset ``workdir/datasets/<i>/`` from the traces in ``traces_dir`` (at most
    ``max_examples``, see build_iteration_dataset), ``train_fn(dataset_dir, workdir/loop2/<i>/train, i)``,
    ``eval_fn(train_result, workdir/loop2/<i>/eval, i)`` (a run summary as traces.summarize
    writes it), then one row in ``workdir/ledger.jsonl``.

    Without ``decider`` every iteration repeats the configuration (``reuse_dataset``: every
    iteration after ``start_iteration`` trains on that iteration's dataset). With a
    loops.decider.Decider, each iteration first gets a decision from the ledger so far (process 0
    decides, the others receive it; saved in ``loop2/<i>/decision/``): which dataset (reuse one or
    regenerate with another judge level / episode filter / sample seed) and which recipe, passed
    as ``train_fn(..., recipe=...)``. The row records it under ``decision``.

    Finished units are never redone: an iteration with a ledger row is returned as recorded, and a
    decision, dataset, training or evaluation with its DONE marker is reloaded. A dataset below
    ``min_examples`` raises NotEnoughExamples (unless ``allow_fewer``) before anything is trained.
    """
    if iterations < 0 or start_iteration < 0:
        raise ValueError(f"iterations and start_iteration must be >= 0, got {iterations}, {start_iteration}")
    rows = []
    for it in range(start_iteration, start_iteration + iterations):
        ledger = read_ledger(workdir)
        recorded = [r for r in ledger if r.get("iteration") == it]
        if recorded:
            log.info("loop2 iteration %d already in the ledger, skipped", it)
            rows.append(recorded[-1])
            continue
        t0 = time.perf_counter()
        it_dir = storage.join(workdir, "loop2", str(it))
        it_judge, it_top, it_seed, seed_cache_from = judge, top_pct, sample_seed, None
        if decider is None:
            source = start_iteration if reuse_dataset else it
            dataset_dir = storage.join(workdir, "datasets", str(source))
            decision = {"by": "config", "data": "reuse" if source != it else "regenerate", "dataset_from": source,
                        "judge": "default", "top_pct": top_pct, "sample_seed": sample_seed, "recipe": None,
                        "rationale": "no decider: every iteration repeats the configuration"}
        else:
            history = [r for r in ledger if isinstance(r.get("iteration"), int) and r["iteration"] < it]
            # Saved before anything uses it: a resumed iteration keeps the choice its units were made with.
            decision, _ = _unit(storage.join(it_dir, "decision"), "decision.json",
                                lambda: hosts.primary(lambda: decider.decide(history, it), f"loop2 decision {it}"))
            log.info("loop2 iteration %d decision (%s): data %s, judge %s, top %s%%, recipe %s: %s", it,
                     decision["by"], decision["data"], decision["judge"], decision["top_pct"], decision["recipe"],
                     decision.get("rationale", ""))
            if decision["data"] == "reuse" and decision.get("dataset_dir"):
                dataset_dir, source = decision["dataset_dir"], decision.get("dataset_from")
            else:
                source = it
                dataset_dir = storage.join(workdir, "datasets", str(it))
                same = [r for r in history if (r.get("decision") or {}).get("judge", "default") == decision["judge"]
                        and r.get("dataset_dir")]
                seed_cache_from = same[-1]["dataset_dir"] if same else None
            it_judge = decider.judge(judge, decision["judge"])
            it_top, it_seed = decision["top_pct"], decision["sample_seed"]
        td = time.perf_counter()

        def build():
            done = storage.exists(storage.join(dataset_dir, "DONE"))
            if not done and seed_cache_from and seed_cache_from != dataset_dir:
                _copy_judge_cache(seed_cache_from, dataset_dir)
            return done, build_iteration_dataset(
                traces_dir, dataset_dir, it_judge, min_examples=min_examples, top_pct=it_top, version=source,
                batch_size=batch_size, allow_fewer=allow_fewer, max_examples=max_examples, sample_seed=it_seed)

        # Process 0 alone judges and writes the dataset; the others get its stats (or its error).
        resumed, stats = hosts.primary(build, f"loop2 dataset {dataset_dir}")
        dataset_s = None if resumed else time.perf_counter() - td
        train_dir = storage.join(it_dir, "train")
        recipe = {} if decider is None else {"recipe": decision["recipe"]}
        train, train_s = _unit(train_dir, "train_result.json",
                               lambda: train_fn(dataset_dir, train_dir, it, **recipe))
        eval_dir = storage.join(it_dir, "eval")
        summary, eval_s = _unit(eval_dir, "eval_summary.json", lambda: eval_fn(train, eval_dir, it))
        ev = _eval_entry(summary, eval_dir)
        row = {
            "iteration": it,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "decision": decision,
            "dataset_dir": dataset_dir, "dataset_version": stats.get("version", source),
            "dataset_reused_from": source if source != it else None,
            "n_examples": stats["selected"], "n_accepted": stats.get("accepted", stats["selected"]),
            "n_candidates": stats["candidates"],
            "counts": {"by_phase": stats["by_phase"], "by_decision": stats["by_decision"],
                       "by_stage": stats.get("by_stage", {})},
            "train": {**{k: train.get(k) for k in ("checkpoint", "peft", "first_loss", "final_loss", "steps",
                                                   "examples", "resumed_from", "recipe") if k in train},
                      "dir": train_dir},
            "eval": {k: ev[k] for k in ("run_dir", "average_progress", "standard_error", "episodes", "per_task")},
            "progression_mean": ev["average_progress"], "progression_se": ev["standard_error"],
            "per_episode": ev["per_episode"],
            "hygiene": ev["hygiene"],
            "config": {"min_examples": min_examples, "top_pct": top_pct, "reuse_dataset": reuse_dataset,
                       "batch_size": batch_size, "max_examples": max_examples},
            # Seconds spent in this invocation; None for a unit that was already finished.
            "seconds": {"dataset": dataset_s, "train": train_s, "eval": eval_s,
                        "total": time.perf_counter() - t0},
        }
        _append_ledger(workdir, row)
        log.info("loop2 iteration %d: %d examples (%d accepted), progression %.2f ± %.2f", it, row["n_examples"],
                 row["n_accepted"], row["progression_mean"] or 0.0, row["progression_se"] or 0.0)
        rows.append(row)
    return rows
