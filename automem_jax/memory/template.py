"""Prompt templates: ``{name}`` placeholders, found and filled without ``str.format``.

Structure documents are edited by a critic, so filling must never fail on stray braces.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(template: str) -> set[str]:
    return set(PLACEHOLDER_RE.findall(template))


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill ``{name}`` placeholders; unknown braces are left alone.

    A line holding only a placeholder whose value is empty disappears together with one of the
    blank lines around it, so switched-off blocks leave no gaps in the prompt.
    """
    out: list[str] = []
    skip_blank = False
    for line in template.split("\n"):
        m = PLACEHOLDER_RE.fullmatch(line.strip())
        if m and m.group(1) in values and not str(values[m.group(1)]).strip():
            skip_blank = not out or not out[-1].strip()
            continue
        if skip_blank and not line.strip():
            skip_blank = False
            continue
        skip_blank = False
        out.append(PLACEHOLDER_RE.sub(
            lambda mm: str(values[mm.group(1)]) if mm.group(1) in values else mm.group(0), line))
    return "\n".join(out)
