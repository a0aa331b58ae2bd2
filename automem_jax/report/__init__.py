"""Run report: one Markdown page plus PNG plots, built from whatever a workdir already holds.

    python -m automem_jax.report runs/tiny            # writes runs/tiny/report/index.md
    python -m automem_jax.report gs://bucket/runs/crafter

Every input is optional. A run that stopped half-way (or a workdir copied without some folders)
still gets a report: each missing piece becomes one line that names the file it would have read.
All reads and writes go through ``automem_jax.storage`` so local folders and gs:// behave the same.

Inputs (paths relative to the workdir):
  config.json                               run setup (model, collect.policy, critic, judge, bootstrap,
                                            seeds) and stage order; fields it lacks read "not recorded"
  stages/<name>/result.json, DONE           tokens and seconds per stage, finish times; bootstrap's
                                            steps, collect's policy, final_eval's chosen iteration
  eval/baseline/summary.json                the starting structure on the eval seeds
  eval/final/summary.json                   the finished system on the eval seeds
  eval/final_baseline/summary.json          the baseline replayed on final_eval.seeds, when they differ
  eval/baseline_heldout/summary.json        the baseline on eval.heldout_seeds (never used to choose)
  eval/final_heldout/summary.json           the final system on eval.heldout_seeds
  structures/archive.jsonl                  Loop-1 candidates
  structures/candidates/<id>/eval/summary.json
  ledger.jsonl                              Loop-2 iterations
  loop2/<i>/eval/summary.json | eval_summary.json
  bootstrap/train/train_log.jsonl, loop2/<i>/train/train_log.jsonl

The final section leads with progression, baseline → final (mean ± SE, signed change), and puts any
hygiene figure after it. When Loop 2 trained on the scripted teacher's traces (collect.policy=teacher)
a note beside the result says that the redundant-write drop is the teacher's planted habit being
filtered, not evidence for the method.

Run health (model errors, fallback actions, context overflows; see automem_jax.rollout.traces) is
shown for every evaluation found, and a rate above traces.HEALTH_THRESHOLD is flagged with ⚠.

Modules: reading (the workdir reader, config.json lookups), metrics (numbers from summaries),
markdown (how numbers and tables are written), plots (matplotlib PNGs), run_setup, results, loops
and stages (the sections); this module puts the page together.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from automem_jax import storage
from automem_jax.report.loops import hygiene_section, loop1_section, loop2_section, loss_section
from automem_jax.report.markdown import FLAG
from automem_jax.report.metrics import summary_metrics
from automem_jax.report.plots import Plots
from automem_jax.report.reading import Reader
from automem_jax.report.results import final_section, health_section, heldout_section
from automem_jax.report.run_setup import provenance_note, setup_section
from automem_jax.report.stages import stage_section, tokens_section

log = logging.getLogger(__name__)

__all__ = ["build_report", "summary_metrics", "main"]


def build_report(workdir: str, plots: bool | None = None) -> str:
    """Writes ``<workdir>/report/index.md`` (and PNGs next to it); returns the index path.

    ``plots=None`` follows config.json's ``report.plots`` (default on). Missing inputs are
    named in the report, never raised; only a failure to write the report itself raises.
    """
    reader = Reader(workdir)
    config, config_why = reader.json("config.json")
    if plots is None:
        plots = bool(((config or {}).get("report") or {}).get("plots", True))
    pl = Plots(reader, plots)

    base_raw, base_why = reader.eval_summary("eval", "baseline")
    if base_raw is None:
        archive, _ = reader.jsonl("structures", "archive.jsonl")
        start = next((r for r in archive or [] if r.get("kind") == "baseline"), None)
        if start is not None:
            base_raw, _ = reader.candidate_summary(start)
    final_raw, final_why = reader.eval_summary("eval", "final")
    baseline = summary_metrics(base_raw) if base_raw is not None else None
    final = summary_metrics(final_raw) if final_raw is not None else None
    # final_eval on seeds other than eval.seeds plays the baseline again there; compare on the same seeds.
    fb_raw, _ = reader.eval_summary("eval", "final_baseline")
    cmp_raw, cmp_source = (fb_raw, "eval/final_baseline") if fb_raw is not None else (base_raw, "eval/baseline")
    compare = summary_metrics(cmp_raw) if cmp_raw is not None else None

    # Stage results the setup block and the provenance note read (who collected, what was trained).
    results: dict[str, dict] = {}
    for name in ("bootstrap", "collect", "loop2", "final_eval"):
        res, _ = reader.json("stages", name, "result.json")
        if res is not None:
            results[name] = res
    ledger_rows, _ = reader.jsonl("ledger.jsonl")
    try:
        note = provenance_note(config, results, [r for r in ledger_rows or [] if r.get("iteration") is not None])
        lines = setup_section(reader, config, config_why, results) + [""]
    except Exception as e:  # an odd value in config.json must not cost the rest of the report
        log.exception("report: run setup failed")
        note = [f"> {FLAG} Where this run's data came from could not be read ({type(e).__name__}: {e})."]
        lines = ["# AutoMem run report", "", f"- workdir: `{reader.workdir}`", "", "## Run setup", "",
                 f"_Run setup failed: {type(e).__name__}: {e}._", ""]
    ledger: list[dict] = []

    def section(build: Callable[[], list[str]], title: str) -> None:
        # One broken section (an unexpected value in some file) must not cost the rest of the report.
        try:
            lines.extend(build())
        except Exception as e:
            log.exception("report: section %r failed", title)
            lines.extend([f"## {title}", "", f"_Section failed: {type(e).__name__}: {e}._"])
        lines.append("")

    section(lambda: final_section(compare, final, cmp_raw, final_raw, base_why, final_why, cmp_source, note,
                           results.get("final_eval")), "Final system against the baseline")
    section(lambda: heldout_section(reader, config, compare, final, cmp_raw, final_raw, results.get("final_eval")),
            "Held-out seeds")
    section(lambda: loop1_section(reader, pl, baseline), "Loop 1: memory structure revisions")

    def loop2() -> list[str]:
        text, rows = loop2_section(reader, pl, baseline)
        ledger.extend(rows)
        return text

    section(loop2, "Loop 2: memory-proficiency training")
    section(lambda: hygiene_section(reader, pl, baseline, final, ledger), "Memory hygiene")
    section(lambda: health_section(reader, base_raw, final_raw, ledger), "Run health")
    section(lambda: loss_section(reader, pl, ledger), "Training loss")
    stage_results: list[tuple[str, dict]] = []

    def stages() -> list[str]:
        text, results = stage_section(reader, config)
        stage_results.extend(results)
        return text

    section(stages, "Stages")
    section(lambda: tokens_section(pl, stage_results), "Tokens per stage")

    index = reader.path("report", "index.md")
    storage.write_text(index, "\n".join(lines).rstrip() + "\n")
    log.info("report: %s (%d plot(s))", index, len(pl.written))
    return index


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.report",
                                 description="Build report/index.md (+ PNG plots) for a run folder (local or gs://).")
    ap.add_argument("workdir", help="the run folder given to launch.tpu_run --workdir")
    ap.add_argument("--no_plots", action="store_true", help="tables only, no PNGs")
    args = ap.parse_args(argv)
    try:
        if not storage.exists(args.workdir):
            print(f"error: workdir {args.workdir!r} does not exist", file=sys.stderr)
            return 2
        print(build_report(args.workdir, plots=False if args.no_plots else None))
    except Exception as e:  # e.g. no write permission on the bucket
        print(f"error: could not write the report for {args.workdir!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
