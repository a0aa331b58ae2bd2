"""The report's result sections: the final system against the baseline (progression first, then
hygiene), the held-out seeds, and run health (model errors, fallbacks, context overflows)."""
from __future__ import annotations

import math
from collections.abc import Mapping

from automem_jax.report.markdown import FLAG, HYGIENE_LABELS, cell, fmt, fmt_change, fmt_pm, missing, pct_pm, table
from automem_jax.report.metrics import (HEALTH_KEYS, HYGIENE_KEYS, health_of, num, per_task, per_task_redundant,
                                        summary_metrics)
from automem_jax.report.reading import NOT_RECORDED, Reader, setting, loop2_iterations, recorded
from automem_jax.rollout.traces import HEALTH_THRESHOLD, health_warnings


def _headline(baseline: dict, final: dict, base_raw: Mapping, final_raw: Mapping) -> list[str]:
    """Progression baseline → final first (mean ± SE, signed change), hygiene after it: a cleaner
    memory is never reported on its own when the agent progressed less."""
    nb, nf = num(base_raw.get("episodes")), num(final_raw.get("episodes"))
    over = f" over {nb:.0f} baseline / {nf:.0f} final episodes" if nb is not None and nf is not None else ""
    bp, bse = baseline["progression"], baseline["progression_se"]
    fp, fse = final["progression"], final["progression_se"]
    text = f"**Result (baseline → final, mean ± SE{over}):** "
    d = None
    if bp is None or fp is None:
        which = " and ".join(n for n, v in (("baseline", bp), ("final", fp)) if v is None)
        text += f"progression {NOT_RECORDED} in the {which} summary, so no claim on progression can be made"
    else:
        d = fp - bp
        verb = "rose" if d > 0 else "fell" if d < 0 else "did not change"
        text += f"progression {verb}, {pct_pm(bp, bse)} → {pct_pm(fp, fse)} ({d:+.2f} points"
        if bse is not None and fse is not None and (bse or fse):
            se_d = math.hypot(bse, fse)  # seeds treated as independent: the wider, cautious error
            text += (f"; the difference's SE is {se_d:.2f}, so the change is "
                     f"{'within' if abs(d) <= 2 * se_d else 'beyond'} two SEs")
        text += ")"
    b, f = baseline.get("redundant_write_rate"), final.get("redundant_write_rate")
    if b is not None and f is not None:
        text += f"; redundant memory writes {100 * b:.1f}% → {100 * f:.1f}% of writes ({100 * (f - b):+.1f} points)."
        if d is not None and d < 0 and f < b:
            text += " The cleaner memory came with less progression."
    else:
        text += f"; redundant-write rate {NOT_RECORDED} in one of the two summaries."
    # Several tasks: a mean can hide a task that got worse.
    tasks = per_task(base_raw), per_task(final_raw)
    names = sorted(set(tasks[0]) & set(tasks[1]))
    fell = [n for n in names if None not in (tasks[0][n][0], tasks[1][n][0]) and tasks[1][n][0] < tasks[0][n][0]]
    if len(names) > 1 and fell:
        text += (f" Progression fell in {len(fell)} of {len(names)} tasks: " + ", ".join(fell[:6])
                 + (", …" if len(fell) > 6 else "") + ".")
    return [text]


