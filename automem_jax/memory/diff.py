"""A readable change list between two memory structures (Loop 1's changes, the CLI's diff)."""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping

from automem_jax.memory.structure import MemoryStructure


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif (isinstance(value, list) and value and all(isinstance(x, dict) for x in value)
          and all("name" in x or "file" in x for x in value)):
        for x in value:
            key = x.get("name", x.get("file"))
            _flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}[{key}]", out)
    else:
        out[prefix] = value


def _entries(flat: dict) -> dict[str, set[str]]:
    """Paths that name list entries (``files[x]``) -> their sub-paths."""
    groups: dict[str, set[str]] = {}
    for path in flat:
        m = re.match(r"^(.*?\[[^\]]*\])", path)
        if m:
            groups.setdefault(m.group(1), set()).add(path)
    return groups


def diff(a: MemoryStructure | Mapping, b: MemoryStructure | Mapping) -> list[str]:
    """A readable change list from ``a`` to ``b`` (empty when they are equal)."""
    # A plain mapping is read as a structure would hold it: copied, defaults filled.
    da = (a if isinstance(a, MemoryStructure) else MemoryStructure(a)).doc
    db = (b if isinstance(b, MemoryStructure) else MemoryStructure(b)).doc
    fa, fb = {}, {}
    _flatten(da, "", fa)
    _flatten(db, "", fb)
    ga, gb = _entries(fa), _entries(fb)
    lines: list[str] = []
    handled: set[str] = set()
    for entry in sorted(set(ga) | set(gb)):
        if entry not in gb:
            lines.append(f"- {entry}: removed")
            handled |= ga[entry]
        elif entry not in ga:
            size = ""
            content = fb.get(f"{entry}.content")
            if isinstance(content, str):
                size = f" ({len(content.splitlines())} lines)"
            lines.append(f"+ {entry}: added{size}")
            handled |= gb[entry]
    entry_parents = {e[:e.rindex("[")] for e in set(ga) | set(gb)}
    for path in sorted((set(fa) | set(fb)) - handled):
        old, new = fa.get(path, _MISSING), fb.get(path, _MISSING)
        if old == new:
            continue
        if path in entry_parents and (old in ([], _MISSING)) and (new in ([], _MISSING)):
            continue  # an empty list on one side; its entries are listed above
        if old is _MISSING:
            lines.append(f"+ {path}: {_short(new)}")
        elif new is _MISSING:
            lines.append(f"- {path}: removed (was {_short(old)})")
        elif isinstance(old, str) and isinstance(new, str) and ("\n" in old or "\n" in new):
            lines.append(f"~ {path}: text changed")
            body = difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=1)
            lines.extend("    " + ln for ln in list(body)[2:])
        elif isinstance(old, list) and isinstance(new, list) and \
                all(isinstance(x, str) for x in old + new):
            added = [x for x in new if x not in old]
            removed = [x for x in old if x not in new]
            parts = [f"+{x}" for x in added] + [f"-{x}" for x in removed]
            if not parts:
                parts = ["reordered"]
            lines.append(f"~ {path}: {' '.join(parts)}")
        else:
            lines.append(f"~ {path}: {_short(old)} -> {_short(new)}")
    return lines


_MISSING = object()


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."
