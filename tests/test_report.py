"""automem_jax.report on synthetic run folders: full, partial, empty, and on gs:// (emulator)."""

import json
import subprocess
import sys

import pytest

from automem_jax import report, storage
from automem_jax.rollout.traces import health_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(progress, se, redundant, empty, ops, ctx, invalid, tasks=("default",), health=None):
    """A Runner summary.json shaped like rollout.traces.summarize writes it; `health`: counts per task
    (keys traces.HEALTH_COUNTS), made into summarize's health entries by traces.health_stats."""
    per_task = {t: {"episodes": 5, "steps": 100, "progression_percentage": progress, "standard_error": se,
                    "invalid_action_rate": invalid,
                    "hygiene": {"redundant_write_rate": redundant, "empty_search_rate": empty,
                                "ops_per_step": ops, "context_tokens_per_step": ctx, "redundant_writes": 3}}
                for t in tasks}
    out = {"episodes": 5 * len(tasks), "average_progress": progress, "standard_error": se,
           "input_tokens": 1000, "output_tokens": 200, "environments": {"craftax": per_task}}
    if health is not None:
        for t in per_task.values():
            t["health"] = health_stats(health, episodes=5)
        out["health"] = health_stats({k: v * len(tasks) for k, v in health.items()}, episodes=5 * len(tasks))
    return out


def _write(root, rel, obj):
    text = obj if isinstance(obj, str) else (
        "".join(json.dumps(r) + "\n" for r in obj) if isinstance(obj, list) else json.dumps(obj))
    storage.write_text(storage.join(root, *rel.split("/")), text)


def _full_workdir(root):
    _write(root, "config.json", {"model": {"preset": "tiny", "checkpoint": "", "dtype": "float32",
                                           "param_dtype": "float32"},
                                 "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
                                 "env": {"name": "craftax", "max_steps": 24}, "eval": {"seeds": "42-45"},
                                 "critic": {"kind": "heuristic"}, "report": {"plots": True},
                                 "phases": "bootstrap,baseline,loop1,loop2,final_eval,report"})
    _write(root, "eval/baseline/summary.json", _summary(10.0, 2.0, 0.40, 0.30, 1.5, 800, 0.05))
    _write(root, "eval/final/summary.json", _summary(22.5, 3.0, 0.10, 0.20, 1.2, 600, 0.02))
    _write(root, "structures/archive.jsonl", [
        # Loop 1 records the start structure as row v0; it is the baseline, not a candidate.
        {"id": "v0", "revision": 0, "attempt": 0, "kind": "baseline", "status": "accepted", "version": 0,
         "metric": {"average_progress": 10.0, "standard_error": 2.0}, "decision_reason": "start structure",
         "diff": [], "run_dir": "/nowhere/v0/eval"},
        {"id": "r1-f1", "revision": 1, "attempt": 1, "kind": "fresh", "status": "rejected", "version": None,
         "parent_version": 0, "metric": {"average_progress": 8.0, "standard_error": 1.5, "per_seed": {}},
         "best_metric_before": 10.0, "decision_reason": "8.00 <= 10.00", "rationale": "x",
         "diff": ["prompts.log: reworded", "limits.max_lines: 50 -> 80", "files: +goals"]},
        {"id": "r1-c1", "revision": 1, "attempt": 1, "kind": "continuation", "status": "accepted", "version": 1,
         "parent_version": 0, "metric": {"average_progress": 15.0, "standard_error": 2.5, "per_seed": {}},
         "best_metric_before": 10.0, "decision_reason": "15.00 > 10.00", "diff": ["ops.log: +UPSERT_MAP"]},
        {"id": "r2-f1", "revision": 2, "attempt": 1, "kind": "fresh", "status": "invalid",
         "decision_reason": "validate: prompts.plan missing {memory}", "diff": []},
    ])
    _write(root, "structures/candidates/r1-c1/eval/summary.json", _summary(15.0, 2.5, 0.25, 0.28, 1.4, 700, 0.03))
    _write(root, "ledger.jsonl", [
        {"iteration": 0, "n_examples": 120, "train": {"first_loss": 2.1, "final_loss": 0.9, "steps": 12},
         "progression_mean": 18.0, "progression_se": 2.8,
         "hygiene": {"redundant_write_rate": 0.2, "empty_search_rate": 0.25, "ops_per_step": 1.3,
                     "context_tokens_per_step": 650}},
        {"iteration": 1, "n_examples": 140, "train": {"first_loss": 1.8, "final_loss": 0.7, "steps": 14},
         "progression_mean": 22.5, "progression_se": 3.0, "hygiene": {}},
    ])
    _write(root, "loop2/1/eval/eval_summary.json", _summary(22.5, 3.0, 0.10, 0.20, 1.2, 600, 0.02))
    log = [{"step": i + 1, "loss": 3.0 / (i + 1), "grad_norm": 1.0, "lr": 1e-3, "tokens": 100,
            "tokens_per_s": 50.0, "seconds": 2.0} for i in range(5)]
    _write(root, "bootstrap/train/train_log.jsonl", log)
    _write(root, "loop2/0/train/train_log.jsonl", log[:3])
    _write(root, "phases/baseline/result.json", {"tokens_in": 5000, "tokens_out": 900, "seconds": 12.0})
    _write(root, "phases/baseline/DONE", "2026-01-01T00:00:00Z\n")
    _write(root, "phases/loop1/result.json", {"tokens_in": 20000, "tokens_out": 4000, "seconds": 60.0})
    _write(root, "phases/loop1/DONE", "2026-01-01T01:00:00Z\n")


