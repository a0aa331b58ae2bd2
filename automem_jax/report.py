"""Run report: one Markdown page plus PNG plots, built from whatever a workdir already holds.

    python -m automem_jax.report runs/tiny            # writes runs/tiny/report/index.md
    python -m automem_jax.report gs://bucket/runs/crafter

Every input is optional. A run that stopped half-way (or a workdir copied without some folders)
still gets a report: each missing piece becomes one line that names the file it would have read.
All reads and writes go through ``automem_jax.storage`` so local folders and gs:// behave the same.

Inputs (paths relative to the workdir):
  config.json                               run setup (model, collect.policy, critic, judge, bootstrap,
                                            seeds) and phase order; fields it lacks read "not recorded"
  phases/<name>/result.json, DONE           tokens and seconds per phase, finish times; bootstrap's
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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence

from automem_jax import storage
from automem_jax.rollout.traces import HEALTH_THRESHOLD, health_warnings

log = logging.getLogger(__name__)

__all__ = ["build_report", "summary_metrics", "main"]

HYGIENE_KEYS = ("redundant_write_rate", "empty_search_rate", "ops_per_step", "context_tokens_per_step")
HYGIENE_LABELS = {
    "redundant_write_rate": "redundant-write rate",
    "empty_search_rate": "empty-search rate",
    "ops_per_step": "memory ops / step",
    "context_tokens_per_step": "context tokens / step",
    "invalid_action_rate": "invalid-action rate",
    "model_error_rate": "model-error rate (per model turn)",
    "fallback_rate": "fallback-action rate (per step)",
    "context_overflow_rate": "context-overflow rate (per model turn)",
}
HEALTH_KEYS = ("model_error_rate", "fallback_rate", "context_overflow_rate")
FLAG = "⚠"
# Rates are fractions in the summaries; the report shows them as percentages.
RATE_KEYS = {"redundant_write_rate", "empty_search_rate", "invalid_action_rate", *HEALTH_KEYS}
STATUS_COLOURS = {"accepted": "tab:green", "rejected": "tab:red", "invalid": "tab:gray", "error": "tab:gray"}


# --------------------------------------------------------------------------------------------
# Reading (never raises for a missing or malformed file: returns None and a reason)
# --------------------------------------------------------------------------------------------


class _Reader:
    """Reads workdir files, remembering which ones were missing or unreadable for the report."""

    def __init__(self, workdir: str):
        self.workdir = str(workdir)

    def path(self, *parts: str) -> str:
        return storage.join(self.workdir, *parts)

    def text(self, *parts: str) -> tuple[str | None, str]:
        p = self.path(*parts)
        try:
            return storage.read_text(p), ""
        except FileNotFoundError:
            return None, f"`{'/'.join(parts)}` not found"
        except Exception as e:  # a permission or network error must not stop the report
            return None, f"`{'/'.join(parts)}` unreadable ({type(e).__name__}: {e})"

    def json(self, *parts: str) -> tuple[dict | None, str]:
        text, why = self.text(*parts)
        if text is None:
            return None, why
        try:
            value = json.loads(text)
        except ValueError as e:
            return None, f"`{'/'.join(parts)}` is not valid JSON ({e})"
        if not isinstance(value, dict):
            return None, f"`{'/'.join(parts)}` holds a {type(value).__name__}, expected an object"
        return value, ""

    def jsonl(self, *parts: str) -> tuple[list[dict] | None, str]:
        """Rows of a JSONL file; malformed lines (e.g. a torn last line) are skipped and counted."""
        text, why = self.text(*parts)
        if text is None:
            return None, why
        rows, bad = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
        return rows, (f"{bad} malformed line(s) skipped in `{'/'.join(parts)}`" if bad else "")

    def listdir(self, *parts: str) -> list[str]:
        try:
            return storage.listdir(self.path(*parts))
        except Exception as e:
            log.warning("report: cannot list %s: %s", self.path(*parts), e)
            return []

    def candidate_summary(self, row: Mapping) -> tuple[dict | None, str]:
        """A Loop-1 candidate's eval summary: the archive's run_dir, else structures/candidates/<id>/eval.

        The recorded run_dir is an absolute path, which breaks when a workdir is copied (gs:// to a
        laptop), so the folder relative to this workdir is the fallback.
        """
        run_dir = row.get("run_dir")
        if isinstance(run_dir, str) and run_dir:
            try:
                return json.loads(storage.read_text(storage.join(run_dir, "summary.json"))), ""
            except Exception:
                pass
        return self.eval_summary("structures", "candidates", str(row.get("id")), "eval")

    def eval_summary(self, *parts: str) -> tuple[dict | None, str]:
        """A Runner summary in folder `parts`: summary.json, else Loop 2's eval_summary.json."""
        s, why = self.json(*parts, "summary.json")
        if s is None:
            s2, _ = self.json(*parts, "eval_summary.json")
            if s2 is not None:
                return s2, ""
        return s, why


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _num(x) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, a string)."""
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summary_metrics(summary: Mapping) -> dict[str, float | None]:
    """Headline numbers of a Runner summary.json: progression (%) ± SE (%), hygiene, invalid actions,
    health rates (None where the summary recorded no health counts).

    Rates are pooled over env steps across tasks (a task with more steps weighs more), the way the
    summary itself pools them across episodes. A summary that already carries a flat ``hygiene``
    mapping (a Loop-2 ledger style entry) is used as is.
    """
    out: dict[str, float | None] = {
        "progression": _num(summary.get("average_progress")),
        "progression_se": _num(summary.get("standard_error")),
    }
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for tasks in (summary.get("environments") or {}).values():
        if not isinstance(tasks, Mapping):
            continue
        for t in tasks.values():
            if not isinstance(t, Mapping):
                continue
            w = _num(t.get("steps")) or 1.0
            values = dict(t.get("hygiene") or {})
            values["invalid_action_rate"] = t.get("invalid_action_rate")
            for k in HYGIENE_KEYS + ("invalid_action_rate",):
                v = _num(values.get(k))
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + w * v
                    weights[k] = weights.get(k, 0.0) + w
    flat = summary.get("hygiene") if isinstance(summary.get("hygiene"), Mapping) else {}
    for k in HYGIENE_KEYS + ("invalid_action_rate",):
        if k in weights and weights[k] > 0:
            out[k] = sums[k] / weights[k]
        else:
            out[k] = _num(flat.get(k)) if flat else None
    health = _health_of(summary) or {}
    for k in HEALTH_KEYS:
        out[k] = _num(health.get(k))
    return out


def _health_of(summary: Mapping) -> Mapping | None:
    """The summary's overall ``health`` entry; None for a summary written before it existed."""
    h = summary.get("health")
    return h if isinstance(h, Mapping) and _num(h.get("steps")) else None


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    if key in HEALTH_KEYS and v > HEALTH_THRESHOLD:
        return f"{100 * v:.1f}% {FLAG}"
    if key in RATE_KEYS:
        return f"{100 * v:.1f}%"
    if key == "context_tokens_per_step":
        return f"{v:.0f}"
    return f"{v:.2f}"


