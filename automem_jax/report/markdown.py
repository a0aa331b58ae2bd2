"""How the report writes numbers and tables in Markdown: percentages, mean ± SE, signed changes,
table cells, the one-line note for a skipped piece."""
from __future__ import annotations

from collections.abc import Sequence

from automem_jax.report.metrics import HEALTH_KEYS, RATE_KEYS
from automem_jax.rollout.traces import HEALTH_THRESHOLD


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


FLAG = "⚠"


def fmt(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    if key in HEALTH_KEYS and v > HEALTH_THRESHOLD:
        return f"{100 * v:.1f}% {FLAG}"
    if key in RATE_KEYS:
        return f"{100 * v:.1f}%"
    if key == "context_tokens_per_step":
        return f"{v:.0f}"
    return f"{v:.2f}"


def fmt_pm(m: float | None, se: float | None) -> str:
    if m is None:
        return "–"
    return f"{m:.2f} ± {se:.2f}" if se is not None else f"{m:.2f}"


def fmt_change(key: str, before: float | None, after: float | None) -> str:
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


def pct_pm(m: float, se: float | None) -> str:
    return f"{m:.2f} ± {se:.2f}%" if se is not None else f"{m:.2f}%"


def cell(x, limit: int = 120) -> str:
    """Table-safe text: one line, no pipes, bounded length."""
    s = " ".join(str(x if x is not None else "").split())
    s = s.replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def missing(what: str, why: str) -> str:
    return f"_{what} skipped: {why}._"
