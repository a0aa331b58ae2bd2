"""The report's "Stages" and "Tokens per stage" sections, from stages/<name>/{result.json,DONE}."""
from __future__ import annotations

from collections.abc import Mapping

from automem_jax.report.markdown import missing, table
from automem_jax.report.metrics import num
from automem_jax.report.plots import Plots
from automem_jax.report.reading import Reader


def _stage_names(reader: Reader, config: Mapping | None) -> list[str]:
    """Stage order from config.json's comma-separated `stages`, then any other stage folders found."""
    listed = []
    if config and isinstance(config.get("stages"), str):
        listed = [p.strip() for p in config["stages"].split(",") if p.strip()]
    found = reader.listdir("stages")
    return listed + [p for p in found if p not in listed]


def stage_section(reader: Reader, config: Mapping | None) -> tuple[list[str], list[tuple[str, dict]]]:
    """Per-stage finish time (DONE holds a timestamp) and result.json; returns lines and results."""
    names = _stage_names(reader, config)
    results, rows = [], []
    for name in names:
        res, _ = reader.json("stages", name, "result.json")
        done, _ = reader.text("stages", name, "DONE")
        if res is None and done is None:
            rows.append((name, "not run", "–", "–"))
            continue
        results.append((name, res or {}))
        seconds = num((res or {}).get("seconds"))
        rows.append((name, "done" if done is not None else "started",
                     (done or "").strip() or (res or {}).get("finished", "–"),
                     f"{seconds:.0f}" if seconds is not None else "–"))
    if not names:
        return ["## Stages", "", missing("Stage list", "no `stages/` folder and no `stages` in config.json")], []
    return ["## Stages", ""] + table(["stage", "state", "finished (UTC)", "seconds"], rows), results


def tokens_section(plots: Plots, results: list[tuple[str, dict]]) -> list[str]:
    out = ["## Tokens per stage", ""]
    rows = [(n, num(r.get("tokens_in")), num(r.get("tokens_out")), num(r.get("seconds"))) for n, r in results]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return out + [missing("Token counts", "no `stages/<name>/result.json` carries `tokens_in` / `tokens_out`")]
    out += table(["stage", "tokens in", "tokens out", "seconds"],
                 [(n, f"{ti or 0:,.0f}", f"{to or 0:,.0f}", f"{s:.0f}" if s is not None else "–")
                  for n, ti, to, s in rows])

    def draw(fig):
        ax = fig.subplots()
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1] or 0 for r in rows], width=0.4, label="tokens in")
        ax.bar([x + 0.2 for x in xs], [r[2] or 0 for r in rows], width=0.4, label="tokens out")
        ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("tokens")
        ax.set_title("Tokens per stage")
        ax.legend()

    return out + ["", plots.save("tokens.png", draw)]
