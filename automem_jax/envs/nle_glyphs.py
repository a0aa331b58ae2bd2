"""BALROG's glyph and cursor text for NetHack / MiniHack, reimplemented in Python/NumPy.

BALROG describes NLE observations with the C++ ``NLELanguageObsv`` of ``balrog-nle`` 0.9.0
(``win/rl/language_wrapper/main.cpp``). This module reproduces two of its outputs byte for byte,
as ``str`` (the C++ returns ``bytes``; all of it is ASCII):

* :func:`text_glyphs` -- what is around the player: every monster, object, statue, effect and
  notable map feature (doors, stairs, altars, fountains, ...) anywhere on the map, plus the walls,
  traps, doorways and unexplored area met along the 8 compass rays (up to 9 steps; walls and
  unexplored area stop a ray, closed doors do not). Positions are coarse distance buckets
  (adjacent / very near / near / far / very far, by Chebyshev distance) and 16 compass points.
* :func:`text_cursor` -- what the tty cursor points at. Like the C++, it returns only the
  description; BALROG's layout appends the ``(x=C, y=R)`` line itself.

Names are the C++'s own (``alter``, ``southwest corner``, ``vertical closed door``, unidentified
objects by appearance, ...), including its quirks, since the goal is identical text.
"""
from __future__ import annotations

import functools

import numpy as np

ROWS, COLS = 21, 79
RAY_STEPS = 9  # the C++ marches offsets 1..9

# Sort order of the C++: far buckets first, then the 16 points clockwise from north.
DISTANCES = ("very far", "far", "near", "very near", "adjacent")
DIRECTIONS = (
    "north", "northnortheast", "northeast", "eastnortheast",
    "east", "eastsoutheast", "southeast", "southsoutheast",
    "south", "southsouthwest", "southwest", "westsouthwest",
    "west", "westnorthwest", "northwest", "northnorthwest",
)
_DIR_INDEX = {d: i for i, d in enumerate(DIRECTIONS)}

# Names the C++ gives each NetHack 3.6 map symbol (defsym order, S_stone .. S_explode9).
CMAP_NAMES = (
    "dark area", "vertical wall", "horizontal wall", "northwest room corner",
    "northeast room corner", "southwest corner", "southeast corner", "cross wall",
    "t up wall", "t down wall", "t west wall", "t east wall",
    "doorway", "vertical open door", "horizontal open door", "vertical closed door",
    "horizontal closed door", "bars", "tree", "room floor",
    "dark room floor", "corridor floor", "lit corridor floor", "stairs up",
    "stairs down", "ladder up", "ladder down", "alter",
    "grave", "throne", "sink", "fountain",
    "pool", "ice", "lava", "vertical lowered drawbridge",
    "horizontal lowered drawbridge", "vertical raised drawbridge", "horizontal raised drawbridge",
    "air floor",
    "cloud floor", "water floor", "arrow trap", "dart trap",
    "falling rock trap", "squeaky board", "bear trap", "land mine",
    "rolling boulder trap", "sleeping gas trap", "rust trap", "fire trap",
    "pit", "spiked pit", "hole", "trap door",
    "teleportation trap", "level teleporter", "magic portal", "web",
    "statue trap", "magic trap", "anti magic trap", "polymorph trap",
    "vibrating square", "vertical beam", "horizontal beam", "left slant beam",
    "right slant beam", "dig beam", "flash beam", "boom left",
    "boom right", "shield 1", "shield 2", "shield 3",
    "shield 4", "poison cloud", "valid position", "swallow top left",
    "swallow top center", "swallow top right", "swallow middle left", "swallow middle right",
    "swallow bottom left", "swallow bottom center", "swallow bottom right", "explosion top left",
    "explosion top center", "explosion top right", "explosion middle left",
    "explosion middle center", "explosion middle right", "explosion bottom left",
    "explosion bottom center", "explosion bottom right",
)
_FLOORS = frozenset({"room floor", "dark room floor", "corridor floor", "lit corridor floor"})
# Features listed wherever they are on the map (never on the rays).
_LISTED_ANYWHERE = frozenset({
    "horizontal closed door", "vertical closed door", "bars", "tree", "stairs up", "stairs down",
    "ladder up", "ladder down", "alter", "grave", "throne", "sink", "fountain", "pool", "ice",
    "lava", "vertical raised drawbridge", "horizontal raised drawbridge",
})
# Ray features that end a ray. Doors and drawbridges are in the C++ set too, but they are never
# ray features (listed anywhere instead), so in effect rays pass through them.
_BLOCKING = frozenset({
    "dark area", "vertical wall", "horizontal wall", "northwest room corner",
    "northeast room corner", "southwest corner", "southeast corner", "cross wall", "t up wall",
    "t down wall", "t west wall", "t east wall",
})
_SWALLOW = ("swallow top left", "swallow top center", "swallow top right", "swallow middle left",
            "swallow middle right", "swallow bottom left", "swallow bottom center",
            "swallow bottom right")