def _check_full(root, index_path):
    assert index_path == storage.join(root, "report", "index.md")
    text = storage.read_text(index_path)
    for heading in ("# AutoMem run report", "## Final system against the baseline", "## Loop 1",
                    "## Loop 2", "## Memory hygiene", "## Training loss", "## Phases", "## Tokens per phase"):
        assert heading in text, heading
    # Final table: the baseline and final numbers and their changes.
    assert "| progression % ± SE | 10.00 ± 2.00 | 22.50 ± 3.00 | +12.50 (+125%) |" in text
    assert "| redundant-write rate | 40.0% | 10.0% | -30.0 pt (-75%) |" in text
    assert "| empty-search rate | 30.0% | 20.0% |" in text
    assert "| invalid-action rate | 5.0% | 2.0% |" in text
    assert "| context tokens / step | 800 | 600 | -200 (-25%) |" in text
    assert "Redundant memory writes went from 40.0% of writes at baseline to 10.0%" in text
    # Loop 1 candidates, Loop 2 iterations, hygiene rows, tokens.
    assert "r1-c1" in text and "accepted" in text and "ops.log: +UPSERT_MAP" in text
    assert "validate: prompts.plan missing {memory}" in text
    assert "(+1 more)" in text  # r1-f1's diff is cut to two lines
    assert "3 candidate(s), 1 accepted" in text and "| v0 |" not in text and "L1 v0" not in text
    assert "| base |" in text and "2.1000 → 0.9000" in text
    assert "| L1 v1 | 25.0% |" in text and "| L2 it0 | 20.0% |" in text and "| L2 it1 | 10.0% |" in text
    assert "20,000" in text
    assert "craftax" in text and "42-45" in text
    for name in ("loop1_progression.png", "loop2_progression.png", "hygiene.png", "train_loss.png", "tokens.png"):
        assert f"]({name})" in text, name
        assert storage.read_bytes(storage.join(root, "report", name))[:8] == PNG_MAGIC, name


def test_full_workdir(tmp_path):
    root = str(tmp_path / "run")
    _full_workdir(root)
    _check_full(root, report.build_report(root))


