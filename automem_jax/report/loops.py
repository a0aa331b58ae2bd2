"""The report's sections on the two loops and training: Loop-1 candidates, Loop-2 iterations,
memory hygiene, training loss (tables and their plots)."""
from __future__ import annotations

from collections.abc import Mapping

from automem_jax.report.markdown import HYGIENE_LABELS, cell, fmt, fmt_pm, missing, table
from automem_jax.report.metrics import HYGIENE_KEYS, RATE_KEYS, num, summary_metrics
from automem_jax.report.plots import Plots
from automem_jax.report.reading import Reader, loop2_iterations


STATUS_COLOURS = {"accepted": "tab:green", "rejected": "tab:red", "invalid": "tab:gray", "error": "tab:gray"}


def loop1_section(reader: Reader, plots: Plots, baseline: dict | None) -> list[str]:
    out = ["## Loop 1: memory structure revisions", ""]
    rows, why = reader.jsonl("structures", "archive.jsonl")
    if rows is None:
        return out + [missing("Loop-1 progression", why)]
    if why:
        out += [f"_{why}._", ""]
    base_m = baseline["progression"] if baseline else None
    base_se = baseline["progression_se"] if baseline else None

    cands = []
    for r in rows:
        if r.get("kind") == "baseline":
            if base_m is None:  # no eval/baseline summary: the archive's record of the start is the baseline
                metric = r.get("metric") if isinstance(r.get("metric"), Mapping) else {}
                base_m, base_se = num(metric.get("average_progress")), num(metric.get("standard_error"))
            continue
        metric = r.get("metric") if isinstance(r.get("metric"), Mapping) else {}
        cands.append({
            "id": r.get("id", "?"), "revision": num(r.get("revision")), "attempt": r.get("attempt"),
            "kind": r.get("kind", ""), "status": str(r.get("status", "?")),
            "version": r.get("version"), "m": num(metric.get("average_progress")),
            "se": num(metric.get("standard_error")),
            "reason": r.get("decision_reason") or "",
            "diff": [str(d) for d in (r.get("diff") or [])] if isinstance(r.get("diff"), list) else
                    [str(r.get("diff"))] if r.get("diff") else [],
        })

    def diff_head(c):
        lines = [d for d in c["diff"] if d.strip()][:2]
        more = len(c["diff"]) - 2
        return "; ".join(lines) + (f" (+{more} more)" if more > 0 else "") if lines else ""

    if base_m is None:
        out += ["_No baseline progression (`eval/baseline/summary.json` or the archive's baseline row); the "
                "best-so-far line starts at the first accepted candidate._", ""]
    table_rows = []
    if base_m is not None:
        table_rows.append(("baseline", "–", "–", "start", fmt_pm(base_m, base_se), "", ""))
    for c in cands:
        rev = "–" if c["revision"] is None else f"{c['revision']:g}"
        table_rows.append((c["id"], rev, c["kind"], c["status"], fmt_pm(c["m"], c["se"]), c["reason"], diff_head(c)))
    out += table(["candidate", "revision", "kind", "status", "progression % ± SE", "reason", "diff (first lines)"],
                 table_rows)

    # Best so far after each revision: the baseline, then every accepted candidate's metric.
    best, best_line = base_m, []
    revisions = sorted({c["revision"] for c in cands if c["revision"] is not None})
    if base_m is not None:
        best_line.append((0.0, base_m))
    for rev in revisions:
        for c in cands:
            if c["revision"] == rev and c["status"] == "accepted" and c["m"] is not None:
                best = c["m"] if best is None else max(best, c["m"])
        if best is not None:
            best_line.append((rev, best))
    accepted = [c for c in cands if c["status"] == "accepted"]
    out += ["", f"{len(cands)} candidate(s), {len(accepted)} accepted"
            + (f"; best progression {best:.2f}%" if best is not None else "") + "."]

    plotted = [c for c in cands if c["m"] is not None and c["revision"] is not None]
    if not plotted and base_m is None:
        return out + ["", "_No evaluated candidate to plot._"]

    def draw(fig):
        ax = fig.subplots()
        if base_m is not None:
            ax.errorbar([0], [base_m], yerr=[base_se or 0], fmt="s", color="tab:blue", capsize=3, label="baseline")
        # Spread the candidates of one revision a little so their error bars do not overlap.
        by_rev: dict[float, list[dict]] = {}
        for c in plotted:
            by_rev.setdefault(c["revision"], []).append(c)
        labelled = set()
        for rev, cs in by_rev.items():
            for j, c in enumerate(cs):
                x = rev + (j - (len(cs) - 1) / 2) * 0.12
                colour = STATUS_COLOURS.get(c["status"], "tab:orange")
                label = c["status"] if c["status"] not in labelled else None
                labelled.add(c["status"])
                ax.errorbar([x], [c["m"]], yerr=[c["se"] or 0], fmt="o", color=colour, capsize=3, label=label)
        if best_line:
            ax.step([p[0] for p in best_line], [p[1] for p in best_line], where="post", color="black",
                    linestyle="--", label="best so far")
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # revisions are whole numbers
        ax.set_xlabel("Loop-1 revision (0 = start structure)")
        ax.set_ylabel("progression (%)")
        ax.set_title("Loop 1: progression per candidate (mean ± SE)")
        ax.legend(fontsize="small")

    return out + ["", plots.save("loop1_progression.png", draw)]