def _fmt_pm(m: float | None, se: float | None) -> str:
    if m is None:
        return "–"
    return f"{m:.2f} ± {se:.2f}" if se is not None else f"{m:.2f}"


def _fmt_change(key: str, before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "–"
    d = after - before
    if key in RATE_KEYS:
        text = f"{100 * d:+.1f} pt"
    elif key == "context_tokens_per_step":
        text = f"{d:+.0f}"
    else:
        text = f"{d:+.2f}"
    if before != 0:
        text += f" ({100 * d / abs(before):+.0f}%)"
    return text


def _cell(x, limit: int = 120) -> str:
    """Table-safe text: one line, no pipes, bounded length."""
    s = " ".join(str(x if x is not None else "").split())
    s = s.replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _missing(what: str, why: str) -> str:
    return f"_{what} skipped: {why}._"


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, safe in any process)
# --------------------------------------------------------------------------------------------


class _Plots:
    def __init__(self, reader: _Reader, enabled: bool):
        self.reader = reader
        self.enabled = enabled
        self.written: list[str] = []
        self.problem = ""
        if enabled:
            try:
                import matplotlib  # noqa: F401
            except ImportError as e:
                self.enabled, self.problem = False, f"matplotlib is not installed ({e})"
        else:
            self.problem = "plots are off (config report.plots = False)"

    def save(self, name: str, draw: Callable, figsize=(7.0, 4.0)) -> str:
        """Draws into a new figure, writes report/<name>; returns a Markdown image line or a note."""
        if not self.enabled:
            return f"_(plot `{name}` not drawn: {self.problem})_"
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        try:
            fig = Figure(figsize=figsize, dpi=100)
            FigureCanvasAgg(fig)
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            storage.write_bytes(self.reader.path("report", name), buf.getvalue())
        except Exception as e:  # a plot is decoration: its failure is reported, not raised
            log.warning("report: plot %s failed: %s", name, e)
            return f"_(plot `{name}` failed: {type(e).__name__}: {e})_"
        self.written.append(name)
        return f"![{name}]({name})"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _phase_names(reader: _Reader, config: Mapping | None) -> list[str]:
    """Phase order from config.json's comma-separated `phases`, then any other phase folders found."""
    listed = []
    if config and isinstance(config.get("phases"), str):
        listed = [p.strip() for p in config["phases"].split(",") if p.strip()]
    found = reader.listdir("phases")
    return listed + [p for p in found if p not in listed]


NOT_RECORDED = "not recorded"


def _cfg(config: Mapping | None, dotted: str):
    """config.json's value at a dotted path; None when any level is absent (workdirs from older code)."""
    v = config
    for k in dotted.split("."):
        if not isinstance(v, Mapping) or k not in v:
            return None
        v = v[k]
    return v


def _rec(v) -> str:
    return NOT_RECORDED if v is None or v == "" else str(v)


