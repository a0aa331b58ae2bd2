"""Scripted teacher for the tiny CPU config: plays Craftax-Classic through the real agent prompts.

A random tiny model cannot use memory ops at all, so Loop 2 would have nothing to mine. The
teacher is a ``Client`` (``generate(requests) -> completions``) that answers the MemoryAgent's
LOG/PLAN chats in the op grammar, and the tiny model is warm-started (SFT) on its traces
(``teacher_examples``). It reads only what a model reads: the chat messages. Observation, file
index, offered commands and tool results are parsed out of the prompt text, so it keeps working
when Loop 1 rewords prompts, renames files or changes the op vocabulary.

How it uses memory (its good habits):
  * a state file (the one named like strategy/plan/goal) holds ``Key: value`` lines: goal,
    exploration heading, last known inventory and vitals, kinds already noted, things done.
    LOG reads it, diffs it against the new observation, and rewrites it only when it changed;
    PLAN reads it (or SEARCHes its Heading line when exploring) before committing an action.
  * LOG appends step-stamped facts that are new: inventory gains and losses, crafts and
    placements, failed actions, blocked moves, health and vitals events, first sightings.
  * LOG looks at the tail of the events file before appending to it.

Its deliberate bad habits, at configured rates, so Loop 2 has something to reject:
  * redundant writes: APPEND of one or two lines memory already holds: state-file lines it
    was just shown go back into the state file, or, when it read nothing, a line it appended
    earlier in the same reply is appended again. ``redundant_write_rate`` is the chance per LOG
    phase that writes something; the run summary's
    ``hygiene.redundant_write_rate`` (a share of all writes) is lower.
  * useless reads: READ of a file it then ignores: never the state file or the events file,
    and never written in the same phase (LOG sends the facts meant for it to the events file).
    ``useless_read_rate`` is the chance per LOG or PLAN phase.
It never SEARCHes for something that is not there (no empty searches) and never sends an op
the phase does not offer.

Everything is a pure function of (seed, request messages): decisions use a hash of the seed and
the phase's first message, so results do not depend on batching or on call order.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from automem_jax import storage
from automem_jax.agent.memory_agent import CONSULTATION_DONE
from automem_jax.agent.types import (PHASE_LOG, PHASE_PLAN, ROLE_GAMEPLAY, ChatRequest,
                                     Completion)
from automem_jax.envs.describe_crafter import ACTIONS, ITEMS, VITALS
from automem_jax.memory.ops import RULE, strip_action

MODEL_ID = "teacher"

DIRECTIONS = ("north", "east", "south", "west")
MOVE = {d: f"Move {d.capitalize()}" for d in DIRECTIONS}
MOVE_DIR = {a: d for d, a in MOVE.items()}
_TURN = {"north": ("east", "west"), "south": ("west", "east"),
         "east": ("south", "north"), "west": ("north", "south")}
_BACK = {"north": "south", "south": "north", "east": "west", "west": "east"}
# Cells the player cannot enter (lava could be entered and kills, so it is treated as a wall).
SOLID = frozenset({"water", "stone", "tree", "lava", "coal", "iron", "diamond", "table",
                   "furnace", "plant", "cow", "zombie", "skeleton", "arrow", "nothing"})
PLACEABLE = frozenset({"grass", "sand", "path"})
# Kinds not worth a map note: the ground itself.
BORING = frozenset({"grass", "sand", "path", "nothing", "arrow"})
TOOLS = ("wood_pickaxe", "wood_sword", "stone_pickaxe", "stone_sword")
_MAKE = {"Make " + t.replace("_", " ").title(): t for t in ITEMS if "_" in t}
_PLACE_COST = {"Place Table": ("wood", "place table"), "Place Stone": ("stone", "place stone"),
               "Place Furnace": ("stone", "place furnace"), "Place Plant": ("sapling", "place plant")}

# Phrases of the deterministic unchanged-observation / stuck blocks (agent/context.py). They
# come from code, not from the structure's prose, so Loop 1 rewording prompts cannot hide them.
_UNCHANGED_RE = re.compile(r"EXACTLY the same as at the previous step|has not changed for \d+ "
                           r"actions|Nothing in the observation has changed")
_COMMAND_LINE_RE = re.compile(r"^[ \t]+<\|([A-Z][A-Z0-9_]*)\|>", re.MULTILINE)
_ANY_TAG_RE = re.compile(r"<\|([A-Z][A-Z0-9_]*)\|>")
_APPEND_OP_RE = re.compile(r"<\|APPEND\|>([^|]*)\|(.*)<\|END\|>", re.DOTALL)
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


# ----------------------------------------------------------------------------- hashing


class Dice:
    """Uniform numbers keyed by (seed, text, tag): the same question always gets the same answer."""

    def __init__(self, seed: int, text: str):
        self._base = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "surrogatepass")).hexdigest()

    def uniform(self, tag: str) -> float:
        h = hashlib.sha256(f"{self._base}\x00{tag}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0 ** 64

    def choice(self, tag: str, seq: Sequence):
        return seq[min(int(self.uniform(tag) * len(seq)), len(seq) - 1)]

    def shuffled(self, tag: str, seq: Iterable) -> list:
        return sorted(seq, key=lambda x: self.uniform(f"{tag}/{x}"))


# ----------------------------------------------------------------------------- parsing


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


# ----------------------------------------------------------------------------- the game policy


@dataclass
class Decision:
    action: str
    kind: str  # "explore" when no target was in sight, else what drove the choice


def goal_for(view: View) -> str:
    """A one-line goal for the state file, from what the inventory still lacks."""
    inv = view.inventory
    if not inv.get("wood_pickaxe"):
        if view.see.get("table") or inv.get("wood", 0) >= 3:
            return "place a table and make a wood pickaxe"
        return "collect wood for a table and a pickaxe"
    if not inv.get("wood_sword"):
        return "make a wood sword at a table"
    if not inv.get("stone_pickaxe"):
        return "collect stone and wood for a stone pickaxe"
    if not inv.get("stone_sword"):
        return "make a stone sword"
    return "collect coal and iron, keep food and drink up"


def _wood_needed(view: View) -> int:
    inv = view.inventory
    need = sum(1 for t in TOOLS if not inv.get(t))
    if need and "table" not in view.see:
        need += 2  # a new table costs two wood in Craftax-Classic
    return min(need, 6)


def _stone_needed(view: View, done: Sequence[str]) -> int:
    inv = view.inventory
    return (sum(1 for t in ("stone_pickaxe", "stone_sword") if not inv.get(t))
            + ("place stone" not in done) + ("place furnace" not in done))


def _step_toward(view: View, kind: str, dice: Dice, unchanged: bool) -> str:
    d, dirs = view.see[kind]
    if d == 1:
        return MOVE[dirs[0]]  # blocked by the target itself: this turns the player to face it
    options = dice.shuffled("axis", dirs)
    if unchanged:  # the last move went nowhere: try the other axis first
        options = options[::-1]
    for direction in options + dice.shuffled("detour", [x for x in DIRECTIONS if x not in dirs]):
        if not view.blocked(direction, target=kind):
            return MOVE[direction]
    return MOVE[options[0]]


def explore_direction(view: View, heading: str, dice: Dice, unchanged: bool) -> str:
    if unchanged or view.blocked(heading):
        left, right = _TURN[heading]
        for d in dice.shuffled("turn", [left, right]) + [_BACK[heading]]:
            if not view.blocked(d):
                return d
    return heading


def decide(view: View, notes: Notes, dice: Dice, unchanged: bool = False) -> Decision:
    """A small competent Crafter policy over the parsed observation and the state notes."""
    if view.sleeping:
        return Decision("Noop", "sleeping")
    inv, v, front, see = view.inventory, view.vitals, view.front, view.see
    wood, stone = inv.get("wood", 0), inv.get("stone", 0)
    done = notes.done

    for mob in ("zombie", "skeleton"):
        if front == mob:
            return Decision("Do", "fight")
        if view.adjacent(mob):
            return Decision(MOVE[view.adjacent(mob)], "fight")

    if front == "water" and v.get("drink", 9) < 9:
        return Decision("Do", "drink")
    if front == "cow" and (v.get("food", 9) <= 6 or "eat" not in done):
        return Decision("Do", "eat")
    if front == "tree" and wood < _wood_needed(view):
        return Decision("Do", "wood")
    if inv.get("wood_pickaxe") and (front == "coal" or front == "stone" and
                                    stone < _stone_needed(view, done)):
        return Decision("Do", front)
    if front == "iron" and inv.get("stone_pickaxe") and not inv.get("iron"):
        return Decision("Do", "iron")

    if view.near("table"):
        for tool, cost in (("wood_pickaxe", ()), ("wood_sword", ()),
                           ("stone_pickaxe", ("stone",)), ("stone_sword", ("stone",))):
            if not inv.get(tool) and wood >= 1 and all(inv.get(c, 0) >= 1 for c in cost):
                return Decision("Make " + tool.replace("_", " ").title(), "craft")

    placeable = front in PLACEABLE
    wants_table = not inv.get("wood_pickaxe") or not inv.get("wood_sword") or (
        stone >= 1 and (not inv.get("stone_pickaxe") or not inv.get("stone_sword")))
    if wants_table and "table" not in see and placeable and wood >= 3:
        return Decision("Place Table", "table")
    if inv.get("stone_pickaxe") and stone >= 1 and "place furnace" not in done and placeable \
            and view.near("table"):
        return Decision("Place Furnace", "furnace")
    if stone >= 1 and "place stone" not in done and (placeable or front == "water") and \
            (inv.get("stone_pickaxe") or stone >= 2):
        return Decision("Place Stone", "place stone")
    if inv.get("sapling") and front == "grass":
        return Decision("Place Plant", "plant")

    if v.get("energy", 9) <= 2:
        return Decision("Sleep", "sleep")
    if v.get("drink", 9) <= 5 and "water" in see:
        return Decision(_step_toward(view, "water", dice, unchanged), "water")
    if v.get("food", 9) <= 5 and "cow" in see:
        return Decision(_step_toward(view, "cow", dice, unchanged), "cow")

    targets = []
    if wood < _wood_needed(view):
        targets.append("tree")
    if inv.get("wood_pickaxe") and stone < _stone_needed(view, done):
        targets.append("stone")
    if inv.get("wood_pickaxe") and not inv.get("coal"):
        targets.append("coal")
    if inv.get("stone_pickaxe") and not inv.get("iron"):
        targets.append("iron")
    craftable = wood >= 1 and (not inv.get("wood_pickaxe") or not inv.get("wood_sword") or (
        stone >= 1 and (not inv.get("stone_pickaxe") or not inv.get("stone_sword"))))
    if craftable:
        targets.append("table")
    if "drink" not in done:
        targets.append("water")
    if "eat" not in done:
        targets.append("cow")
    for kind in targets:
        if kind in see:
            return Decision(_step_toward(view, kind, dice, unchanged), kind)

    # Saplings come from grass one time in ten: worth a few tries while wandering.
    if front == "grass" and "collect sapling" not in done and not inv.get("sapling") and \
            dice.uniform("sapling") < 0.25:
        return Decision("Do", "sapling")
    heading = notes.heading or dice.choice("heading", DIRECTIONS)
    return Decision(MOVE[explore_direction(view, heading, dice, unchanged)], "explore")


# ----------------------------------------------------------------------------- LOG facts


def _inventory_change(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = list(dict.fromkeys(list(before) + list(after)))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys
            if after.get(k, 0) != before.get(k, 0)}


@dataclass
class LogPlan:
    """What one LOG phase writes: (file, text) appends, and the new state file text."""

    appends: list[tuple[str, str]]
    state: str


def log_facts(view: View, notes: Notes, prev_action: str | None, prev_step: int,
              unchanged: bool, roles: dict[str, str], dice: Dice) -> LogPlan:
    """New facts after ``prev_action`` and the state file's new content."""
    a = prev_action or "?"
    events, survival, mapnotes, craft = [], [], [], []
    done = list(notes.done)

    def did(what: str, note: bool = True) -> None:
        if what not in done:
            done.append(what)
            if note:
                craft.append(f"Step {prev_step}: {what}")

    stamp = f'Step {prev_step} action "{a}"'
    seen = list(notes.seen)
    if notes.inventory is not None:
        delta = _inventory_change(notes.inventory, view.inventory)
        if delta:
            parts = [f"{'+' if n > 0 else ''}{n} {k} (now {view.inventory.get(k, 0)})"
                     for k, n in delta.items()]
            events.append(f"{stamp}: " + ", ".join(parts))
            for k, n in delta.items():
                if n > 0 and a == "Do":
                    did(f"collect {k}", note=False)
                if n > 0 and _MAKE.get(a) == k:
                    did(a.lower())
            if a in _PLACE_COST and delta.get(_PLACE_COST[a][0], 0) < 0:
                did(_PLACE_COST[a][1])
                if a == "Place Table" and "table" in view.see:
                    mapnotes.append(f"Step {prev_step}: built a table, now {view.phrase('table')}")
                    seen += [] if "table" in seen else ["table"]
        elif a in _MAKE or a in _PLACE_COST:
            events.append(f"{stamp}: failed, nothing changed (missing materials or no table)")
        elif a == "Do" and view.front in ("stone", "coal", "iron", "diamond"):
            events.append(f"{stamp}: no effect on {view.front}, a better pickaxe is needed")
    if unchanged and a in MOVE_DIR:
        events.append(f"{stamp}: blocked, the observation did not change")
    if not events and prev_action:
        # Every step leaves one line, so a student learns that LOG always records something.
        events.append(f"{stamp}: no change")
    if notes.vitals is not None:
        for k in VITALS:
            old, new = notes.vitals.get(k), view.vitals.get(k)
            if old is None or new is None or old == new:
                continue
            if k == "health" and new < old:
                survival.append(f"Step {prev_step}: health fell from {old} to {new}")
            elif k == "drink" and new > old and a == "Do":
                survival.append(f"Step {prev_step}: drank water, drink {new}")
                did("drink", note=False)
            elif k == "food" and new > old and a == "Do":
                survival.append(f"Step {prev_step}: ate, food {new}")
                did("eat", note=False)
            elif k == "energy" and new > old and a in ("Sleep", "Noop"):
                did("sleep", note=False)
            elif new <= 3 < old:
                survival.append(f"Step {prev_step}: {k} is low ({new}/9)")
    for kind in view.see:
        if kind not in BORING and kind not in seen and len(mapnotes) < 3:
            seen.append(kind)
            mapnotes.append(f"Step {prev_step}: saw {kind} {view.phrase(kind)}")

    # Exploration heading: turn when walking on would bump into something or got nowhere.
    step = prev_step + 1
    heading, since = notes.heading, notes.since
    if heading is None:
        heading, since = MOVE_DIR.get(a) or dice.choice("heading", DIRECTIONS), step
    elif a == MOVE[heading] and (unchanged or view.front in SOLID or view.blocked(heading)) \
            or step - since >= 25:
        left, right = _TURN[heading]
        options = [d for d in dice.shuffled("new-heading", [left, right]) + [_BACK[heading]]
                   if not view.blocked(d)]
        heading, since = (options or [left])[0], step
    new = Notes(goal=goal_for(view), heading=heading, since=since,
                inventory=dict(view.inventory), vitals=dict(view.vitals), seen=seen, done=done)
    events_file = roles.get("events") or roles.get("map") or roles.get("craft") or DEFAULT_NOTES_FILE
    appends = [(events_file, e) for e in events]
    appends += [(roles.get("survival", events_file), s) for s in survival]
    appends += [(roles.get("map", events_file), m) for m in mapnotes]
    appends += [(roles.get("craft", events_file), c) for c in craft]
    return LogPlan(appends, new.render())