def loop2_section(reader: Reader, plots: Plots, baseline: dict | None) -> tuple[list[str], list[dict]]:
    out = ["## Loop 2: memory-proficiency training", ""]
    rows, why = reader.jsonl("ledger.jsonl")
    if rows is None:
        return out + [missing("Loop-2 progression", why)], []
    if why:
        out += [f"_{why}._", ""]
    rows = sorted(rows, key=lambda r: (num(r.get("iteration")) is None, num(r.get("iteration")) or 0))
    body = []
    if baseline and baseline["progression"] is not None:
        body.append(("base", "–", "–", "–", fmt_pm(baseline["progression"], baseline["progression_se"]), "–"))
    for r in rows:
        train = r.get("train") if isinstance(r.get("train"), Mapping) else {}
        fl, ll = num(train.get("first_loss")), num(train.get("final_loss"))
        n, acc = r.get("n_examples", "–"), r.get("n_accepted")
        body.append((r.get("iteration", "?"), f"{n} of {acc} accepted" if isinstance(acc, int) and acc != n else n,
                     train.get("steps", "–"),
                     f"{fl:.4f} → {ll:.4f}" if fl is not None and ll is not None else "–",
                     fmt_pm(num(r.get("progression_mean")), num(r.get("progression_se"))),
                     _decision_cell(r.get("decision"))))
    out += table(["iteration", "examples", "train steps", "loss first → final", "progression % ± SE", "decision"],
                 body)
    notes = [(r.get("iteration", "?"), r["decision"]) for r in rows if isinstance(r.get("decision"), Mapping)
             and r["decision"].get("by") in ("critic", "fallback")]
    if notes:
        out += ["", "Decisions between iterations (`by`: critic, or the fallback rule when the critic is offline "
                "or its reply was unusable):", ""]
        for it, d in notes:
            line = f"- iteration {it} ({d.get('by')}): {cell(d.get('rationale', ''), 400)}"
            if d.get("invalid_reply"):
                line += f" — critic reply unusable: {cell(d['invalid_reply'], 200)}"
            out.append(line)

    points = []
    if baseline and baseline["progression"] is not None:
        points.append(("base", baseline["progression"], baseline["progression_se"]))
    points += [(str(r.get("iteration", "?")), num(r.get("progression_mean")), num(r.get("progression_se")))
               for r in rows if num(r.get("progression_mean")) is not None]
    if not points:
        return out + ["", "_No evaluated iteration to plot._"], rows

    def draw(fig):
        ax = fig.subplots()
        xs = list(range(len(points)))
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] or 0 for p in points], fmt="o-", capsize=3)
        ax.set_xticks(xs, [p[0] for p in points])
        ax.set_xlabel("Loop-2 iteration")
        ax.set_ylabel("progression (%)")
        ax.set_title("Loop 2: progression per iteration (mean ± SE)")

    return out + ["", plots.save("loop2_progression.png", draw)], rows


def _decision_cell(d) -> str:
    if not isinstance(d, Mapping):
        return "–"
    parts = [str(d.get("by", "?"))]
    if d.get("data") == "reuse":
        parts.append(f"reuse dataset {d.get('dataset_from')}")
    else:
        parts.append(f"new dataset (judge {d.get('judge', '?')}, top {num(d.get('top_pct')) or 0:g}%, "
                     f"seed {d.get('sample_seed')})")
    recipe = d.get("recipe")
    if isinstance(recipe, Mapping):
        parts.append(f"lr ×{num(recipe.get('lr_scale')) or 0:g}, length ×{num(recipe.get('epochs_scale')) or 0:g}, "
                     f"rank {recipe.get('lora_rank')}")
    return "; ".join(parts)