def _collect_policy(config: Mapping | None, results: Mapping[str, dict]) -> tuple[str | None, str]:
    """Who played Loop 2's training traces, and where that was read: config.json, else the collect
    phase's result (it records the policy it ran with)."""
    p = _cfg(config, "collect.policy")
    if p:
        return str(p), ""
    p = (results.get("collect") or {}).get("policy")
    return (str(p), "phases/collect/result.json") if p else (None, "")


def _critic_desc(config: Mapping | None) -> str:
    kind = _cfg(config, "critic.kind")
    if kind is None:
        return NOT_RECORDED
    if kind == "heuristic":
        return "`heuristic` (offline, rule-based; no LLM)"
    tools = _cfg(config, "critic.use_tools")
    return (f"`{kind}`: model `{_rec(_cfg(config, 'critic.model'))}` at `{_rec(_cfg(config, 'critic.base_url'))}`"
            + ("" if tools is None else f", tool calls {'on' if tools else 'off (trace digest)'}"))


def _judge_desc(config: Mapping | None) -> str:
    """The judge Loop 2 really used: launch.phases._judge takes the heuristic critic when either
    loop2.judge or critic.kind says heuristic, so the config's loop2.judge alone can mislead."""
    judge, kind = _cfg(config, "loop2.judge"), _cfg(config, "critic.kind")
    if judge is None:
        return NOT_RECORDED
    if judge == "heuristic":
        return "`heuristic` (offline, rule-based; no LLM)"
    if judge == "critic" and kind == "heuristic":
        return "`heuristic` (offline, rule-based; loop2.judge=critic and critic.kind=heuristic)"
    if judge == "critic":
        return "the Loop-1 critic, " + _critic_desc(config)
    return f"`{judge}`"


def _bootstrap_desc(config: Mapping | None, result: Mapping | None) -> str:
    enabled = _cfg(config, "bootstrap.enabled")
    if enabled is None:
        return NOT_RECORDED
    if not enabled:
        return "off (the base policy is the model as loaded)"
    rw, ur = _cfg(config, "bootstrap.redundant_write_rate"), _cfg(config, "bootstrap.useless_read_rate")
    mode = _cfg(config, "bootstrap.train.mode")
    max_steps, epochs = _cfg(config, "bootstrap.train.max_steps"), _cfg(config, "bootstrap.train.epochs")
    if _num(max_steps):
        length = f"max_steps {_num(max_steps):g}"
    elif _num(epochs) is not None:
        length = f"{_num(epochs):g} epoch(s)"
    else:
        length = f"length {NOT_RECORDED}"
    text = (f"on: {_rec(mode)} fine-tune on the scripted teacher's Craftax traces (seeds "
            f"{_rec(_cfg(config, 'bootstrap.seeds'))}, {_rec(_cfg(config, 'bootstrap.max_steps'))} steps each; "
            f"planted redundant-write rate {_rec(rw)}, useless-read rate {_rec(ur)}); configured {length}")
    train = (result or {}).get("train") if isinstance((result or {}).get("train"), Mapping) else {}
    steps, examples = _num(train.get("steps")), _num((result or {}).get("examples"))
    if steps is not None:
        text += f"; ran {steps:.0f} step(s)" + (f" on {examples:.0f} example(s)" if examples is not None else "")
    else:
        text += f"; steps run: {NOT_RECORDED}"
    return text


def _header(reader: _Reader, config: Mapping | None, config_why: str, results: Mapping[str, dict]) -> list[str]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = ["# AutoMem run report", "", f"- workdir: `{reader.workdir}`", f"- generated: {now}", "", "## Run setup", ""]
    if config is None:
        out += [_missing("Run configuration", config_why), ""]
    policy, policy_src = _collect_policy(config, results)
    ckpt, preset = _cfg(config, "model.checkpoint"), _cfg(config, "model.preset")
    if ckpt:
        model = f"checkpoint `{ckpt}`"
    elif preset:
        model = (f"preset `{preset}`, random init" if ckpt == ""
                 else f"preset `{preset}` (model.checkpoint {NOT_RECORDED})")
    else:
        model = NOT_RECORDED
    enabled = _cfg(config, "bootstrap.enabled")
    base = (NOT_RECORDED if enabled is None else
            "`bootstrap/model`: the model above after the bootstrap fine-tune" if enabled else "the model above")
    if policy == "teacher":
        collect = ("`teacher`: the scripted teacher (automem_jax/loops/teacher.py), not the base policy, played "
                   "the traces Loop 2 mines")
    elif policy == "base":
        collect = "`base`: the base policy played the traces Loop 2 mines (upstream's setting)"
    else:
        collect = f"`{policy}`" if policy else NOT_RECORDED
    if policy_src:
        collect += f" (from {policy_src})"
    episodes = _cfg(config, "collect.episodes")
    if policy and episodes is not None:
        collect += f"; {episodes} episode(s)"
    critic = _critic_desc(config)
    revisions, accept = _cfg(config, "loop1.revisions"), _cfg(config, "loop1.accept")
    if critic != NOT_RECORDED and (revisions is not None or accept is not None):
        critic += f"; {_rec(revisions)} revision(s), {_rec(accept)} acceptance"
    final_seeds = _cfg(config, "final_eval.seeds")
    mesh = _cfg(config, "mesh") if isinstance(_cfg(config, "mesh"), Mapping) else {}
    rows = [
        ("model", model),
        ("base policy", base),
        ("collect.policy (Loop-2 training traces)", collect),
        ("Loop-1 critic", critic),
        ("Loop-2 judge", _judge_desc(config)),
        ("bootstrap", _bootstrap_desc(config, results.get("bootstrap"))),
        ("eval seeds", _rec(_cfg(config, "eval.seeds"))),
        ("final-eval seeds", "same as eval seeds" if final_seeds == "" else _rec(final_seeds)),
        ("held-out seeds", _heldout_desc(config)),
        ("environment", _rec(_cfg(config, "env.name"))),
        ("max steps / episode", _rec(_cfg(config, "env.max_steps"))),
        ("dtype / param dtype", f"{_rec(_cfg(config, 'model.dtype'))} / {_rec(_cfg(config, 'model.param_dtype'))}"),
        ("mesh", ", ".join(f"{k}={mesh[k]}" for k in ("data", "fsdp", "tensor") if k in mesh) or NOT_RECORDED),
        ("phases", _rec(_cfg(config, "phases"))),
    ]
    out += [f"- **{k}**: {v}" for k, v in rows]
    if policy == "teacher":
        out += ["", f"{FLAG} This run is the scripted-teacher demonstration (`collect.policy=teacher`): read the "
                "note under the result before any redundant-write figure."]
    return out


