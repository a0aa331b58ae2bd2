"""Deterministic context blocks: short warnings computed from the episode, not by the model.

Each block is a pure function ``fn(history, phase, **params) -> str`` (empty string = nothing to
say). A MemoryStructure turns blocks on per phase and sets their parameters; Loop 1 adds or tunes
them by editing that document, never by writing code. Upstream v0 has the unchanged-observation
warning and the NetHack/MiniHack map analysis; the others are the deterministic trackers that
AutoMem's Loop 1 grew into the final scaffolds (inventory diff, vitals urgency, repetition and
oscillation alerts, recent actions, stuck counter), written here as small reusable functions.
Which blocks exist, their parameters and default phases are declared as data in
``automem_jax.memory.schema.CONTEXT_BLOCKS``; importing this module fails if the two disagree.
"""
from __future__ import annotations

import inspect
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from automem_jax.memory.schema import CONTEXT_BLOCKS

# ------------------------------------------------------------------------- episode history


def obs_text(long_term: str, short_term: str) -> str:
    """The observation as the agent sees it (upstream: long-term, newline, short-term)."""
    parts = [p for p in (long_term, short_term) if p]
    return "\n".join(parts) if parts else "(no observation)"


@dataclass
class EpisodeHistory:
    """What blocks may look at: recent observations and actions, plus a few running counts.

    ``observations[i]`` pairs with ``actions[i]`` (the action taken after seeing it); only the
    last ``window`` of each is kept, so memory stays bounded over 10^5-step NetHack episodes.
    """

    window: int = 64
    step: int = -1  # index of the current observation; -1 before the first one
    observations: deque = field(default_factory=deque)  # (long_term, short_term)
    actions: deque = field(default_factory=deque)  # (raw, validated)
    unchanged_streak: int = 0

    def __post_init__(self):
        self.observations = deque(self.observations, maxlen=self.window)
        self.actions = deque(self.actions, maxlen=self.window)

    def observe(self, long_term: str, short_term: str) -> None:
        prev = self.current_text if self.observations else None
        self.observations.append((long_term or "", short_term or ""))
        self.step += 1
        if prev is not None and self.current_text.strip() == prev.strip():
            self.unchanged_streak += 1
        else:
            self.unchanged_streak = 0

    def record_action(self, raw: str, validated: str) -> None:
        self.actions.append((raw, validated))

    @property
    def current_text(self) -> str:
        return obs_text(*self.observations[-1]) if self.observations else ""

    @property
    def previous_text(self) -> str | None:
        return obs_text(*self.observations[-2]) if len(self.observations) >= 2 else None

    @property
    def last_action(self) -> str | None:
        return self.actions[-1][1] if self.actions else None

    @classmethod
    def from_steps(cls, observations: Iterable[tuple[str, str] | str],
                   actions: Iterable[str | tuple[str, str]] = (), window: int = 64
                   ) -> "EpisodeHistory":
        """Replay an episode (handy for tests and for re-rendering traces)."""
        h = cls(window=window)
        acts = [a if isinstance(a, tuple) else (a, a) for a in actions]
        for i, o in enumerate(observations):
            h.observe(*(o if isinstance(o, tuple) else (o, "")))
            if i < len(acts):
                h.record_action(*acts[i])
        return h


# ------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Block:
    name: str
    fn: Callable[..., str]
    params: dict  # name -> default value; the type of the default is the accepted type
    phases: tuple[str, ...]  # where the block is shown unless the structure says otherwise
    doc: str


# The implemented blocks. Names, parameters, default phases and docs are declared in
# memory.schema.CONTEXT_BLOCKS (what a structure may name); this module only adds the code.
BLOCKS: dict[str, Block] = {}


