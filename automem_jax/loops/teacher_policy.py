"""The scripted teacher's Crafter policy: the game action from a parsed observation and the state
notes (``decide``), and what a LOG phase writes after an action (``log_facts``).

Every choice is a pure function of (seed, phase prompt) through ``Dice``, so the teacher's replies
do not depend on batching or on call order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from automem_jax.envs.describe_crafter import ITEMS, VITALS
from automem_jax.loops.teacher_prompt import DEFAULT_NOTES_FILE, SOLID, Notes, View

DIRECTIONS = ("north", "east", "south", "west")
MOVE = {d: f"Move {d.capitalize()}" for d in DIRECTIONS}
MOVE_DIR = {a: d for d, a in MOVE.items()}
_TURN = {"north": ("east", "west"), "south": ("west", "east"),
         "east": ("south", "north"), "west": ("north", "south")}
_BACK = {"north": "south", "south": "north", "east": "west", "west": "east"}
PLACEABLE = frozenset({"grass", "sand", "path"})
# Kinds not worth a map note: the ground itself.
BORING = frozenset({"grass", "sand", "path", "nothing", "arrow"})
TOOLS = ("wood_pickaxe", "wood_sword", "stone_pickaxe", "stone_sword")
_MAKE = {"Make " + t.replace("_", " ").title(): t for t in ITEMS if "_" in t}
_PLACE_COST = {"Place Table": ("wood", "place table"), "Place Stone": ("stone", "place stone"),
               "Place Furnace": ("stone", "place furnace"), "Place Plant": ("sapling", "place plant")}


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
