"""The numbers the report shows, from Runner summaries: progression, hygiene and health, pooled
over env steps; per-task progression."""
from __future__ import annotations

import math
from collections.abc import Mapping


HYGIENE_KEYS = ("redundant_write_rate", "empty_search_rate", "ops_per_step", "context_tokens_per_step")


HEALTH_KEYS = ("model_error_rate", "fallback_rate", "context_overflow_rate")


RATE_KEYS = {"redundant_write_rate", "empty_search_rate", "invalid_action_rate", *HEALTH_KEYS}


def num(x) -> float | None:
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
        "progression": num(summary.get("average_progress")),
        "progression_se": num(summary.get("standard_error")),
    }
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for tasks in (summary.get("environments") or {}).values():
        if not isinstance(tasks, Mapping):
            continue
        for t in tasks.values():
            if not isinstance(t, Mapping):
                continue
            w = num(t.get("steps")) or 1.0
            values = dict(t.get("hygiene") or {})
            values["invalid_action_rate"] = t.get("invalid_action_rate")
            for k in HYGIENE_KEYS + ("invalid_action_rate",):
                v = num(values.get(k))
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + w * v
                    weights[k] = weights.get(k, 0.0) + w
    flat = summary.get("hygiene") if isinstance(summary.get("hygiene"), Mapping) else {}
    for k in HYGIENE_KEYS + ("invalid_action_rate",):
        if k in weights and weights[k] > 0:
            out[k] = sums[k] / weights[k]
        else:
            out[k] = num(flat.get(k)) if flat else None
    health = health_of(summary) or {}
    for k in HEALTH_KEYS:
        out[k] = num(health.get(k))
    return out


def health_of(summary: Mapping) -> Mapping | None:
    """The summary's overall ``health`` entry; None for a summary written before it existed."""
    h = summary.get("health")
    return h if isinstance(h, Mapping) and num(h.get("steps")) else None


def task_entries(summary: Mapping):
    """(env/task, that task's summary) for every task of a summary.json."""
    for env, tasks in (summary.get("environments") or {}).items():
        if isinstance(tasks, Mapping):
            for task, t in tasks.items():
                if isinstance(t, Mapping):
                    yield f"{env}/{task}", t


def per_task(summary: Mapping) -> dict[str, tuple[float | None, float | None]]:
    return {n: (num(t.get("progression_percentage")), num(t.get("standard_error")))
            for n, t in task_entries(summary)}


def per_task_redundant(summary: Mapping) -> dict[str, float | None]:
    return {n: num(t["hygiene"].get("redundant_write_rate")) if isinstance(t.get("hygiene"), Mapping) else None
            for n, t in task_entries(summary)}
