"""automem_jax.report on synthetic run folders: full, partial, empty, and on gs:// (emulator)."""

import json
import subprocess
import sys

import pytest

from automem_jax import report, storage
from automem_jax.report import run_setup
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
                                 "stages": "bootstrap,baseline,loop1,loop2,final_eval,report"})
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
    _write(root, "stages/baseline/result.json", {"tokens_in": 5000, "tokens_out": 900, "seconds": 12.0})
    _write(root, "stages/baseline/DONE", "2026-01-01T00:00:00Z\n")
    _write(root, "stages/loop1/result.json", {"tokens_in": 20000, "tokens_out": 4000, "seconds": 60.0})
    _write(root, "stages/loop1/DONE", "2026-01-01T01:00:00Z\n")


def _check_full(root, index_path):
    assert index_path == storage.join(root, "report", "index.md")
    text = storage.read_text(index_path)
    for heading in ("# AutoMem run report", "## Final system against the baseline", "## Loop 1",
                    "## Loop 2", "## Memory hygiene", "## Training loss", "## Stages", "## Tokens per stage"):
        assert heading in text, heading
    # Final table: the baseline and final numbers and their changes.
    assert "| progression % ± SE | 10.00 ± 2.00 | 22.50 ± 3.00 | +12.50 (+125%) |" in text
    assert "| redundant-write rate | 40.0% | 10.0% | -30.0 pt (-75%) |" in text
    assert "| empty-search rate | 30.0% | 20.0% |" in text
    assert "| invalid-action rate | 5.0% | 2.0% |" in text
    assert "| context tokens / step | 800 | 600 | -200 (-25%) |" in text
    # Headline: progression (mean ± SE, signed change) comes before the hygiene figure.
    assert ("**Result (baseline → final, mean ± SE over 5 baseline / 5 final episodes):** progression rose, "
            "10.00 ± 2.00% → 22.50 ± 3.00% (+12.50 points; the difference's SE is 3.61, so the change is beyond "
            "two SEs); redundant memory writes 40.0% → 10.0% of writes (-30.0 points).") in text
    # This config.json predates collect.policy / loop2.judge / bootstrap: named, not guessed.
    assert "- **collect.policy (Loop-2 training traces)**: not recorded" in text
    assert "- **Loop-2 judge**: not recorded" in text and "- **bootstrap**: not recorded" in text
    assert "- **Loop-1 critic**: `heuristic` (offline, rule-based; no LLM)" in text
    assert "> `collect.policy` not recorded: whether Loop 2 trained on the scripted teacher's traces" in text
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
    """Every task's progression with its signed change, and the headline names a task that fell even
    when the mean rose."""
    root = str(tmp_path / "run")
    tasks = ("Corridor-R3", "Quest-Easy")
    base = _summary(20.0, 5.0, 0.4, 0.3, 1.5, 800, 0.05, tasks)
    final = _summary(40.0, 6.0, 0.2, 0.3, 1.5, 800, 0.05, tasks)
    final["environments"]["craftax"]["Corridor-R3"]["progression_percentage"] = 15.0
    _write(root, "eval/baseline/summary.json", base)
    _write(root, "eval/final/summary.json", final)
    text = storage.read_text(report.build_report(root, plots=False))
    assert ("| task | baseline progression % ± SE | final progression % ± SE | change | redundant-write rate |"
            in text)
    assert "| craftax/Quest-Easy | 20.00 ± 5.00 | 40.00 ± 6.00 | +20.00 | 40.0% → 20.0% |" in text
    assert "| craftax/Corridor-R3 | 20.00 ± 5.00 | 15.00 ± 6.00 | -5.00 | 40.0% → 20.0% |" in text
    assert "progression rose, 20.00 ± 5.00% → 40.00 ± 6.00%" in text
    assert "Progression fell in 1 of 2 tasks: craftax/Corridor-R3." in text


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