def _heldout_desc(config: Mapping | None) -> str:
    held = _cfg(config, "eval.heldout_seeds")
    if held is None:
        return NOT_RECORDED
    if held == "":
        return "none (`eval.heldout_seeds` unset)"
    return f"{held} (reported only: nothing is chosen on them)"


def _phase_times(reader: _Reader, config: Mapping | None) -> tuple[list[str], list[tuple[str, dict]]]:
    """Per-phase finish time (DONE holds a timestamp) and result.json; returns lines and results."""
    names = _phase_names(reader, config)
    results, rows = [], []
    for name in names:
        res, _ = reader.json("phases", name, "result.json")
        done, _ = reader.text("phases", name, "DONE")
        if res is None and done is None:
            rows.append((name, "not run", "–", "–"))
            continue
        results.append((name, res or {}))
        seconds = _num((res or {}).get("seconds"))
        rows.append((name, "done" if done is not None else "started",
                     (done or "").strip() or (res or {}).get("finished", "–"),
                     f"{seconds:.0f}" if seconds is not None else "–"))
    if not names:
        return ["## Phases", "", _missing("Phase list", "no `phases/` folder and no `phases` in config.json")], []
    return ["## Phases", ""] + _table(["phase", "state", "finished (UTC)", "seconds"], rows), results


def _tokens(plots: _Plots, results: list[tuple[str, dict]]) -> list[str]:
    out = ["## Tokens per phase", ""]
    rows = [(n, _num(r.get("tokens_in")), _num(r.get("tokens_out")), _num(r.get("seconds"))) for n, r in results]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return out + [_missing("Token counts", "no `phases/<name>/result.json` carries `tokens_in` / `tokens_out`")]
    out += _table(["phase", "tokens in", "tokens out", "seconds"],
                  [(n, f"{ti or 0:,.0f}", f"{to or 0:,.0f}", f"{s:.0f}" if s is not None else "–")
                   for n, ti, to, s in rows])

    def draw(fig):
        ax = fig.subplots()
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] or 0 for r in rows], width=0.4, label="tokens in")
        ax.bar([x + 0.2 for x in xs], [r[2] or 0 for r in rows], width=0.4, label="tokens out")
        ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("tokens")
        ax.set_title("Tokens per phase")
        ax.legend()

    return out + ["", plots.save("tokens.png", draw)]