_ZAP = ("horizontal zap beam", "vertical zap beam", "left slant zap beam", "right slant zap beam")
_EXPLOSION = CMAP_NAMES[87:96]
# NetHack's def_warnsyms explanations, warning levels 0..5.
_WARNINGS = tuple(f"unknown creature causing you {w}"
                  for w in ("worry", "concern", "anxiety", "disquiet", "alarm", "dread"))


def position_words(dx: int, dy: int) -> tuple[str, str]:
    """(distance bucket, 16-point direction) of an offset; ``dy`` > 0 is north. (0, 0) gives ''."""
    diag = min(abs(dx), abs(dy))
    if diag > 0:
        if dy < 0 and dx < 0:
            diagonal = "southwest"
        elif dy < 0 and dx > 0:
            diagonal = "southeast"
        elif dy > 0 and dx < 0:
            diagonal = "northwest"
        else:
            diagonal = "northeast"
    else:
        diagonal = ""
    oy = dy - diag if dy > 0 else dy + diag
    ox = dx - diag if dx > 0 else dx + diag
    dist = max(abs(dx), abs(dy))
    if dist == 1:
        bucket = "adjacent"
    elif dist == 2:
        bucket = "very near"
    elif 2 < dist < 6:
        bucket = "near"
    elif 5 < dist < 20:
        bucket = "far"
    else:
        bucket = "very far"  # also the player's own cell, as in the C++
    ns = "south" if oy < 0 else ("north" if oy > 0 else "")
    ew = "west" if ox < 0 else ("east" if ox > 0 else "")
    return bucket, ns + ew + diagonal


@functools.lru_cache(maxsize=None)
def pluralize(noun: str) -> str:
    """The C++ pluralizer, quirks included."""
    if noun.endswith(("boots", "shoes", "scales", "lenses", "bars")):
        return noun
    special = {"can of grease": "cans of grease", "Master of Thieves": "Masters of Thieves",
               "ice": "area of ice", "lava": "area of lava"}
    if noun in special:
        return special[noun]
    for prefix, repl in (("boom ", "booms "), ("shield ", "shields "), ("swallow ", "swallows "),
                         ("scroll ", "scrolls "), ("worthless piece ", "worthless pieces "),
                         ("unknown creature ", "unknown creatures ")):
        if noun.startswith(prefix):
            return repl + noun[len(prefix):]
    last, prev = noun[-1], noun[-2] if len(noun) > 1 else ""
    if last == "y" and prev not in "aeiou":
        return noun[:-1] + "ies"
    # The C++'s "ch" test reads the byte before the string (always NUL), so "-ch" takes plain "s".
    if last in "zx" or (prev == "s" and last in "hs"):
        return noun + "es"
    if last == "f":
        return (noun[:-2] if prev == "f" else noun[:-1]) + "ves"
    if last == "s":
        return noun + "es"
    return noun + "s"


def _object_name(nh, idx: int) -> str:
    d = nh.objdescr.from_idx(idx)
    name, descr = d.oc_name or "", d.oc_descr or ""
    cls = ord(nh.objclass(idx).oc_class)
    if cls in (nh.ILLOBJ_CLASS, nh.WEAPON_CLASS, nh.COIN_CLASS, nh.ROCK_CLASS, nh.BALL_CLASS,
               nh.CHAIN_CLASS):
        return name
    if cls in (nh.ARMOR_CLASS, nh.TOOL_CLASS):
        return descr or name
    if cls == nh.RING_CLASS:
        return descr + " ring"
    if cls == nh.AMULET_CLASS:
        return descr if "Amulet" in descr else descr + " amulet"
    if cls == nh.FOOD_CLASS:
        return name + descr
    if cls == nh.POTION_CLASS:
        return descr + " potion"
    if cls == nh.SCROLL_CLASS:
        return "scroll labeled " + descr
    if cls == nh.SPBOOK_CLASS:
        return descr + " spellbook"
    if cls == nh.WAND_CLASS:
        return descr + " wand"
    if cls == nh.GEM_CLASS:
        # Gems whose name does not repeat the colour get it in front ("gray luckstone").
        return name if descr in name else descr + " " + name
    if cls == nh.VENOM_CLASS:
        return "splash of " + name
    return ""