TINY_TEACHER_CONFIG = {
    "model": {"preset": "tiny", "checkpoint": "", "dtype": "float32", "param_dtype": "float32"},
    "env": {"name": "craftax", "max_steps": 8}, "eval": {"seeds": "42-49"}, "final_eval": {"seeds": ""},
    "critic": {"kind": "heuristic", "model": "", "base_url": ""},
    "loop1": {"revisions": 1, "accept": "strict"},
    "bootstrap": {"enabled": True, "seeds": "100-115", "max_steps": 24, "redundant_write_rate": 0.7,
                  "useless_read_rate": 0.2, "train": {"mode": "full", "epochs": 6.0, "max_steps": 0}},
    "collect": {"policy": "teacher", "episodes": 48}, "loop2": {"judge": "critic"},
    "stages": "bootstrap,baseline,loop1,collect,loop2,final_eval,export,report",
}


def _final_section(text):
    return text.split("## Final system against the baseline\n\n", 1)[1].split("\n## ", 1)[0]


def test_teacher_demo_says_what_it_is(tmp_path):
    """The tiny demo's shape: Loop 2 trained on the scripted teacher's traces, progression fell while
    redundant writes dropped. The report names the set-up, leads with the progression drop and says
    next to the result that the hygiene drop is the teacher's planted habit being filtered."""
    root = str(tmp_path / "run")
    _write(root, "config.json", TINY_TEACHER_CONFIG)
    _write(root, "eval/baseline/summary.json", _summary(1.14, 0.80, 0.70, 0.30, 2.0, 500, 0.0))
    _write(root, "eval/final/summary.json", _summary(0.0, 0.0, 0.05, 0.30, 1.0, 400, 0.0))
    _write(root, "ledger.jsonl", [{"iteration": 0, "n_examples": 30, "progression_mean": 0.0,
                                   "progression_se": 0.0, "hygiene": {"redundant_write_rate": 0.05}}])
    _write(root, "stages/bootstrap/result.json", {"examples": 300, "train": {"steps": 42, "first_loss": 7.0}})
    _write(root, "stages/collect/result.json", {"policy": "teacher", "episodes": 48})
    _write(root, "stages/final_eval/result.json", {"iteration": 0})
    text = storage.read_text(report.build_report(root, plots=False))

    setup = text.split("## Run setup\n\n", 1)[1].split("\n## ", 1)[0]
    assert setup.splitlines()[:14] == [
        "- **model**: preset `tiny`, random init",
        "- **base policy**: `bootstrap/model`: the model above after the bootstrap fine-tune",
        "- **collect.policy (Loop-2 training traces)**: `teacher`: the scripted teacher "
        "(automem_jax/loops/teacher.py), not the base policy, played the traces Loop 2 mines; 48 episode(s)",
        "- **Loop-1 critic**: `heuristic` (offline, rule-based; no LLM); 1 revision(s), strict acceptance",
        "- **Loop-2 judge**: `heuristic` (offline, rule-based; loop2.judge=critic and critic.kind=heuristic)",
        "- **bootstrap**: on: full fine-tune on the scripted teacher's Craftax traces (seeds 100-115, 24 steps "
        "each; planted redundant-write rate 0.7, useless-read rate 0.2); configured 6 epoch(s); ran 42 step(s) "
        "on 300 example(s)",
        "- **eval seeds**: 42-49",
        "- **final-eval seeds**: same as eval seeds",
        "- **held-out seeds**: not recorded",
        "- **environment**: craftax",
        "- **max steps / episode**: 8",
        "- **dtype / param dtype**: float32 / float32",
        "- **mesh**: not recorded",
        "- **stages**: bootstrap,baseline,loop1,collect,loop2,final_eval,export,report",
    ]
    assert setup.splitlines()[15] == ("⚠ This run is the scripted-teacher demonstration (`collect.policy=teacher`): "
                                      "read the note under the result before any redundant-write figure.")

    final = _final_section(text).splitlines()
    # First the progression drop, with the hygiene figure after it and the trade-off spelled out ...
    assert final[0] == (
        "**Result (baseline → final, mean ± SE over 5 baseline / 5 final episodes):** progression fell, "
        "1.14 ± 0.80% → 0.00 ± 0.00% (-1.14 points; the difference's SE is 0.80, so the change is within two "
        "SEs); redundant memory writes 70.0% → 5.0% of writes (-65.0 points). The cleaner memory came with "
        "less progression.")
    # ... then, before any table, what the redundant-write drop is.
    assert final[1] == ""
    note = final[2]
    assert note.startswith("> ⚠ **Scripted-teacher demonstration: the redundant-write drop is built in.**")
    for phrase in ("traces played by the scripted teacher (`collect.policy=teacher`)",
                   "`bootstrap.redundant_write_rate=0.7`",
                   "selection filters exactly those turns out (the heuristic judge rejects every turn with a "
                   "redundant write)", "the teacher's planted habit being filtered out",
                   "is not evidence that the method works", "only a run with `collect.policy=base` tests the method",
                   "The base policy learned the same habit from the teacher in `bootstrap`"):
        assert phrase in note, phrase
    assert final[4] == ("Final system: Loop-2 iteration 0's specialist with the best Loop-1 structure. "
                        "Baseline: `eval/baseline`.")
    assert "| progression % ± SE | 1.14 ± 0.80 | 0.00 ± 0.00 | -1.14 (-100%) |" in final


