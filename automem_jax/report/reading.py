"""The report's reads of a workdir: each returns None and a reason for a missing or malformed
file, never raises, so that a half-finished run still gets a report; and config.json lookups."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from automem_jax import storage

log = logging.getLogger(__name__)


class Reader:
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


NOT_RECORDED = "not recorded"


def setting(config: Mapping | None, dotted: str):
    """config.json's value at a dotted path; None when any level is absent (workdirs from older code)."""
    v = config
    for k in dotted.split("."):
        if not isinstance(v, Mapping) or k not in v:
            return None
        v = v[k]
    return v


def recorded(v) -> str:
    return NOT_RECORDED if v is None or v == "" else str(v)


def loop2_iterations(reader: Reader, ledger: list[dict]) -> list[str]:
    """Iteration folders under loop2/ plus iterations named in the ledger, in numeric order."""
    names = set(reader.listdir("loop2")) | {str(r.get("iteration")) for r in ledger if r.get("iteration") is not None}
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