class _Tables:
    """Per-glyph names and masks plus per-offset position words, built once."""

    def __init__(self):
        import nle.nethack as nh

        n = nh.MAX_GLYPH
        mons = [nh.permonst(i).mname for i in range(nh.NUMMONS)]
        anywhere = [""] * n  # the C++ "fullscreen" names
        ray = [""] * n       # the C++ "visual" names (map symbols met along rays)
        for g in range(n):
            if g >= nh.GLYPH_STATUE_OFF:
                anywhere[g] = mons[g - nh.GLYPH_STATUE_OFF] + " statue"
            elif g >= nh.GLYPH_WARNING_OFF:
                anywhere[g] = _WARNINGS[g - nh.GLYPH_WARNING_OFF]
            elif g >= nh.GLYPH_SWALLOW_OFF:
                anywhere[g] = _SWALLOW[(g - nh.GLYPH_SWALLOW_OFF) % 8]
            elif g >= nh.GLYPH_ZAP_OFF:
                anywhere[g] = _ZAP[(g - nh.GLYPH_ZAP_OFF) % 4]
            elif g >= nh.GLYPH_EXPLODE_OFF:
                anywhere[g] = _EXPLOSION[(g - nh.GLYPH_EXPLODE_OFF) % nh.MAXEXPCHARS]
            elif g >= nh.GLYPH_CMAP_OFF:
                s = CMAP_NAMES[g - nh.GLYPH_CMAP_OFF]
                if s not in _FLOORS:
                    if s in _LISTED_ANYWHERE:
                        anywhere[g] = s
                    else:
                        ray[g] = s
            elif g >= nh.GLYPH_OBJ_OFF:
                anywhere[g] = _object_name(nh, g - nh.GLYPH_OBJ_OFF)
            elif g >= nh.GLYPH_RIDDEN_OFF:
                anywhere[g] = "ridden " + mons[g - nh.GLYPH_RIDDEN_OFF]
            elif g >= nh.GLYPH_BODY_OFF:
                anywhere[g] = mons[g - nh.GLYPH_BODY_OFF] + " corpse"
            elif g >= nh.GLYPH_DETECT_OFF:
                anywhere[g] = "detected " + mons[g - nh.GLYPH_DETECT_OFF]
            elif g >= nh.GLYPH_INVIS_OFF:
                anywhere[g] = "invisible creature"
            elif g >= nh.GLYPH_PET_OFF:
                anywhere[g] = "tame " + mons[g - nh.GLYPH_PET_OFF]
            else:
                anywhere[g] = mons[g]
        self.anywhere = anywhere
        self.ray = ray
        self.anywhere_mask = np.array([bool(s) for s in anywhere])
        self.ray_mask = np.array([bool(s) for s in ray])
        self.ray_block = np.array([s in _BLOCKING for s in ray])
        # Position words for every offset on the map, indexed [dx + COLS, dy + ROWS].
        dist_idx = np.zeros((2 * COLS, 2 * ROWS), np.int16)
        dir_idx = np.full((2 * COLS, 2 * ROWS), -1, np.int16)
        dist_order = {d: i for i, d in enumerate(DISTANCES)}
        for x in range(2 * COLS):
            for y in range(2 * ROWS):
                b, d = position_words(x - COLS, y - ROWS)
                dist_idx[x, y] = dist_order[b]
                dir_idx[x, y] = _DIR_INDEX.get(d, -1)
        self.dist_idx = dist_idx
        self.dir_idx = dir_idx
        # Sort key of the C++ (bucket, then direction); -1 where it would drop the entry.
        self.sort_key = np.where(dir_idx >= 0, dist_idx * 16 + dir_idx, -1)