def test_teacher_collect_without_a_loop2_iteration(tmp_path):
    """collect.policy=teacher but Loop 2 trained nothing: the note says nothing here measures Loop 2."""
    root = str(tmp_path / "run")
    _write(root, "config.json", TINY_TEACHER_CONFIG)
    _write(root, "eval/baseline/summary.json", _summary(1.0, 0.5, 0.70, 0.30, 2.0, 500, 0.0))
    _write(root, "eval/final/summary.json", _summary(1.0, 0.5, 0.70, 0.30, 2.0, 500, 0.0))
    _write(root, "stages/final_eval/result.json", {"iteration": None})
    final = _final_section(storage.read_text(report.build_report(root, plots=False)))
    assert "progression did not change, 1.00 ± 0.50% → 1.00 ± 0.50% (+0.00 points;" in final
    assert ("> ⚠ **Scripted-teacher demonstration.** `collect.policy=teacher`, but no Loop-2 iteration was trained, "
            "so the final system is the base policy with the best Loop-1 structure; nothing here measures Loop 2."
            in final)
    assert "the redundant-write drop is built in" not in final
    assert "Final system: the base policy with the best Loop-1 structure (no Loop-2 iteration)." in final


def test_base_policy_run_has_no_teacher_note(tmp_path):
    """collect.policy=base with an LLM critic judging Loop 2 and no bootstrap: nothing planted, no note."""
    root = str(tmp_path / "run")
    _write(root, "config.json", {
        "model": {"preset": "qwen2.5-7b", "checkpoint": "gs://b/models/Qwen2.5-7B-Instruct"},
        "eval": {"seeds": "42-51"}, "final_eval": {"seeds": "60-69"},
        "critic": {"kind": "openai", "model": "gpt-x", "base_url": "https://api.example/v1", "use_tools": True},
        "loop1": {"revisions": 5, "accept": "bootstrap"},
        "bootstrap": {"enabled": False}, "collect": {"policy": "base", "episodes": 100},
        "loop2": {"judge": "critic"}})
    _write(root, "eval/baseline/summary.json", _summary(10.0, 2.0, 0.40, 0.30, 1.5, 800, 0.05))
    # final_eval ran on other seeds, so it replayed the baseline there: that is the comparison.
    _write(root, "eval/final_baseline/summary.json", _summary(12.0, 1.0, 0.30, 0.30, 1.5, 800, 0.05))
    _write(root, "eval/final/summary.json", _summary(15.0, 1.0, 0.20, 0.30, 1.5, 800, 0.05))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "- **model**: checkpoint `gs://b/models/Qwen2.5-7B-Instruct`" in text
    assert "- **base policy**: the model above" in text
    assert ("- **collect.policy (Loop-2 training traces)**: `base`: the base policy played the traces Loop 2 "
            "mines (upstream's setting); 100 episode(s)") in text
    assert ("- **Loop-1 critic**: `openai`: model `gpt-x` at `https://api.example/v1`, tool calls on; "
            "5 revision(s), bootstrap acceptance") in text
    assert ("- **Loop-2 judge**: the Loop-1 critic, `openai`: model `gpt-x` at `https://api.example/v1`, "
            "tool calls on") in text
    assert "- **bootstrap**: off (the base policy is the model as loaded)" in text
    assert "- **final-eval seeds**: 60-69" in text
    assert "teacher" not in text.lower()
    final = _final_section(text)
    assert not any(line.startswith(">") for line in final.splitlines())
    assert "progression rose, 12.00 ± 1.00% → 15.00 ± 1.00% (+3.00 points;" in final
    assert "Baseline: `eval/final_baseline`." in final
    assert "Final system: not recorded (no `stages/final_eval/result.json`)." in final


