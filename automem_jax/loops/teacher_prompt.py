"""What the scripted teacher reads: the Crafter observation, the command listing, the file index and
the command results in a prompt's text, and the ``Key: value`` lines of its state file.

Everything comes from the message text (as a model sees it), so the teacher keeps working when
Loop 1 rewords prompts, renames files or changes the op vocabulary.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from automem_jax.envs.describe_crafter import ACTIONS
from automem_jax.memory.ops import RULE

# Cells the player cannot enter (lava could be entered and kills, so it is treated as a wall).
SOLID = frozenset({"water", "stone", "tree", "lava", "coal", "iron", "diamond", "table",
                   "furnace", "plant", "cow", "zombie", "skeleton", "arrow", "nothing"})

# Phrases of the deterministic unchanged-observation / stuck blocks (agent/context.py). They
# come from code, not from the structure's prose, so Loop 1 rewording prompts cannot hide them.
_UNCHANGED_RE = re.compile(r"EXACTLY the same as at the previous step|has not changed for \d+ "
                           r"actions|Nothing in the observation has changed")
_COMMAND_LINE_RE = re.compile(r"^[ \t]+<\|([A-Z][A-Z0-9_]*)\|>", re.MULTILINE)
_ANY_TAG_RE = re.compile(r"<\|([A-Z][A-Z0-9_]*)\|>")
_INDEX_RE = re.compile(r"^[ \t]*-[ \t]+(\S[^\n]*?)[ \t]+\((\d+) lines?\)[ \t]*$", re.MULTILINE)
_RESULT_RE = re.compile("^" + RULE + r" (.+?) " + RULE + "$", re.MULTILINE)
_ACTION_QUOTED_RE = re.compile('"(' + "|".join(re.escape(a) for a in ACTIONS) + ')"')
_STEP_RE = re.compile(r"\bstep (\d+)\b", re.IGNORECASE)
_SEE_RE = re.compile(r"^- (\w+) (\d+) steps? to your ([a-z-]+)$")
_VITAL_RE = re.compile(r"^- (health|food|drink|energy): (\d+)/\d+$")
_ITEM_RE = re.compile(r"^- (\w+): (\d+)$")
_STAMP_TAIL_RE = re.compile(r"\s*\(step \d+\)$")

# File roles, matched against file names; the first role to claim a file keeps it.
_ROLES = (("state", ("strateg", "plan", "goal", "state", "todo")),
          ("survival", ("surviv", "vital", "health")),
          ("events", ("action", "event", "histor", "journal", "log")),
          ("map", ("map", "locat", "world", "terrain", "place")),
          ("craft", ("craft", "progress", "inventor", "item", "tool", "recipe")))
DEFAULT_STATE_FILE = "strategy.txt"
DEFAULT_NOTES_FILE = "notes.txt"


def is_unchanged(prompt: str) -> bool:
    """Whether the prompt carries the unchanged-observation / stuck block."""
    return bool(_UNCHANGED_RE.search(prompt))


# ----------------------------------------------------------------------------- the prompt


@dataclass
class View:
    """One Crafter-format observation (BALROG's text), parsed."""

    see: dict[str, tuple[int, tuple[str, ...]]]  # kind -> (distance, directions) of the nearest
    front: str
    vitals: dict[str, int]
    inventory: dict[str, int]
    sleeping: bool = False

    def adjacent(self, kind: str) -> str | None:
        """The direction of ``kind`` when it is one step away (cardinal), else None."""
        e = self.see.get(kind)
        return e[1][0] if e and e[0] == 1 and len(e[1]) == 1 else None

    def near(self, kind: str) -> bool:
        """In one of the 8 cells around the player (Craftax's crafting range)."""
        e = self.see.get(kind)
        return bool(e) and (e[0] == 1 or (e[0] == 2 and len(e[1]) == 2))

    def blocked(self, direction: str, target: str | None = None) -> bool:
        """Whether the cell next to the player in ``direction`` is known to be a wall."""
        return any(k in SOLID and k != target and self.adjacent(k) == direction
                   for k in self.see)

    def phrase(self, kind: str) -> str:
        d, dirs = self.see[kind]
        return f"{d} step{'s' if d > 1 else ''} to your {'-'.join(dirs)}"


def parse_observation(text: str) -> View | None:
    """The last Crafter observation in ``text`` (context blocks may precede it), or None."""
    at = text.rfind("Your status:")
    if at < 0:
        return None
    head, tail = text[:at], text[at:].splitlines()
    vitals: dict[str, int] = {}
    inventory: dict[str, int] = {}
    i = 1
    while i < len(tail) and (m := _VITAL_RE.match(tail[i].strip())):
        vitals[m.group(1)] = int(m.group(2))
        i += 1
    for j in range(i, min(i + 3, len(tail))):
        if tail[j].strip() == "Your inventory:":
            for line in tail[j + 1:]:
                m = _ITEM_RE.match(line.strip())
                if not m:
                    break
                inventory[m.group(1)] = int(m.group(2))
            break
    face = list(re.finditer(r"You face (\w+) at your front\.", head))
    front = face[-1].group(1) if face else "nothing"
    cut = face[-1].start() if face else len(head)
    see: dict[str, tuple[int, tuple[str, ...]]] = {}
    start = head.rfind("You see:", 0, cut)
    if start >= 0 and "You see nothing" not in head[start:cut]:
        for line in head[start:cut].splitlines()[1:]:
            m = _SEE_RE.match(line.strip())
            if m:
                see.setdefault(m.group(1), (int(m.group(2)), tuple(m.group(3).split("-"))))
            elif line.strip():
                break
    # BALROG puts the sleeping line just before "You see" (four newlines between them).
    anchor = start if start >= 0 else cut
    sleeping = "You are sleeping" in head[max(0, anchor - 120):anchor]
    return View(see, front, vitals, inventory, sleeping)


def offered_ops(prompt: str) -> set[str]:
    """Ops the prompt's command listing offers (lines that start with an op tag).

    Falls back to every tag in the prompt when no listing is recognisable.
    """
    ops = set(_COMMAND_LINE_RE.findall(prompt))
    return ops or set(_ANY_TAG_RE.findall(prompt))


def file_index(prompt: str) -> dict[str, int]:
    """File name -> line count, from the ``  - name (N lines)`` index lines."""
    return {m.group(1): int(m.group(2)) for m in _INDEX_RE.finditer(prompt)}


def tool_results(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(header, body) of every op result shown in the user messages after the first."""
    out = []
    for m in messages[1:]:
        if m.get("role") != "user":
            continue
        text = m.get("content", "")
        heads = list(_RESULT_RE.finditer(text))
        for h, nxt in zip(heads, heads[1:] + [None]):
            body = text[h.end() + 1: nxt.start() if nxt else len(text)]
            # Results are separated by a blank line; anything after it is template prose.
            out.append((h.group(1), body.split("\n\n", 1)[0].strip("\n")))
    return out


def result_lines(results: Sequence[tuple[str, str]], file: str) -> list[str] | None:
    """Lines of ``file`` seen in READ/TAIL/SEARCH results (None when it was never looked at)."""
    seen = None
    for head, body in results:
        parts = head.split(" ")
        if len(parts) >= 2 and parts[0] in ("READ", "TAIL", "SEARCH") and parts[1] == file:
            seen = seen or []
            if not body.startswith("[") or not body.endswith("]"):
                seen += [ln for ln in body.splitlines() if ln.strip()]
    return seen


def previous_action(prompt: str) -> tuple[str | None, int]:
    """(previous action, its step) from a LOG prompt: the first quoted action name and the
    last "step N" before it (the first one anywhere when none precedes it)."""
    m_act = _ACTION_QUOTED_RE.search(prompt)
    steps = list(_STEP_RE.finditer(prompt))
    before = [m for m in steps if m_act and m.start() < m_act.start()]
    m = before[-1] if before else (steps[0] if steps else None)
    return (m_act.group(1) if m_act else None), (int(m.group(1)) if m else 0)


def assign_roles(files: Iterable[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name in sorted(files):
        low = name.lower()
        for role, keys in _ROLES:
            if role not in roles and any(k in low for k in keys):
                roles[role] = name
                break
    return roles


# ----------------------------------------------------------------------------- the state file


@dataclass
class Notes:
    """What the state file remembers between steps (``Key: value`` lines, the last one wins)."""

    goal: str = ""
    heading: str | None = None
    since: int = 0
    inventory: dict[str, int] | None = None
    vitals: dict[str, int] | None = None
    seen: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, lines: Iterable[str] | None) -> "Notes":
        n = cls()
        for line in lines or ():
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), _STAMP_TAIL_RE.sub("", value.strip())
            if key == "goal":
                n.goal = value
            elif key == "heading":
                m = re.match(r"(north|east|south|west)(?: since step (\d+))?", value)
                if m:
                    n.heading, n.since = m.group(1), int(m.group(2) or 0)
            elif key == "inventory":
                n.inventory = _parse_counts(value)
            elif key == "vitals":
                n.vitals = _parse_counts(value)
            elif key == "seen":
                n.seen = [s.strip() for s in value.split(",") if s.strip()]
            elif key == "done":
                n.done = [s.strip() for s in value.split(",") if s.strip()]
        return n

    def render(self) -> str:
        lines = []
        if self.goal:
            lines.append(f"Goal: {self.goal}")
        if self.heading:
            lines.append(f"Heading: {self.heading} since step {self.since}")
        if self.inventory is not None:
            lines.append("Inventory: " + (", ".join(f"{k} {v}" for k, v in self.inventory.items())
                                          or "nothing"))
        if self.vitals is not None:
            lines.append("Vitals: " + ", ".join(f"{k} {v}" for k, v in self.vitals.items()))
        if self.seen:
            lines.append("Seen: " + ", ".join(self.seen))
        if self.done:
            lines.append("Done: " + ", ".join(self.done))
        return "\n".join(lines)


def _parse_counts(value: str) -> dict[str, int]:
    out = {}
    for part in value.split(","):
        m = re.match(r"\s*(\w+)\s+(\d+)\s*$", part)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out