def _loop1(reader: _Reader, plots: _Plots, baseline: dict | None) -> list[str]:
    out = ["## Loop 1: memory structure revisions", ""]
    rows, why = reader.jsonl("structures", "archive.jsonl")
    if rows is None:
        return out + [_missing("Loop-1 progression", why)]
    if why:
        out += [f"_{why}._", ""]
    base_m = baseline["progression"] if baseline else None
    base_se = baseline["progression_se"] if baseline else None

    cands = []
    for r in rows:
        if r.get("kind") == "baseline":
            if base_m is None:  # no eval/baseline summary: the archive's record of the start is the baseline
                metric = r.get("metric") if isinstance(r.get("metric"), Mapping) else {}
                base_m, base_se = _num(metric.get("average_progress")), _num(metric.get("standard_error"))
            continue
        metric = r.get("metric") if isinstance(r.get("metric"), Mapping) else {}
        cands.append({
            "id": r.get("id", "?"), "revision": _num(r.get("revision")), "attempt": r.get("attempt"),
            "kind": r.get("kind", ""), "status": str(r.get("status", "?")),
            "version": r.get("version"), "m": _num(metric.get("average_progress")),
            "se": _num(metric.get("standard_error")),
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
        table_rows.append(("baseline", "–", "–", "start", _fmt_pm(base_m, base_se), "", ""))
    for c in cands:
        rev = "–" if c["revision"] is None else f"{c['revision']:g}"
        table_rows.append((c["id"], rev, c["kind"], c["status"], _fmt_pm(c["m"], c["se"]), c["reason"], diff_head(c)))
    out += _table(["candidate", "revision", "kind", "status", "progression % ± SE", "reason", "diff (first lines)"],
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


def _loop2(reader: _Reader, plots: _Plots, baseline: dict | None) -> tuple[list[str], list[dict]]:
    out = ["## Loop 2: memory-proficiency training", ""]
    rows, why = reader.jsonl("ledger.jsonl")
    if rows is None:
        return out + [_missing("Loop-2 progression", why)], []
    if why:
        out += [f"_{why}._", ""]
    rows = sorted(rows, key=lambda r: (_num(r.get("iteration")) is None, _num(r.get("iteration")) or 0))
    table = []
    if baseline and baseline["progression"] is not None:
        table.append(("base", "–", "–", "–", _fmt_pm(baseline["progression"], baseline["progression_se"]), "–"))
    for r in rows:
        train = r.get("train") if isinstance(r.get("train"), Mapping) else {}
        fl, ll = _num(train.get("first_loss")), _num(train.get("final_loss"))
        n, acc = r.get("n_examples", "–"), r.get("n_accepted")
        table.append((r.get("iteration", "?"), f"{n} of {acc} accepted" if isinstance(acc, int) and acc != n else n,
                      train.get("steps", "–"),
                      f"{fl:.4f} → {ll:.4f}" if fl is not None and ll is not None else "–",
                      _fmt_pm(_num(r.get("progression_mean")), _num(r.get("progression_se"))),
                      _decision_cell(r.get("decision"))))
    out += _table(["iteration", "examples", "train steps", "loss first → final", "progression % ± SE", "decision"],
                  table)
    notes = [(r.get("iteration", "?"), r["decision"]) for r in rows if isinstance(r.get("decision"), Mapping)
             and r["decision"].get("by") in ("critic", "fallback")]
    if notes:
        out += ["", "Decisions between iterations (`by`: critic, or the fallback rule when the critic is offline "
                "or its reply was unusable):", ""]
        for it, d in notes:
            line = f"- iteration {it} ({d.get('by')}): {_cell(d.get('rationale', ''), 400)}"
            if d.get("invalid_reply"):
                line += f" — critic reply unusable: {_cell(d['invalid_reply'], 200)}"
            out.append(line)

    points = []
    if baseline and baseline["progression"] is not None:
        points.append(("base", baseline["progression"], baseline["progression_se"]))
    points += [(str(r.get("iteration", "?")), _num(r.get("progression_mean")), _num(r.get("progression_se")))
               for r in rows if _num(r.get("progression_mean")) is not None]
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
        parts.append(f"new dataset (judge {d.get('judge', '?')}, top {_num(d.get('top_pct')) or 0:g}%, "
                     f"seed {d.get('sample_seed')})")
    rec = d.get("recipe")
    if isinstance(rec, Mapping):
        parts.append(f"lr ×{_num(rec.get('lr_scale')) or 0:g}, length ×{_num(rec.get('epochs_scale')) or 0:g}, "
                     f"rank {rec.get('lora_rank')}")
    return "; ".join(parts)


def _loop2_iterations(reader: _Reader, ledger: list[dict]) -> list[str]:
    """Iteration folders under loop2/ plus iterations named in the ledger, in numeric order."""
    names = set(reader.listdir("loop2")) | {str(r.get("iteration")) for r in ledger if r.get("iteration") is not None}
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def _hygiene(reader: _Reader, plots: _Plots, baseline: dict | None, final: dict | None,
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
    for it in _loop2_iterations(reader, ledger):
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
        return out + [_missing("Hygiene table", "no evaluation summary with hygiene metrics")]
    out += _table(["evaluation"] + [HYGIENE_LABELS[k] for k in HYGIENE_KEYS],
                  [[n] + [_fmt(k, m.get(k)) for k in HYGIENE_KEYS] for n, m in series])

    def draw(fig):
        axes = fig.subplots(2, 2).flat
        labels = [n for n, _ in series]
        for ax, k in zip(axes, HYGIENE_KEYS):
            scale = 100.0 if k in RATE_KEYS else 1.0
            ax.bar(range(len(series)), [(m.get(k) or 0.0) * scale for _, m in series], color="tab:purple")
            ax.set_xticks(range(len(series)), labels, rotation=30, ha="right", fontsize="small")
            ax.set_title(HYGIENE_LABELS[k] + (" (%)" if k in RATE_KEYS else ""), fontsize="medium")

    return out + ["", plots.save("hygiene.png", draw, figsize=(9.0, 6.0))]


def _losses(reader: _Reader, plots: _Plots, ledger: list[dict]) -> list[str]:
    out = ["## Training loss", ""]
    curves, missing = [], []
    sources = [("bootstrap", ("bootstrap", "train"))]
    sources += [(f"loop2 it{it}", ("loop2", it, "train")) for it in _loop2_iterations(reader, ledger)]
    for label, folder in sources:
        rows, _ = reader.jsonl(*folder, "train_log.jsonl")
        pts = [(_num(r.get("step")), _num(r.get("loss"))) for r in rows or []]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            tps = [_num(r.get("tokens_per_s")) for r in rows]
            tps = [t for t in tps if t is not None]
            mfu = [_num(r.get("mfu")) for r in rows]
            mfu = [m for m in mfu if m is not None]
            curves.append((label, pts, sum(tps) / len(tps) if tps else None, sum(mfu) / len(mfu) if mfu else None))
        else:
            missing.append(f"`{'/'.join(folder)}/train_log.jsonl`")
    if not curves:
        return out + [_missing("Loss curves", "no training log found (looked for " + ", ".join(missing) + ")")]
    out += _table(["run", "steps", "first loss", "final loss", "mean tokens/s", "mean MFU"],
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


def _pct_pm(m: float, se: float | None) -> str:
    return f"{m:.2f} ± {se:.2f}%" if se is not None else f"{m:.2f}%"


def _headline(baseline: dict, final: dict, base_raw: Mapping, final_raw: Mapping) -> list[str]:
    """Progression baseline → final first (mean ± SE, signed change), hygiene after it: a cleaner
    memory is never reported on its own when the agent progressed less."""
    nb, nf = _num(base_raw.get("episodes")), _num(final_raw.get("episodes"))
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
        text += f"progression {verb}, {_pct_pm(bp, bse)} → {_pct_pm(fp, fse)} ({d:+.2f} points"
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
    tasks = _per_task(base_raw), _per_task(final_raw)
    names = sorted(set(tasks[0]) & set(tasks[1]))
    fell = [n for n in names if None not in (tasks[0][n][0], tasks[1][n][0]) and tasks[1][n][0] < tasks[0][n][0]]
    if len(names) > 1 and fell:
        text += (f" Progression fell in {len(fell)} of {len(names)} tasks: " + ", ".join(fell[:6])
                 + (", …" if len(fell) > 6 else "") + ".")
    return [text]


def _provenance_note(config: Mapping | None, results: Mapping[str, dict], ledger: Sequence[Mapping]) -> list[str]:
    """Where the data behind the result came from, when that decides what the result can mean: a
    demo whose effect follows from how it was built must say so in its own output."""
    policy, _ = _collect_policy(config, results)
    bootstrap = _cfg(config, "bootstrap.enabled")
    rate = _num(_cfg(config, "bootstrap.redundant_write_rate"))
    rate_s = f"{rate:g}" if rate is not None else NOT_RECORDED
    if policy == "teacher":
        trained = bool(ledger) or (results.get("final_eval") or {}).get("iteration") is not None
        if not trained:
            return [f"> {FLAG} **Scripted-teacher demonstration.** `collect.policy=teacher`, but no Loop-2 iteration "
                    "was trained, so the final system is the base policy with the best Loop-1 structure; nothing "
                    "here measures Loop 2."]
        # Which rule drops the planted turns: critic.heuristic.judge_one rejects any turn with a
        # redundant write; the LLM judge's instructions tell it to reject duplicates of stored lines.
        judge = _judge_desc(config)
        if judge.startswith("`heuristic`"):
            how = "the heuristic judge rejects every turn with a redundant write"
        elif judge.startswith("the Loop-1 critic"):
            how = "the LLM judge is told to reject duplicates of stored lines"
        else:
            how = "Loop 2's judge rejects such turns"
        text = (f"> {FLAG} **Scripted-teacher demonstration: the redundant-write drop is built in.** Loop 2 trained "
                "on traces played by the scripted teacher (`collect.policy=teacher`), not by the base policy. The "
                f"teacher re-writes state lines on purpose (`bootstrap.redundant_write_rate={rate_s}`) and Loop 2's "
                f"selection filters exactly those turns out ({how}), so a lower redundant-write rate here is the "
                "teacher's planted habit being filtered out. It follows from how this demo is built and is not "
                "evidence that the method works. Progression is the measure, and only a run with "
                "`collect.policy=base` tests the method.")
        if bootstrap:
            text += (" The base policy learned the same habit from the teacher in `bootstrap`, which is where the "
                     "baseline's redundant writes come from.")
        return [text]
    if policy is None:
        return [f"> `collect.policy` {NOT_RECORDED}: whether Loop 2 trained on the scripted teacher's traces (whose "
                "redundant writes are planted) is unknown, so read the redundant-write figures with care."]
    if bootstrap:
        return ["> The base policy was warm-started on the scripted teacher (`bootstrap`), which writes redundantly "
                f"on purpose (`bootstrap.redundant_write_rate={rate_s}`): the baseline's redundant writes are that "
                "planted habit."]
    return []


def _final(baseline: dict | None, final: dict | None, base_raw: dict | None, final_raw: dict | None,
           base_why: str, final_why: str, base_source: str, note: list[str], final_result: Mapping | None) -> list[str]:
    out = ["## Final system against the baseline", ""]
    if baseline is None or final is None:
        why = "; ".join(w for w in (base_why if baseline is None else "", final_why if final is None else "") if w)
        return out + [_missing("Final comparison", why)] + ([""] + note if note else [])
    out += _headline(baseline, final, base_raw or {}, final_raw or {})
    if note:
        out += [""] + note
    if final_result is None:
        system = f"{NOT_RECORDED} (no `phases/final_eval/result.json`)"
    elif final_result.get("iteration") is None:
        system = "the base policy with the best Loop-1 structure (no Loop-2 iteration)"
    else:
        system = f"Loop-2 iteration {final_result['iteration']}'s specialist with the best Loop-1 structure"
    out += ["", f"Final system: {system}. Baseline: `{base_source}`.", ""]
    keys = ["progression"] + list(HYGIENE_KEYS) + ["invalid_action_rate"] + list(HEALTH_KEYS)
    rows = [("progression % ± SE", _fmt_pm(baseline["progression"], baseline["progression_se"]),
             _fmt_pm(final["progression"], final["progression_se"]),
             _fmt_change("progression", baseline["progression"], final["progression"]))]
    rows += [(HYGIENE_LABELS[k], _fmt(k, baseline.get(k)), _fmt(k, final.get(k)),
              _fmt_change(k, baseline.get(k), final.get(k))) for k in keys[1:]]
    out += _table(["metric", "baseline", "final", "change"], rows)
    # Per-task rows matter for MiniHack (8 tasks); one task adds nothing to the table above.
    tasks = _per_task(base_raw or {}), _per_task(final_raw or {})
    names = sorted(set(tasks[0]) | set(tasks[1]))
    if len(names) > 1:
        def change(n):
            b, f = tasks[0].get(n, (None,))[0], tasks[1].get(n, (None,))[0]
            return f"{f - b:+.2f}" if b is not None and f is not None else "–"

        red = _per_task_redundant(base_raw or {}), _per_task_redundant(final_raw or {})

        def redundant(n):
            b, f = red[0].get(n), red[1].get(n)
            return f"{_fmt('redundant_write_rate', b)} → {_fmt('redundant_write_rate', f)}"

        out += ["", "Per task (progression first; its change in points):", ""]
        out += _table(["task", "baseline progression % ± SE", "final progression % ± SE", "change",
                       "redundant-write rate"],
                      [(n, _fmt_pm(*tasks[0].get(n, (None, None))), _fmt_pm(*tasks[1].get(n, (None, None))),
                        change(n), redundant(n)) for n in names])
    return out


def _heldout(reader: _Reader, config: Mapping | None, compare: dict | None, final: dict | None,
             cmp_raw: dict | None, final_raw: dict | None, final_result: Mapping | None) -> list[str]:
    """Baseline -> final on the seeds that chose the system and on the held-out seeds, side by side."""
    out = ["## Held-out seeds", ""]
    held = _cfg(config, "eval.heldout_seeds")
    bh_raw, bh_why = reader.eval_summary("eval", "baseline_heldout")
    fh_raw, fh_why = reader.eval_summary("eval", "final_heldout")
    if not held and bh_raw is None and fh_raw is None:
        return out + ["_No held-out seeds in this run (`eval.heldout_seeds` unset): the final result above was "
                      "measured on the same seeds that chose the system._"]
    chose = _rec(_cfg(config, "eval.seeds"))
    fe = _cfg(config, "final_eval.seeds")
    it = (final_result or {}).get("iteration")
    system = (f"Loop-2 iteration {it}, the best iteration on them" if it is not None
              else "the base policy with the best Loop-1 structure (no Loop-2 iteration)")
    out += [f"**Chosen on:** the eval seeds ({chose}). Loop 1 kept structures and Loop 2 picked the final system "
            f"({system}) by their results there, so the eval-seed figures favour the final system. "
            f"**Held out:** seeds {_rec(held)}, never used to choose anything; the baseline and the final system "
            "were played on them only to be reported here.", ""]
    bh = summary_metrics(bh_raw) if bh_raw is not None else None
    fh = summary_metrics(fh_raw) if fh_raw is not None else None

    def line(name, role, seeds, b, f, braw, fraw):
        eps = f"{_rec((braw or {}).get('episodes'))} / {_rec((fraw or {}).get('episodes'))}"
        bp, fp = (b or {}).get("progression"), (f or {}).get("progression")
        return (name, role, seeds, eps, _fmt_pm(bp, (b or {}).get("progression_se")),
                _fmt_pm(fp, (f or {}).get("progression_se")), _fmt_change("progression", bp, fp),
                f"{_fmt('redundant_write_rate', (b or {}).get('redundant_write_rate'))} → "
                f"{_fmt('redundant_write_rate', (f or {}).get('redundant_write_rate'))}")

    rows = [line("eval" if not fe else "final-eval",
                 "chose the system" if not fe else "reported (system chosen on eval)",
                 _rec(fe or chose), compare, final, cmp_raw, final_raw),
            line("held-out", "held out: reported only", _rec(held), bh, fh, bh_raw, fh_raw)]
    out += _table(["seed set", "role", "seeds", "episodes (baseline / final)", "baseline progression % ± SE",
                   "final progression % ± SE", "change", "redundant-write rate"], rows)
    if bh is None or fh is None:
        why = "; ".join(w for w in (bh_why if bh is None else "", fh_why if fh is None else "") if w)
        return out + ["", _missing("Held-out comparison", why)]
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


def _run_health(reader: _Reader, base_raw: dict | None, final_raw: dict | None, ledger: list[dict]) -> list[str]:
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
    for it in _loop2_iterations(reader, ledger):
        s, _ = reader.eval_summary("loop2", it, "eval")
        if s is not None:
            evals.append((f"L2 it{it}", s))
    if final_raw is not None:
        evals.append(("final", final_raw))
    if not evals:
        return out + [_missing("Health table", "no evaluation summary found")]
    rows, unrecorded, warnings = [], [], []
    for name, s in evals:
        h = _health_of(s)
        if h is None:
            unrecorded.append(name)
            rows.append([name, s.get("episodes", "–"), "–", "–"] + ["–"] * len(HEALTH_KEYS))
            continue
        rows.append([name, s.get("episodes", "–"), h.get("steps", "–"), h.get("model_turns", "–")]
                    + [_fmt(k, _num(h.get(k))) for k in HEALTH_KEYS])
        warnings += health_warnings(s, label=name)
    out += _table(["evaluation", "episodes", "steps", "model turns"] + [HYGIENE_LABELS[k] for k in HEALTH_KEYS],
                  rows)
    if unrecorded:
        out += ["", f"_No health counts in: {', '.join(unrecorded)} (summaries written before they were recorded)._"]
    if warnings:
        out += ["", f"{FLAG} Rates above {100 * HEALTH_THRESHOLD:.0f}%:", ""] + [f"- {_cell(w, 600)}" for w in warnings]
    return out


def _task_entries(summary: Mapping):
    """(env/task, that task's summary) for every task of a summary.json."""
    for env, tasks in (summary.get("environments") or {}).items():
        if isinstance(tasks, Mapping):
            for task, t in tasks.items():
                if isinstance(t, Mapping):
                    yield f"{env}/{task}", t


def _per_task(summary: Mapping) -> dict[str, tuple[float | None, float | None]]:
    return {n: (_num(t.get("progression_percentage")), _num(t.get("standard_error")))
            for n, t in _task_entries(summary)}


def _per_task_redundant(summary: Mapping) -> dict[str, float | None]:
    return {n: _num(t["hygiene"].get("redundant_write_rate")) if isinstance(t.get("hygiene"), Mapping) else None
            for n, t in _task_entries(summary)}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def build_report(workdir: str, plots: bool | None = None) -> str:
    """Writes ``<workdir>/report/index.md`` (and PNGs next to it); returns the index path.

    ``plots=None`` follows config.json's ``report.plots`` (default on). Missing inputs are
    named in the report, never raised; only a failure to write the report itself raises.
    """
    reader = _Reader(workdir)
    config, config_why = reader.json("config.json")
    if plots is None:
        plots = bool(((config or {}).get("report") or {}).get("plots", True))
    pl = _Plots(reader, plots)

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

    # Phase results the setup block and the provenance note read (who collected, what was trained).
    results: dict[str, dict] = {}
    for name in ("bootstrap", "collect", "loop2", "final_eval"):
        res, _ = reader.json("phases", name, "result.json")
        if res is not None:
            results[name] = res
    ledger_rows, _ = reader.jsonl("ledger.jsonl")
    try:
        note = _provenance_note(config, results, [r for r in ledger_rows or [] if r.get("iteration") is not None])
        lines = _header(reader, config, config_why, results) + [""]
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

    section(lambda: _final(compare, final, cmp_raw, final_raw, base_why, final_why, cmp_source, note,
                           results.get("final_eval")), "Final system against the baseline")
    section(lambda: _heldout(reader, config, compare, final, cmp_raw, final_raw, results.get("final_eval")),
            "Held-out seeds")
    section(lambda: _loop1(reader, pl, baseline), "Loop 1: memory structure revisions")

    def loop2() -> list[str]:
        text, rows = _loop2(reader, pl, baseline)
        ledger.extend(rows)
        return text

    section(loop2, "Loop 2: memory-proficiency training")
    section(lambda: _hygiene(reader, pl, baseline, final, ledger), "Memory hygiene")
    section(lambda: _run_health(reader, base_raw, final_raw, ledger), "Run health")
    section(lambda: _losses(reader, pl, ledger), "Training loss")
    phase_results: list[tuple[str, dict]] = []

    def phases() -> list[str]:
        text, results = _phase_times(reader, config)
        phase_results.extend(results)
        return text

    section(phases, "Phases")
    section(lambda: _tokens(pl, phase_results), "Tokens per phase")

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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