def final_section(baseline: dict | None, final: dict | None, base_raw: dict | None, final_raw: dict | None,
                  base_why: str, final_why: str, base_source: str, note: list[str],
                  final_result: Mapping | None) -> list[str]:
    out = ["## Final system against the baseline", ""]
    if baseline is None or final is None:
        why = "; ".join(w for w in (base_why if baseline is None else "", final_why if final is None else "") if w)
        return out + [missing("Final comparison", why)] + ([""] + note if note else [])
    out += _headline(baseline, final, base_raw or {}, final_raw or {})
    if note:
        out += [""] + note
    if final_result is None:
        system = f"{NOT_RECORDED} (no `stages/final_eval/result.json`)"
    elif final_result.get("iteration") is None:
        system = "the base policy with the best Loop-1 structure (no Loop-2 iteration)"
    else:
        system = f"Loop-2 iteration {final_result['iteration']}'s specialist with the best Loop-1 structure"
    out += ["", f"Final system: {system}. Baseline: `{base_source}`.", ""]
    keys = ["progression"] + list(HYGIENE_KEYS) + ["invalid_action_rate"] + list(HEALTH_KEYS)
    rows = [("progression % ± SE", fmt_pm(baseline["progression"], baseline["progression_se"]),
             fmt_pm(final["progression"], final["progression_se"]),
             fmt_change("progression", baseline["progression"], final["progression"]))]
    rows += [(HYGIENE_LABELS[k], fmt(k, baseline.get(k)), fmt(k, final.get(k)),
              fmt_change(k, baseline.get(k), final.get(k))) for k in keys[1:]]
    out += table(["metric", "baseline", "final", "change"], rows)
    # Per-task rows matter for MiniHack (8 tasks); one task adds nothing to the table above.
    tasks = per_task(base_raw or {}), per_task(final_raw or {})
    names = sorted(set(tasks[0]) | set(tasks[1]))
    if len(names) > 1:
        def change(n):
            b, f = tasks[0].get(n, (None,))[0], tasks[1].get(n, (None,))[0]
            return f"{f - b:+.2f}" if b is not None and f is not None else "–"

        red = per_task_redundant(base_raw or {}), per_task_redundant(final_raw or {})

        def redundant(n):
            b, f = red[0].get(n), red[1].get(n)
            return f"{fmt('redundant_write_rate', b)} → {fmt('redundant_write_rate', f)}"

        out += ["", "Per task (progression first; its change in points):", ""]
        out += table(["task", "baseline progression % ± SE", "final progression % ± SE", "change",
                      "redundant-write rate"],
                     [(n, fmt_pm(*tasks[0].get(n, (None, None))), fmt_pm(*tasks[1].get(n, (None, None))),
                       change(n), redundant(n)) for n in names])
    return out


def heldout_section(reader: Reader, config: Mapping | None, compare: dict | None, final: dict | None,
                    cmp_raw: dict | None, final_raw: dict | None, final_result: Mapping | None) -> list[str]:
    """Baseline -> final on the seeds that chose the system and on the held-out seeds, side by side."""
    out = ["## Held-out seeds", ""]
    held = setting(config, "eval.heldout_seeds")
    bh_raw, bh_why = reader.eval_summary("eval", "baseline_heldout")
    fh_raw, fh_why = reader.eval_summary("eval", "final_heldout")
    if not held and bh_raw is None and fh_raw is None:
        return out + ["_No held-out seeds in this run (`eval.heldout_seeds` unset): the final result above was "
                      "measured on the same seeds that chose the system._"]
    chose = recorded(setting(config, "eval.seeds"))
    fe = setting(config, "final_eval.seeds")
    it = (final_result or {}).get("iteration")
    system = (f"Loop-2 iteration {it}, the best iteration on them" if it is not None
              else "the base policy with the best Loop-1 structure (no Loop-2 iteration)")
    out += [f"**Chosen on:** the eval seeds ({chose}). Loop 1 kept structures and Loop 2 picked the final system "
            f"({system}) by their results there, so the eval-seed figures favour the final system. "
            f"**Held out:** seeds {recorded(held)}, never used to choose anything; the baseline and the final system "
            "were played on them only to be reported here.", ""]
    bh = summary_metrics(bh_raw) if bh_raw is not None else None
    fh = summary_metrics(fh_raw) if fh_raw is not None else None

    def line(name, role, seeds, b, f, braw, fraw):
        eps = f"{recorded((braw or {}).get('episodes'))} / {recorded((fraw or {}).get('episodes'))}"
        bp, fp = (b or {}).get("progression"), (f or {}).get("progression")
        return (name, role, seeds, eps, fmt_pm(bp, (b or {}).get("progression_se")),
                fmt_pm(fp, (f or {}).get("progression_se")), fmt_change("progression", bp, fp),
                f"{fmt('redundant_write_rate', (b or {}).get('redundant_write_rate'))} → "
                f"{fmt('redundant_write_rate', (f or {}).get('redundant_write_rate'))}")

    rows = [line("eval" if not fe else "final-eval",
                 "chose the system" if not fe else "reported (system chosen on eval)",
                 recorded(fe or chose), compare, final, cmp_raw, final_raw),
            line("held-out", "held out: reported only", recorded(held), bh, fh, bh_raw, fh_raw)]
    out += table(["seed set", "role", "seeds", "episodes (baseline / final)", "baseline progression % ± SE",
                  "final progression % ± SE", "change", "redundant-write rate"], rows)
    if bh is None or fh is None:
        why = "; ".join(w for w in (bh_why if bh is None else "", fh_why if fh is None else "") if w)
        return out + ["", missing("Held-out comparison", why)]
    d_eval = (None if compare is None or final is None or None in (compare["progression"], final["progression"])
              else final["progression"] - compare["progression"])
    if None in (bh["progression"], fh["progression"]):
        return out
    d_held = fh["progression"] - bh["progression"]
    text = f"On the held-out seeds progression changed by {d_held:+.2f} points"
    if d_eval is not None:
        text += f" (on the seeds that chose the system: {d_eval:+.2f})"
        if d_eval > 0 >= d_held:
            text += f". {FLAG} The gain on the choosing seeds did not carry over to the held-out seeds"
    return out + ["", text + "."]