def test_old_config_renders_not_recorded(tmp_path):
    """A config.json written before these fields existed still renders; the collect stage's own record
    of its policy stands in for the config's."""
    root = str(tmp_path / "run")
    _write(root, "config.json", {"model": {"preset": "tiny"}, "eval": {"seeds": "42-45"}})
    _write(root, "eval/baseline/summary.json", _summary(5.0, 1.0, 0.5, 0.3, 1.5, 800, 0.05))
    _write(root, "eval/final/summary.json", _summary(4.0, 1.0, 0.2, 0.3, 1.5, 800, 0.05))
    text = storage.read_text(report.build_report(root, plots=False))
    for field in ("base policy", "collect.policy (Loop-2 training traces)", "Loop-1 critic", "Loop-2 judge",
                  "bootstrap", "final-eval seeds", "environment", "max steps / episode", "mesh", "stages"):
        assert f"- **{field}**: not recorded" in text, field
    assert "- **model**: preset `tiny` (model.checkpoint not recorded)" in text
    assert "- **dtype / param dtype**: not recorded / not recorded" in text
    assert "progression fell, 5.00 ± 1.00% → 4.00 ± 1.00% (-1.00 points;" in text
    assert "> `collect.policy` not recorded: whether Loop 2 trained" in text

    _write(root, "stages/collect/result.json", {"policy": "teacher"})
    _write(root, "ledger.jsonl", [{"iteration": 0}])
    text = storage.read_text(report.build_report(root, plots=False))
    assert ("- **collect.policy (Loop-2 training traces)**: `teacher`: the scripted teacher "
            "(automem_jax/loops/teacher.py), not the base policy, played the traces Loop 2 mines "
            "(from stages/collect/result.json)") in text
    assert "`bootstrap.redundant_write_rate=not recorded`" in text
    assert "filters exactly those turns out (Loop 2's judge rejects such turns)" in text
    assert "is not evidence that the method works" in text


def test_no_config_at_all(tmp_path):
    root = str(tmp_path / "run")
    _write(root, "eval/baseline/summary.json", _summary(5.0, 1.0, 0.5, 0.3, 1.5, 800, 0.05))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "## Run setup\n\n_Run configuration skipped: `config.json` not found._" in text
    assert "- **collect.policy (Loop-2 training traces)**: not recorded" in text


@pytest.mark.parametrize("overrides, expected", [
    # The teacher's traces judged by an LLM critic: the note names that judge's rule.
    ({"critic": {"kind": "openai", "model": "m", "base_url": "http://x/v1"}},
     "selection filters exactly those turns out (the LLM judge is told to reject duplicates of stored lines)"),
    # The base policy played Loop 2's traces, but it learned the planted habit in bootstrap.
    ({"collect": {"policy": "base", "episodes": 48}},
     "> The base policy was warm-started on the scripted teacher (`bootstrap`), which writes redundantly on "
     "purpose (`bootstrap.redundant_write_rate=0.7`): the baseline's redundant writes are that planted habit."),
])
def test_provenance_note_variants(tmp_path, overrides, expected):
    root = str(tmp_path / "run")
    _write(root, "config.json", {**TINY_TEACHER_CONFIG, **overrides})
    _write(root, "eval/baseline/summary.json", _summary(1.0, 0.5, 0.70, 0.30, 2.0, 500, 0.0))
    _write(root, "eval/final/summary.json", _summary(2.0, 0.5, 0.20, 0.30, 2.0, 500, 0.0))
    _write(root, "ledger.jsonl", [{"iteration": 0}])
    final = _final_section(storage.read_text(report.build_report(root, plots=False)))
    assert expected in final
    assert ("the redundant-write drop is built in" in final) == ("collect" not in overrides)