def register(name: str):
    """Attach ``fn(history, phase, **params)`` to the declared block ``name``."""
    def deco(fn):
        spec = CONTEXT_BLOCKS.get(name)
        if spec is None:
            raise ImportError(f"context block {name!r} is implemented but not declared in "
                              "automem_jax.memory.schema.CONTEXT_BLOCKS")
        if name in BLOCKS:
            raise ImportError(f"context block {name!r} is implemented twice")
        args = list(inspect.signature(fn).parameters)[2:]
        if sorted(args) != sorted(spec.params):
            raise ImportError(f"context block {name!r} takes parameters {args} but is declared "
                              f"with {list(spec.params)}")
        BLOCKS[name] = Block(name, fn, dict(spec.params), spec.phases, spec.doc)
        return fn
    return deco


def render_block(name: str, history: EpisodeHistory, phase: str, params: dict | None = None) -> str:
    block = BLOCKS[name]
    kwargs = {**block.params, **(params or {})}
    try:
        return block.fn(history, phase, **kwargs)
    except Exception as exc:  # a parsing corner case must not stop an episode
        return f"[context block {name} failed: {type(exc).__name__}]"


# ------------------------------------------------------------------------- helpers

_DIRS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1),
         "northeast": (-1, 1), "northwest": (-1, -1), "southeast": (1, 1), "southwest": (1, -1)}
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east",
             "northeast": "southwest", "southwest": "northeast",
             "northwest": "southeast", "southeast": "northwest"}


def move_direction(action: str) -> str | None:
    """'Move West', 'far west', 'west' -> 'west'; anything that is not a move -> None."""
    words = action.lower().split()
    while words and words[0] in ("move", "far", "go"):
        words = words[1:]
    if len(words) == 2 and words[0] in ("north", "south") and words[1] in ("east", "west"):
        words = [words[0] + words[1]]
    return words[0] if len(words) == 1 and words[0] in _DIRS else None


def direction_word(dr: int, dc: int) -> str:
    ns = "north" if dr < 0 else "south" if dr > 0 else ""
    ew = "east" if dc > 0 else "west" if dc < 0 else ""
    return (ns + ew) or "here"


# ------------------------------------------------------------------------- blocks


@register("unchanged_observation")
def unchanged_observation(h: EpisodeHistory, phase: str, critical_after: int) -> str:
    """Warn when the observation is identical to the previous one (the action had no effect)."""
    n = h.unchanged_streak
    if n == 0:
        return ""
    if n >= critical_after:
        text = (f"CRITICAL WARNING: the observation has not changed for {n} actions in a row. "
                "You are STUCK: nothing you did recently had any effect. Switch to a clearly "
                "different approach and do not repeat any of your recent actions.")
    else:
        text = ("WARNING: this observation is EXACTLY the same as at the previous step, so your "
                "last action most likely did nothing. That is worth recording: the action may be "
                "invalid or impossible in this situation.")
    if phase == "plan" and h.last_action:
        text += (f"\nThe last action the game executed was '{h.last_action}'. "
                 "Do NOT repeat it; pick something else.")
    return text


def _no_effect(h: EpisodeHistory, n: int) -> int:
    """How many of the last n actions left the observation unchanged.

    The j-th last action was taken on observation [-j-1] and produced observation [-j].
    """
    texts = [obs_text(*o).strip() for o in h.observations]
    return sum(1 for j in range(1, n + 1) if j < len(texts) and texts[-j - 1] == texts[-j])


@register("repetition")
def repetition(h: EpisodeHistory, phase: str, repeat_threshold: int, oscillation_window: int,
               oscillation_flips: int) -> str:
    """Alert on the same action chosen again and again, or on moves that go back and forth."""
    acts = [v for _, v in h.actions]
    out = []
    if repeat_threshold > 0 and len(acts) >= repeat_threshold:
        tail = acts[-repeat_threshold:]
        if len(set(tail)) == 1:
            idle = _no_effect(h, repeat_threshold)
            msg = f"You chose '{tail[0]}' {repeat_threshold} times in a row"
            msg += f", and {idle} of those changed nothing." if idle else "."
            out.append("=== REPETITION ALERT ===\n" + msg
                       + " Unless it is clearly making progress, do something different.")
    moves = [d for d in (move_direction(a) for a in acts[-oscillation_window:]) if d]
    flips = sum(1 for a, b in zip(moves, moves[1:]) if _OPPOSITE[a] == b)
    if oscillation_flips > 0 and flips >= oscillation_flips:
        out.append("=== OSCILLATION WARNING ===\nYour recent moves go back and forth ("
                   + " -> ".join(moves) + "). That gets you nowhere: choose a direction you "
                   "have not tried yet and keep to it.")
    return "\n".join(out)