def health_section(reader: Reader, base_raw: dict | None, final_raw: dict | None, ledger: list[dict]) -> list[str]:
    """Health rates of every evaluation found (baseline, each Loop-1 candidate, each Loop-2
    iteration, final), with the warnings of those above the threshold."""
    out = ["## Run health", "",
           "Steps lost to failures rather than to the policy: model errors and context overflows per model "
           "turn, fallback actions (the structure's fallback played because the model committed no action) "
           f"per env step. {FLAG} marks a rate above {100 * HEALTH_THRESHOLD:.0f}%.", ""]
    evals: list[tuple[str, dict]] = []
    if base_raw is not None:
        evals.append(("baseline", base_raw))
    archive, _ = reader.jsonl("structures", "archive.jsonl")
    for r in archive or []:
        if r.get("kind") == "baseline" or not r.get("id"):
            continue
        s, _ = reader.candidate_summary(r)
        if isinstance(s, dict):
            evals.append((f"L1 {r['id']}", s))
    for it in loop2_iterations(reader, ledger):
        s, _ = reader.eval_summary("loop2", it, "eval")
        if s is not None:
            evals.append((f"L2 it{it}", s))
    if final_raw is not None:
        evals.append(("final", final_raw))
    if not evals:
        return out + [missing("Health table", "no evaluation summary found")]
    rows, unrecorded, warnings = [], [], []
    for name, s in evals:
        h = health_of(s)
        if h is None:
            unrecorded.append(name)
            rows.append([name, s.get("episodes", "–"), "–", "–"] + ["–"] * len(HEALTH_KEYS))
            continue
        rows.append([name, s.get("episodes", "–"), h.get("steps", "–"), h.get("model_turns", "–")]
                    + [fmt(k, num(h.get(k))) for k in HEALTH_KEYS])
        warnings += health_warnings(s, label=name)
    out += table(["evaluation", "episodes", "steps", "model turns"] + [HYGIENE_LABELS[k] for k in HEALTH_KEYS],
                 rows)
    if unrecorded:
        out += ["", f"_No health counts in: {', '.join(unrecorded)} (summaries written before they were recorded)._"]
    if warnings:
        out += ["", f"{FLAG} Rates above {100 * HEALTH_THRESHOLD:.0f}%:", ""] + [f"- {cell(w, 600)}" for w in warnings]
    return out