def test_odd_config_values_do_not_break_the_report(tmp_path, monkeypatch):
    root = str(tmp_path / "run")
    _write(root, "config.json", {"collect": "teacher", "bootstrap": {"enabled": True, "train": "x"},
                                 "loop2": {"judge": 3}, "mesh": [1], "model": {"preset": None}})
    _write(root, "eval/baseline/summary.json", _summary(5.0, 1.0, 0.5, 0.3, 1.5, 800, 0.05))
    text = storage.read_text(report.build_report(root, plots=False))
    assert "- **Loop-2 judge**: `3`" in text and "- **mesh**: not recorded" in text
    assert "configured length not recorded" in text
    # Even a failure inside the set-up block leaves the rest of the report.
    monkeypatch.setattr(run_setup, "_bootstrap_desc", lambda *a: 1 / 0)
    text = storage.read_text(report.build_report(root, plots=False))
    assert "_Run setup failed: ZeroDivisionError: division by zero._" in text
    assert "## Final system against the baseline" in text and "## Stages" in text


def test_heldout_seeds_are_reported_beside_the_choosing_seeds(tmp_path):
    root = str(tmp_path / "run")
    _full_workdir(root)
    cfg = json.loads(storage.read_text(storage.join(root, "config.json")))
    cfg["eval"] = {"seeds": "42-45", "heldout_seeds": "52-55"}
    cfg["final_eval"] = {"seeds": ""}
    _write(root, "config.json", cfg)
    _write(root, "stages/final_eval/result.json", {"iteration": 1, "chosen_on": "eval.seeds"})
    _write(root, "eval/baseline_heldout/summary.json", _summary(11.0, 1.0, 0.40, 0.30, 1.5, 800, 0.05))
    _write(root, "eval/final_heldout/summary.json", _summary(10.0, 1.5, 0.12, 0.20, 1.2, 600, 0.02))
    ledger = [json.loads(x) for x in storage.read_text(storage.join(root, "ledger.jsonl")).splitlines()]
    ledger[0]["decision"] = {"by": "initial", "data": "regenerate", "judge": "default", "top_pct": 100,
                             "sample_seed": 0, "recipe": {"lr_scale": 1.0, "epochs_scale": 1.0, "lora_rank": 16}}
    ledger[0]["n_accepted"] = 300
    ledger[1]["decision"] = {"by": "fallback", "data": "reuse", "dataset_from": 0, "judge": "default",
                             "top_pct": 100, "sample_seed": 0,
                             "recipe": {"lr_scale": 0.5, "epochs_scale": 1.0, "lora_rank": 16},
                             "rationale": "progression held or rose: try the next recipe",
                             "invalid_reply": "not a JSON object"}
    _write(root, "ledger.jsonl", ledger)
    text = storage.read_text(report.build_report(root, plots=False))
    assert "- **held-out seeds**: 52-55 (reported only: nothing is chosen on them)" in text
    section = text[text.index("## Held-out seeds"):text.index("## Loop 1")]
    assert "**Chosen on:** the eval seeds (42-45)" in section and "Loop-2 iteration 1" in section
    assert "| eval | chose the system | 42-45 | 5 / 5 | 10.00 ± 2.00 | 22.50 ± 3.00 | +12.50 (+125%) |" in section
    assert ("| held-out | held out: reported only | 52-55 | 5 / 5 | 11.00 ± 1.00 | 10.00 ± 1.50 | -1.00 (-9%) |"
            in section)
    assert "changed by -1.00 points (on the seeds that chose the system: +12.50)" in section
    assert "did not carry over to the held-out seeds" in section
    # Loop 2 shows each iteration's decision and why it was taken
    assert "| 0 | 120 of 300 accepted |" in text
    assert "fallback; reuse dataset 0; lr ×0.5, length ×1, rank 16" in text
    assert "- iteration 1 (fallback): progression held or rose" in text and "unusable: not a JSON object" in text


def test_heldout_section_without_heldout_seeds(tmp_path):
    root = str(tmp_path / "run")
    _full_workdir(root)
    text = storage.read_text(report.build_report(root, plots=False))
    assert "_No held-out seeds in this run (`eval.heldout_seeds` unset)" in text