_INV_HEADER_RE = re.compile(r"^\s*(your\s+)?inventory\s*:?\s*$", re.IGNORECASE)
_INV_COUNT_RE = re.compile(r"^\s*-\s*(.+?)\s*:\s*(\d+)\s*$")
_INV_LETTER_RE = re.compile(r"^\s*[a-zA-Z$]\s*[:\-]\s+(.+?)\s*$")


def parse_inventory(text: str) -> Counter | None:
    """Item -> count from a Crafter ('- wood: 2') or NetHack ('a: 2 food rations') inventory."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _INV_HEADER_RE.match(line):
            items: Counter = Counter()
            for entry in lines[i + 1:]:
                if not entry.strip():
                    break
                m = _INV_COUNT_RE.match(entry)
                if m:
                    items[m.group(1)] += int(m.group(2))
                    continue
                m = _INV_LETTER_RE.match(entry)
                items[m.group(1) if m else entry.strip()] += 1
            return items
    if "nothing in your inventory" in text.lower():
        return Counter()
    return None


@register("inventory_change")
def inventory_change(h: EpisodeHistory, phase: str) -> str:
    """What the last action added to or removed from the inventory."""
    if len(h.observations) < 2:
        return ""
    before = parse_inventory(obs_text(*h.observations[-2]))
    after = parse_inventory(obs_text(*h.observations[-1]))
    if before is None or after is None:
        return ""
    gained = after - before
    lost = before - after
    if not gained and not lost:
        return ""
    lines = ["=== INVENTORY CHANGES ==="]
    if gained:
        lines.append("GAINED: " + ", ".join(f"{k} +{v}" for k, v in sorted(gained.items())))
    if lost:
        lines.append("LOST: " + ", ".join(f"{k} -{v}" for k, v in sorted(lost.items())))
    return "\n".join(lines)


_VITAL_RE = re.compile(r"\b(health|food|drink|energy)\s*:\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_HP_RE = re.compile(r"\bHP:\s*(\d+)\s*\(\s*(\d+)\s*\)")
_HUNGER_RE = re.compile(r"\b(Hungry|Weak|Fainting|Fainted)\b")
_VITAL_FIX = {
    "health": "avoid fights and keep food, drink and energy up so health recovers",
    "food": "eat (a cow, or a ripe plant)",
    "drink": "drink from water",
    "energy": "sleep, somewhere enclosed and safe",
}


@register("vitals_urgency")
def vitals_urgency(h: EpisodeHistory, phase: str, low: int, critical: int,
                   hp_fraction: float) -> str:
    """Flag low health/food/drink/energy (Crafter) or low HP and hunger (NetHack)."""
    text = h.current_text
    lines = []
    for name, val, top in _VITAL_RE.findall(text):
        v = int(val)
        if v <= critical:
            lines.append(f"- {name} is {v}/{top}: CRITICAL, {_VITAL_FIX[name.lower()]} right now.")
        elif v <= low:
            lines.append(f"- {name} is {v}/{top}: low, {_VITAL_FIX[name.lower()]} soon.")
    m = _HP_RE.search(text)
    if m and int(m.group(2)) > 0 and int(m.group(1)) <= hp_fraction * int(m.group(2)):
        lines.append(f"- HP is {m.group(1)} of {m.group(2)}: retreat, heal, or pray if desperate.")
    m = _HUNGER_RE.search(text)
    if m:
        lines.append(f"- You are {m.group(1)}: eat something now.")
    return "=== SURVIVAL URGENCY ===\n" + "\n".join(lines) if lines else ""


@register("recent_actions")
def recent_actions(h: EpisodeHistory, phase: str, n: int) -> str:
    """The last n actions, oldest first, with invalid outputs shown next to what ran."""
    acts = list(h.actions)[-n:] if n > 0 else []
    if not acts:
        return ""
    first = h.step - len(acts)
    rows = []
    for i, (raw, done) in enumerate(acts):
        note = f" (you wrote '{raw}', which was not valid)" if raw != done else ""
        rows.append(f"step {first + i}: {done}{note}")
    return "=== RECENT ACTIONS (oldest first) ===\n" + "\n".join(rows)


_POS_RE = re.compile(r"\(x=(\d+),\s*y=(\d+)\)")


@register("stuck_counter")
def stuck_counter(h: EpisodeHistory, phase: str, threshold: int) -> str:
    """Steps spent on one tile (NetHack cursor), else steps without any change at all."""
    positions = [_POS_RE.search(obs_text(*o)) for o in h.observations]
    if positions and positions[-1]:
        here = positions[-1].groups()
        n = 0
        for m in reversed(positions[:-1]):
            if not m or m.groups() != here:
                break
            n += 1
        if n >= threshold:
            return (f"=== STUCK COUNTER ===\nYou have stayed at (x={here[0]}, y={here[1]}) for "
                    f"{n} steps. Move somewhere new.")
        return ""
    if h.unchanged_streak >= threshold:
        return (f"=== STUCK COUNTER ===\nNothing in the observation has changed for "
                f"{h.unchanged_streak} steps.")
    return ""


# NetHack map characters by what stepping onto them means.
_WALLS = set("-|")
_DANGER = set("}^")
_FLOOR = set(".#{_")
_ITEMS = set("$)[!?/=\"(*%~")


def _tile_kind(ch: str, upstream: bool = False) -> str:
    if ch == ">":
        return "stairs_down"
    if ch == "<":
        return "stairs_up"
    if ch == "+":
        return "door"
    if ch in _WALLS:
        return "wall"
    if ch == " ":
        return "rock"
    if ch in _DANGER:
        return "danger"
    if ch in _FLOOR:
        return "floor"
    if ch in _ITEMS:
        return "item"
    if ch.isalpha() or (ch == "@" and not upstream):  # upstream: another '@' is an unknown tile
        return "monster"
    return "other"


def _looks_like_map_row(line: str) -> bool:
    s = line.rstrip()
    if len(s) < 3:
        return False
    letters = sum(1 for c in s if c.isalpha())
    return letters / len(s) < 0.5


def find_map(text: str) -> tuple[list[str], int, int] | None:
    """(map rows, row of '@', column of '@'), keeping every row so geometry stays exact.

    Prefers the ``map:`` section of BALROG's NetHack observation; otherwise any line that has an
    '@' and is mostly non-letters is taken as the player's row.
    """
    lines = text.split("\n")
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if line.strip().lower() == "map:":
            start = i + 1
            for j in range(start, len(lines)):
                if lines[j].strip().lower() in ("inventory:", "your inventory:"):
                    end = j
                    break
            break
    rows = lines[start:end]
    for r, line in enumerate(rows):
        c = line.find("@")
        if c >= 0 and _looks_like_map_row(line):
            return rows, r, c
    return None


def _letter_share(line: str) -> float:
    return sum(1 for c in line if c.isalpha() and c != "@") / max(len(line), 1)


def find_map_upstream(text: str) -> tuple[list[str], int, int] | None:
    """Upstream's ``parse_nle_map`` reading, quirks kept: the player's row is the first line of the
    whole text with an '@' that is at least 3 long and under half letters (not counting '@'); the
    map is the lines within 15 above and 14 below it that are not blank and are under 55% letters
    (the player's row always), right-stripped. Dropping blank and text rows shifts the rows above
    and below, so a neighbour may be read from the wrong line."""
    lines = text.split("\n")
    pr = pc = None
    for i, line in enumerate(lines):
        c = line.find("@")
        s = line.rstrip()
        if c >= 0 and len(s) >= 3 and _letter_share(s) < 0.5:
            pr, pc = i, c
            break
    if pr is None:
        return None
    rows, player_row = [], 0
    for i in range(max(0, pr - 15), min(len(lines), pr + 15)):
        s = lines[i].rstrip()
        if s and (_letter_share(s) < 0.55 or i == pr):
            if i == pr:
                player_row = len(rows)
            rows.append(s)
    return rows, player_row, pc


MAP_STYLES = ("upstream", "corrected")


@register("map_analysis")
def map_analysis(h: EpisodeHistory, phase: str, max_far_stairs: int, style: str) -> str:
    """What surrounds '@' on a NetHack/MiniHack map: passable, blocked, doors, monsters, stairs.

    style "upstream" reads the map as upstream's parse_nle_map (see find_map_upstream); "corrected"
    reads the map: section with every row kept, treats the blank past a row's end as rock and
    another '@' as a monster.
    """
    if style not in MAP_STYLES:
        raise ValueError(f"map_analysis style must be one of {MAP_STYLES}, got {style!r}")
    upstream = style == "upstream"
    found = (find_map_upstream if upstream else find_map)(h.current_text)
    if found is None:
        return ""
    rows, pr, pc = found

    def at(r: int, c: int) -> str | None:
        if r < 0 or r >= len(rows) or c < 0:
            return None
        if c < len(rows[r]):
            return rows[r][c]
        return None if upstream else " "  # upstream: past the stripped row is the map's edge

    stairs, monsters, doors, danger, can, blocked = [], [], [], [], [], []
    for name, (dr, dc) in _DIRS.items():
        ch = at(pr + dr, pc + dc)
        if ch is None:
            blocked.append(f"{name} (edge of map)")
            continue
        kind = _tile_kind(ch, upstream)
        if kind == "stairs_down":
            stairs.append(f"{name} -> '>' STAIRS DOWN, go there")
            can.append(f"{name} (stairs down '>')")
        elif kind == "stairs_up":
            stairs.append(f"{name} -> '<' stairs up")
            can.append(f"{name} (stairs up '<')")
        elif kind == "door":
            doors.append(f"{name} -> '+' closed door (use 'open')")
            can.append(f"{name} (door '+')")
        elif kind in ("floor", "item"):
            can.append(f"{name} ('{ch}')")
        elif kind == "wall":
            blocked.append(f"{name} (wall '{ch}')")
        elif kind == "rock":
            blocked.append(f"{name} (rock/void)")
        elif kind == "danger":
            danger.append(f"{name} -> '{ch}' DANGEROUS")
        elif kind == "monster":
            monsters.append(f"{name} -> '{ch}' monster (move into it to attack)")
            can.append(f"{name} (monster '{ch}')")
        else:
            blocked.append(f"{name} ('{ch}')")
    far = []
    for r, line in enumerate(rows):
        for c, ch in enumerate(line):
            if ch == ">" and max(abs(r - pr), abs(c - pc)) > 1:
                d = max(abs(r - pr), abs(c - pc))
                far.append(f"'>' about {d} tiles {direction_word(r - pr, c - pc)}")
    out = ["=== MAP ANALYSIS ==="]
    if stairs:
        out.append("*** STAIRS ADJACENT: " + "; ".join(stairs))
    if far:
        out.append("*** STAIRS ON MAP: " + "; ".join(far[:max_far_stairs]))
    if monsters:
        out.append("MONSTERS ADJACENT: " + "; ".join(monsters))
    if doors:
        out.append("DOORS: " + "; ".join(doors))
    if danger:
        out.append("DANGER: " + "; ".join(danger))
    if can:
        out.append("CAN MOVE: " + ", ".join(can))
    if blocked:
        out.append("BLOCKED: " + ", ".join(blocked))
    return "\n".join(out)


def _check_declared() -> None:
    # A declared block without code would validate in a structure and then fail in every episode.
    missing = [n for n in CONTEXT_BLOCKS if n not in BLOCKS]
    if missing:
        raise ImportError(f"context blocks declared in automem_jax.memory.schema but not "
                          f"implemented here: {missing}")


_check_declared()