def hygiene_section(reader: Reader, plots: Plots, baseline: dict | None, final: dict | None,
                    ledger: list[dict]) -> list[str]:
    out = ["## Memory hygiene", ""]
    series: list[tuple[str, dict]] = []
    notes = []
    if baseline:
        series.append(("baseline", baseline))
    else:
        notes.append("baseline (`eval/baseline/summary.json` not found)")
    archive, _ = reader.jsonl("structures", "archive.jsonl")
    for r in archive or []:
        if r.get("status") != "accepted" or not r.get("id") or r.get("kind") == "baseline":
            continue
        s, _ = reader.candidate_summary(r)
        label = f"L1 v{r['version']}" if r.get("version") is not None else f"L1 {r['id']}"
        if s is not None:
            series.append((label, summary_metrics(s)))
        else:
            notes.append(f"{label} (`structures/candidates/{r['id']}/eval/summary.json` not found)")
    by_iter = {str(r.get("iteration")): r for r in ledger}
    for it in loop2_iterations(reader, ledger):
        s, _ = reader.eval_summary("loop2", it, "eval")
        if s is not None:
            series.append((f"L2 it{it}", summary_metrics(s)))
        elif isinstance((by_iter.get(it) or {}).get("hygiene"), Mapping):
            series.append((f"L2 it{it}", summary_metrics({"hygiene": by_iter[it]["hygiene"]})))
        else:
            notes.append(f"Loop-2 iteration {it} (no eval summary)")
    if final:
        series.append(("final", final))
    else:
        notes.append("final (`eval/final/summary.json` not found)")
    if notes:
        out += ["_Not available: " + "; ".join(notes) + "._", ""]
    series = [(n, m) for n, m in series if any(m.get(k) is not None for k in HYGIENE_KEYS)]
    if not series:
        return out + [missing("Hygiene table", "no evaluation summary with hygiene metrics")]
    out += table(["evaluation"] + [HYGIENE_LABELS[k] for k in HYGIENE_KEYS],
                 [[n] + [fmt(k, m.get(k)) for k in HYGIENE_KEYS] for n, m in series])

    def draw(fig):
        axes = fig.subplots(2, 2).flat
        labels = [n for n, _ in series]
        for ax, k in zip(axes, HYGIENE_KEYS):
            scale = 100.0 if k in RATE_KEYS else 1.0
            ax.bar(range(len(series)), [(m.get(k) or 0.0) * scale for _, m in series], color="tab:purple")
            ax.set_xticks(range(len(series)), labels, rotation=30, ha="right", fontsize="small")
            ax.set_title(HYGIENE_LABELS[k] + (" (%)" if k in RATE_KEYS else ""), fontsize="medium")

    return out + ["", plots.save("hygiene.png", draw, figsize=(9.0, 6.0))]


def loss_section(reader: Reader, plots: Plots, ledger: list[dict]) -> list[str]:
    out = ["## Training loss", ""]
    curves, absent = [], []
    sources = [("bootstrap", ("bootstrap", "train"))]
    sources += [(f"loop2 it{it}", ("loop2", it, "train")) for it in loop2_iterations(reader, ledger)]
    for label, folder in sources:
        rows, _ = reader.jsonl(*folder, "train_log.jsonl")
        pts = [(num(r.get("step")), num(r.get("loss"))) for r in rows or []]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            tps = [num(r.get("tokens_per_s")) for r in rows]
            tps = [t for t in tps if t is not None]
            mfu = [num(r.get("mfu")) for r in rows]
            mfu = [m for m in mfu if m is not None]
            curves.append((label, pts, sum(tps) / len(tps) if tps else None, sum(mfu) / len(mfu) if mfu else None))
        else:
            absent.append(f"`{'/'.join(folder)}/train_log.jsonl`")
    if not curves:
        return out + [missing("Loss curves", "no training log found (looked for " + ", ".join(absent) + ")")]
    out += table(["run", "steps", "first loss", "final loss", "mean tokens/s", "mean MFU"],
                 [(n, len(p), f"{p[0][1]:.4f}", f"{p[-1][1]:.4f}", f"{t:,.0f}" if t is not None else "–",
                   f"{100 * m:.1f}%" if m is not None else "–") for n, p, t, m in curves])

    def draw(fig):
        ax = fig.subplots()
        for label, pts, _, _ in curves:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.legend(fontsize="small")

    return out + ["", plots.save("train_loss.png", draw)]