# ----------------------------------------------------------------------------- the client


def _op(name: str, *args: str) -> str:
    return f"<|{name}|>" + "|".join(args) + "<|END|>"


@dataclass
class _Prompt:
    """What the teacher takes from a request: everything comes from the message text."""

    first: str
    ops: set[str]
    files: dict[str, int]
    roles: dict[str, str]
    view: View | None
    unchanged: bool
    results: list[tuple[str, str]]
    turn: int


class TeacherClient:
    """Scripted Craftax-Classic player behind the Client contract (see the module docstring).

    seed: varies the teacher's choices (and its habits) between runs; redundant_write_rate:
    chance per LOG phase that writes of re-appending one or two lines memory already holds; useless_read_rate:
    chance per LOG or PLAN phase of reading a file and ignoring it; structure: optional
    MemoryStructure whose per-phase ops and budgets override what the prompt text shows;
    tokenizer: optional HF tokenizer for token counts (else about 4 characters a token).
    """

    def __init__(self, seed: int = 0, redundant_write_rate: float = 0.3,
                 useless_read_rate: float = 0.2, *, structure=None, tokenizer=None,
                 model_id: str = MODEL_ID):
        for name, value in (("redundant_write_rate", redundant_write_rate),
                            ("useless_read_rate", useless_read_rate)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        self.seed = int(seed)
        self.redundant_write_rate = float(redundant_write_rate)
        self.useless_read_rate = float(useless_read_rate)
        self.structure = structure
        self.tokenizer = tokenizer
        self.model_id = model_id

    # -- Client contract ---------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        out = []
        for req in requests:
            try:
                text = self.respond(req)[0]
            except Exception as exc:  # a parsing corner case must not end a rollout
                out.append(Completion("", error=f"teacher failed: {type(exc).__name__}: {exc}",
                                      model_id=self.model_id))
                continue
            out.append(Completion(text, self._count("\n".join(m.get("content", "")
                                                              for m in req.messages)),
                                  self._count(text), model_id=self.model_id))
        return out

    def respond(self, request: ChatRequest) -> tuple[str, dict]:
        """The reply to one request and the habits it shows: ``redundant_writes`` (count),
        ``useless_read`` (file or None)."""
        p = self._read_prompt(request)
        if request.phase == PHASE_LOG:
            return self._log(p)
        return self._plan(p, request.model_role)

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"])
        return max(1, len(text) // 4)

    def _read_prompt(self, request: ChatRequest) -> _Prompt:
        msgs = request.messages
        first = msgs[0]["content"] if msgs else ""
        if self.structure is not None:
            ops = set(self.structure.phase_ops(request.phase))
        else:
            ops = offered_ops(first)
        files = {}
        for m in msgs:  # the newest index wins (later user messages may show it again)
            if m.get("role") == "user":
                files.update(file_index(m.get("content", "")))
        return _Prompt(first, ops, files, assign_roles(files), parse_observation(first),
                       bool(_UNCHANGED_RE.search(first)), tool_results(msgs),
                       sum(m.get("role") == "assistant" for m in msgs))

    def _budget(self, key: str) -> int:
        if self.structure is not None:
            return int(self.structure.budgets.get(key, 2))
        return 2  # the teacher needs two turns per phase; prompts do not show the budget

    def _reader(self, p: _Prompt, file: str) -> str | None:
        if "READ" in p.ops:
            return _op("READ", file)
        if "TAIL" in p.ops:
            return _op("TAIL", file, "200")
        return None

    def _useless_read(self, p: _Prompt, dice: Dice, keep: Iterable[str]) -> str | None:
        """The bad habit: pick a file the phase has no use for (None when it does not fire)."""
        if "READ" not in p.ops or dice.uniform("useless") >= self.useless_read_rate:
            return None
        others = sorted(set(p.files) - set(keep))
        return dice.choice("useless-file", others) if others else None

    # -- LOG -----------------------------------------------------------------------------------

    def _log(self, p: _Prompt) -> tuple[str, dict]:
        dice = Dice(self.seed, "log\x00" + p.first)
        habits = {"redundant_writes": 0, "useless_read": None}
        if p.view is None or p.turn >= 2:
            return "<|DONE|>", habits
        state_file = p.roles.get("state", DEFAULT_STATE_FILE)
        events_file = p.roles.get("events")
        if p.turn == 0 and self._budget("log_turns") >= 2:
            # Look before writing: the state file, and the tail of the events file.
            reads = []
            if p.files.get(state_file, 0) > 0 and (r := self._reader(p, state_file)):
                reads.append(r)
            if events_file and p.files.get(events_file, 0) > 0 and "TAIL" in p.ops:
                reads.append(_op("TAIL", events_file, "3"))
            useless = self._useless_read(p, dice, [state_file, events_file or ""])
            if useless:
                reads.append(_op("READ", useless))
                habits["useless_read"] = useless
            if reads:
                return "\n".join(reads), habits

        prev_action, prev_step = previous_action(p.first)
        state_lines = result_lines(p.results, state_file)
        notes = Notes.parse(state_lines)
        plan = log_facts(p.view, notes, prev_action, prev_step, p.unchanged, p.roles, dice)

        lines: list[str] = []
        can_append, can_write = "APPEND" in p.ops, "WRITE" in p.ops
        # A file read only out of habit stays untouched: its facts go to the events file.
        ignored = {h.split(" ")[1] for h, _ in p.results if h.startswith("READ ")} \
            - {state_file, events_file}
        sink = events_file or DEFAULT_NOTES_FILE
        if can_append:
            lines += [_op("APPEND", sink if f in ignored else f, t) for f, t in plan.appends]
        # The state is rewritten only when it changed, and only when its old content is known
        # (shown by a read, or empty in the index): a blind rewrite could repeat the file.
        state_known = state_lines is not None or p.files.get(state_file, 0) == 0
        old_state = "\n".join(state_lines or [])
        if state_known and plan.state.strip() and plan.state.strip() != old_state.strip():
            if can_write:
                lines.append(_op("WRITE", state_file, plan.state))
            elif can_append:
                # No WRITE offered: add the changed lines, step-stamped so none repeats an old one.
                current = set(notes.render().splitlines())
                lines += [_op("APPEND", state_file, f"{ln} (step {prev_step + 1})")
                          for ln in plan.state.splitlines() if ln not in current]
        # The habit repeats what memory already holds: lines of the state file it just read go
        # back into it, or, when it read nothing, a line it appended earlier in this reply is
        # appended again. Any phase that writes can carry it, and whole phases do (not a share of
        # every phase), so the clean phases Loop 2 keeps are a fair sample of all phases.
        pool = [(state_file, ln) for ln in dict.fromkeys(state_lines or []) if ln.strip()]
        own = [(i, *m.groups()) for i, op in enumerate(lines) if (m := _APPEND_OP_RE.fullmatch(op))]
        n_dup = 0
        if can_append and lines and (pool or own) and dice.uniform("dup") < self.redundant_write_rate:
            n_dup = 1 + int(len(pool or own) > 1 and dice.uniform("dup-count") < 0.5)
        if n_dup and pool:
            dups = dice.shuffled("dup-lines", pool)[:n_dup]
            for f, ln in dups:
                at = int(dice.uniform(f"dup-at/{ln}") * (len(lines) + 1))
                lines.insert(at, _op("APPEND", f, ln))
            habits["redundant_writes"] = len(dups)
        elif n_dup:
            picks = sorted(dice.shuffled("dup-own", own)[:n_dup], reverse=True)
            for i, f, t in picks:  # right after the original, from the end so indices hold
                lines.insert(i + 1, _op("APPEND", f, t))
            habits["redundant_writes"] = len(picks)
        lines.append("<|DONE|>")
        return "\n".join(lines), habits

    # -- PLAN ----------------------------------------------------------------------------------

    def _plan(self, p: _Prompt, role: str) -> tuple[str, dict]:
        dice = Dice(self.seed, "plan\x00" + p.first)
        habits = {"redundant_writes": 0, "useless_read": None}
        if p.view is None:
            return _op("ACTION", "Noop"), habits
        state_file = p.roles.get("state", DEFAULT_STATE_FILE)
        if p.turn == 0 and role != ROLE_GAMEPLAY and self._budget("plan_turns") >= 2:
            reads = []
            if p.files.get(state_file, 0) > 0:
                first_guess = decide(p.view, Notes(), dice, p.unchanged)
                if first_guess.kind == "explore" and "SEARCH" in p.ops:
                    # The heading line is always there once LOG has run: never an empty search.
                    reads.append(_op("SEARCH", state_file, "Heading"))
                elif (r := self._reader(p, state_file)):
                    reads.append(r)
            useless = self._useless_read(p, dice, [state_file])
            if useless:
                reads.append(_op("READ", useless))
                habits["useless_read"] = useless
            if reads:
                return "\n".join(reads), habits
        notes = Notes.parse(result_lines(p.results, state_file))
        action = decide(p.view, notes, dice, p.unchanged).action
        return _op("ACTION", action), habits


# ----------------------------------------------------------------------------- warm-start data


def _trace_files(run_dir: str) -> list[str]:
    out = []
    root = storage.join(run_dir, "traces")
    for env in storage.listdir(root):
        for task in storage.listdir(storage.join(root, env)):
            folder = storage.join(root, env, task)
            names = [n for n in storage.listdir(folder) if re.fullmatch(r"ep_\d+\.jsonl", n)]
            out += [storage.join(folder, n) for n in sorted(names, key=lambda n: int(n[3:-6]))]
    return out


def phase_conversation(phase: dict) -> list[dict] | None:
    """The chat of one LOG or PLAN phase record, user first and assistant last (None if empty
    or if a turn failed)."""
    turns = phase.get("turns") or []
    if not turns or any(t.get("error") for t in turns):
        return None
    conv = []
    for t in turns:
        response = t.get("response", "")
        if t.get("handoff") and t.get("committed_action") is not None:
            # Two-model: the chat carried the specialist's message without its action.
            response = strip_action(response) or CONSULTATION_DONE
        conv.append({"role": "user", "content": t.get("prompt", "")})
        conv.append({"role": "assistant", "content": response})
    return conv


def teacher_examples(run_dir: str) -> list[dict]:
    """ShareGPT conversations, one per LOG and PLAN phase in the run folder's traces.

    ``{"conversations": [{"role": "user", ...}, {"role": "assistant", ...}, ...],
    "id": "ep<k>/s<step>/<phase>"}`` in episode, step, phase (LOG then PLAN) order.
    """
    examples = []
    for path in _trace_files(run_dir):
        for raw in storage.read_text(path).splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            for phase in (PHASE_LOG, PHASE_PLAN):
                conv = phase_conversation(line.get(phase) or {})
                if conv:
                    examples.append({"conversations": conv,
                                     "id": f"ep{line['episode']}/s{line['step']}/{phase}"})
    return examples