def test_partial_workdir_names_what_is_missing(tmp_path):
    root = str(tmp_path / "run")
    _write(root, "eval/baseline/summary.json", _summary(10.0, 2.0, 0.4, 0.3, 1.5, 800, 0.05))
    # A torn last line (a crash mid-write) is skipped, not fatal.
    storage.write_text(storage.join(root, "ledger.jsonl"),
                       json.dumps({"iteration": 0, "progression_mean": 12.0, "progression_se": 1.0}) + "\n{\"iter")
    text = storage.read_text(report.build_report(root))
    assert "`config.json` not found" in text
    assert "`eval/final/summary.json` not found" in text
    assert "`structures/archive.jsonl` not found" in text
    assert "1 malformed line(s) skipped" in text
    assert "no training log found" in text
    assert "| 0 |" in text and "12.00 ± 1.00" in text
    assert (tmp_path / "run" / "report" / "loop2_progression.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "run" / "report" / "loop1_progression.png").exists()


def test_baseline_from_the_loop1_archive(tmp_path):
    """Without eval/baseline, the archive's start row (and its candidate folder) stands in for it."""
    root = str(tmp_path / "run")
    _write(root, "structures/archive.jsonl", [
        {"id": "v0", "revision": 0, "kind": "baseline", "status": "accepted", "version": 0,
         "metric": {"average_progress": 10.0, "standard_error": 2.0}, "run_dir": "/moved/away"}])
    _write(root, "structures/candidates/v0/eval/summary.json", _summary(10.0, 2.0, 0.40, 0.30, 1.5, 800, 0.05))
    _write(root, "eval/final/summary.json", _summary(12.0, 2.0, 0.20, 0.30, 1.5, 800, 0.05))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "| redundant-write rate | 40.0% | 20.0% | -20.0 pt (-50%) |" in text
    assert "0 candidate(s), 0 accepted; best progression 10.00%" in text


def test_empty_workdir_and_garbage_files(tmp_path):
    root = tmp_path / "run"
    (root / "eval" / "final").mkdir(parents=True)
    (root / "eval" / "final" / "summary.json").write_text("not json")
    (root / "config.json").write_text("[1, 2]")
    text = storage.read_text(report.build_report(str(root), plots=False))
    assert "`eval/final/summary.json` is not valid JSON" in text
    assert "holds a list, expected an object" in text
    assert not any(p.suffix == ".png" for p in (root / "report").iterdir())


def test_multi_task_final_table(tmp_path):
    root = str(tmp_path / "run")
    tasks = ("Corridor-R3", "Quest-Easy")
    _write(root, "eval/baseline/summary.json", _summary(20.0, 5.0, 0.4, 0.3, 1.5, 800, 0.05, tasks))
    _write(root, "eval/final/summary.json", _summary(40.0, 6.0, 0.2, 0.3, 1.5, 800, 0.05, tasks))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "| craftax/Quest-Easy | 20.00 ± 5.00 | 40.00 ± 6.00 |" in text


def test_cli(tmp_path):
    root = tmp_path / "run"
    _write(str(root), "eval/baseline/summary.json", _summary(10.0, 2.0, 0.4, 0.3, 1.5, 800, 0.05))
    res = subprocess.run([sys.executable, "-m", "automem_jax.report", str(root), "--no_plots"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(root / "report" / "index.md")
    res = subprocess.run([sys.executable, "-m", "automem_jax.report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_gcs_workdir(gcs_emulator):
    root = f"{gcs_emulator}/runs/report-test"
    _full_workdir(root)
    _check_full(root, report.build_report(root))


@pytest.mark.parametrize("summary, expected", [
    ({}, None),
    ({"average_progress": "n/a", "environments": {"e": {"t": {"hygiene": None}}}}, None),
])
def test_summary_metrics_tolerates_odd_values(summary, expected):
    m = report.summary_metrics(summary)
    assert m["progression"] is expected and m["redundant_write_rate"] is None


def test_run_health_rates_and_flags(tmp_path):
    """Each evaluation's health rates; those above 5% flagged, with the warning lines."""
    root = str(tmp_path / "run")
    bad = {"steps": 100, "model_turns": 200, "model_errors": 20, "fallback_actions": 10, "context_overflows": 12}
    fine = {"steps": 100, "model_turns": 200, "model_errors": 2, "fallback_actions": 1, "context_overflows": 0}
    clean = {"steps": 100, "model_turns": 250, "model_errors": 0, "fallback_actions": 0, "context_overflows": 0}
    _write(root, "eval/baseline/summary.json", _summary(10.0, 2.0, 0.4, 0.3, 1.5, 800, 0.05, health=bad))
    _write(root, "structures/archive.jsonl", [
        {"id": "v0", "revision": 0, "kind": "baseline", "status": "accepted", "version": 0},
        {"id": "r1-c1", "revision": 1, "kind": "continuation", "status": "rejected",
         "metric": {"average_progress": 8.0, "standard_error": 1.0}},
        {"id": "r1-c2", "revision": 1, "kind": "continuation", "status": "accepted", "version": 1,
         "metric": {"average_progress": 12.0, "standard_error": 1.0}}])
    # r1-c1 was evaluated before health was recorded.
    _write(root, "structures/candidates/r1-c1/eval/summary.json", _summary(8.0, 1.0, 0.3, 0.3, 1.5, 800, 0.05))
    _write(root, "structures/candidates/r1-c2/eval/summary.json",
           _summary(12.0, 1.0, 0.3, 0.3, 1.5, 800, 0.05, health=fine))
    _write(root, "loop2/0/eval/eval_summary.json", _summary(14.0, 1.0, 0.2, 0.3, 1.5, 800, 0.05, health=fine))
    _write(root, "eval/final/summary.json",
           _summary(15.0, 2.0, 0.2, 0.3, 1.5, 800, 0.05, tasks=("A", "B"), health=clean))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "## Run health" in text
    assert "| baseline | 5 | 100 | 200 | 10.0% ⚠ | 10.0% ⚠ | 6.0% ⚠ |" in text
    assert "| L1 r1-c1 | 5 | – | – | – | – | – |" in text
    assert "| L1 r1-c2 | 5 | 100 | 200 | 1.0% | 1.0% | 0.0% |" in text
    assert "| L2 it0 | 5 | 100 | 200 | 1.0% | 1.0% | 0.0% |" in text
    assert "| final | 10 | 200 | 500 | 0.0% | 0.0% | 0.0% |" in text
    assert "_No health counts in: L1 r1-c1 (summaries written before they were recorded)._" in text
    warnings = text.split("⚠ Rates above 5%:\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(warnings) == 3 and all(w.startswith("- baseline: craftax/default: ") for w in warnings)
    assert "context overflows in 6.0% of model turns (12 of 200)" in warnings[0] and "inference.max_len" in text
    # The final comparison carries the rates too.
    assert "| context-overflow rate (per model turn) | 6.0% ⚠ | 0.0% | -6.0 pt (-100%) |" in text
    assert "| fallback-action rate (per step) | 10.0% ⚠ | 0.0% | -10.0 pt (-100%) |" in text
    assert "| model-error rate (per model turn) | 10.0% ⚠ | 0.0% |" in text