@functools.lru_cache(maxsize=1)
def tables() -> _Tables:
    return _Tables()


_RAYS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))  # C++ order, E first


def _join_directions(dirs: list[str]) -> str:
    if len(dirs) == 1:
        return dirs[0]
    if len(dirs) == 2:
        return f"{dirs[0]} and {dirs[1]}"
    return ", ".join(dirs[:-1]) + ", and " + dirs[-1]


def text_glyphs(glyphs, blstats) -> str:
    """The C++ ``text_glyphs`` (as ``str``): one ``<thing> <bucket> <directions>`` per line."""
    t = tables()
    g = np.asarray(glyphs).reshape(-1)
    px, py = int(blstats[0]), int(blstats[1])

    # Things listed anywhere on the map, in row-major order, except on the player's own cell.
    idx = np.flatnonzero(t.anywhere_mask[g])
    ys, xs = np.divmod(idx, COLS)
    keys = t.sort_key[xs - px + COLS, py - ys + ROWS]
    names = [t.anywhere[v] for v in g[idx].tolist()]
    keys = keys.tolist()
    player = py * COLS + px
    if 0 <= px < COLS and 0 <= py < ROWS and t.anywhere_mask[g[player]]:
        k = int(np.searchsorted(idx, player))
        del names[k], keys[k]

    # Map symbols along the 8 rays, each ray ending after the first wall / unexplored cell.
    ray_mask, ray_block, sort_key = t.ray_mask, t.ray_block, t.sort_key
    for sx, sy in _RAYS:
        x, y = px, py
        for off in range(1, RAY_STEPS + 1):
            x += sx
            y += sy
            if not (0 <= x < COLS and 0 <= y < ROWS):
                break
            v = int(g[y * COLS + x])
            if ray_mask[v]:
                names.append(t.ray[v])
                keys.append(int(sort_key[sx * off + COLS, -sy * off + ROWS]))
                if ray_block[v]:
                    break

    # Stable sort by (bucket, direction); entries without a direction are dropped like the C++.
    order = sorted((k, i) for i, k in enumerate(keys) if k >= 0)

    # Group by (thing, bucket) in order of first appearance; a direction seen more than once
    # moves to the plural noun. The C++ keeps a list of keys plus a map, so a plural that equals
    # another key (e.g. "bars") is listed twice with the map's last value; mirror that.
    groups: dict[tuple[str, int], list[str]] = {}
    for k, i in order:
        groups.setdefault((names[i], k >> 4), []).append(DIRECTIONS[k & 15])
    out_keys: list[tuple[str, int]] = []
    out_map: dict[tuple[str, int], list[str]] = {}
    for key, dirs in groups.items():
        counts: dict[str, int] = {}
        for d in dirs:
            counts[d] = counts.get(d, 0) + 1
        singles = [d for d, c in counts.items() if c == 1]
        multis = [d for d, c in counts.items() if c > 1]
        if singles:
            out_keys.append(key)
            out_map[key] = singles
        if multis:
            pkey = (pluralize(key[0]), key[1])
            out_keys.append(pkey)
            out_map[pkey] = multis
    return "\n".join(f"{name} {DISTANCES[b]} {_join_directions(out_map[(name, b)])}"
                     for name, b in out_keys)


def text_cursor(glyphs, blstats, tty_cursor) -> str:
    """The C++ ``text_cursor`` (as ``str``), without any ``(x=C, y=R)`` line.

    ``Yourself a <glyph name>`` on the player, ``<bucket> <direction> <glyph name>`` elsewhere on
    the map (the name may be empty, leaving a trailing space), ``""`` off the map.
    """
    t = tables()
    g = np.asarray(glyphs).reshape(-1)
    px, py = int(blstats[0]), int(blstats[1])
    cx, cy = int(tty_cursor[1]), int(tty_cursor[0]) - 1  # tty row 0 is the message line
    dx, dy = cx - px, py - cy
    i = cx + cy * COLS  # may wrap into the next row when cx == 79, as the C++ does
    if not (0 <= dx + COLS < 2 * COLS and 0 <= dy + ROWS < 2 * ROWS and 0 < i < g.size):
        return ""
    name = t.anywhere[int(g[i])]
    if dx == 0 and dy == 0:
        return "Yourself a " + name
    bucket, direction = position_words(dx, dy)
    return f"{bucket} {direction} {name}"
