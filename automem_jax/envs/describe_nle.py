"""NetHack / MiniHack observations as text, in BALROG's "hybrid" layout with AutoMem's rewrite.

BALROG (``balrog/environments/nle/base.py``) renders an NLE observation with the C++
``NLELanguageObsv`` of balrog-nle 0.9.0; AutoMem then rewrites distance and direction words. The
default ``text_style="balrog"`` reproduces that text byte for byte::

    message:\n<text_message>\n\nlanguage observation:\n<text_glyphs>\n\ncursor:\n<text_cursor>\n
    (x=C, y=R)\n\nmap:\n<tty rows 1-23, 80 columns each, one per line>\n\n      (long-term context)
    inventory:\n<text_inventory>\n                                           (short-term context)

``text_message`` and ``text_inventory`` are ports of the C++ here; ``text_glyphs`` / ``text_cursor``
come from ``nle_glyphs``. ``tests/test_nle_reference.py`` checks all of it against the compiled C++.

``text_style="exact"`` keeps this project's older describer (exact step counts, hyphenated 16-point
directions, objects listed anywhere capped per name, map rows without trailing blanks): "What is
around" lists ``<thing> <d> step(s) <direction>``, nearest few of each kind plus walls met along the
8 compass rays; far to near, north clockwise.
"""
from __future__ import annotations

import functools
import re

import numpy as np

ROWS, COLS = 21, 79  # NetHack's map (glyphs) size; tty rows 1..21 show it
RAY_STEPS = 9
MAX_PER_KIND = 4

# NetHack 3.6 cmap symbols (defsym order) that get their own names; the rest use NetHack's explanation.
_CMAP_NAMES = {
    0: "dark area", 1: "vertical wall", 2: "horizontal wall", 3: "northwest room corner",
    4: "northeast room corner", 5: "southwest room corner", 6: "southeast room corner",
    7: "wall", 8: "wall", 9: "wall", 10: "wall", 11: "wall", 12: "doorway", 13: "open door",
    14: "open door", 15: "closed door", 16: "closed door", 23: "stairs up", 24: "stairs down",
    32: "water", 34: "lava", 35: "lowered drawbridge", 36: "lowered drawbridge",
    37: "raised drawbridge", 38: "raised drawbridge",
}
_CMAP_FLOOR = {19, 20, 21, 22}          # room floor, dark room floor, corridor, lit corridor: not listed
_CMAP_STRUCTURE = set(range(0, 12))      # dark area and walls: only along the rays
_CMAP_BLOCKING = set(range(0, 12)) | {15, 16, 17, 37, 38}
_CMAP_FEATURE_MAX = 64                   # 12..64 minus floors: doors, stairs, fountains, traps, ...

IGNORE, ANYWHERE, RAY = 0, 1, 2

_DIR16 = ("north", "north-northeast", "northeast", "east-northeast", "east", "east-southeast",
          "southeast", "south-southeast", "south", "south-southwest", "southwest", "west-southwest",
          "west", "west-northwest", "northwest", "north-northwest")
_DIR_ORDER = {d: i for i, d in enumerate(_DIR16)}


def _object_name(nh, idx: int) -> str:
    d = nh.objdescr.from_idx(idx)
    name, descr = d.oc_name or "", d.oc_descr or ""
    cls = ord(nh.objclass(idx).oc_class)
    # What the player sees before identifying: the appearance plus the class noun.
    if cls == nh.POTION_CLASS:
        return f"{descr} potion"
    if cls == nh.SCROLL_CLASS:
        return f"scroll labeled {descr}"
    if cls == nh.WAND_CLASS:
        return f"{descr} wand"
    if cls == nh.RING_CLASS:
        return f"{descr} ring"
    if cls == nh.SPBOOK_CLASS:
        return f"{descr} spellbook"
    if cls == nh.AMULET_CLASS:
        return descr if "amulet" in descr.lower() else f"{descr} amulet"
    if cls == nh.GEM_CLASS:
        return name if descr in name else f"{descr} gem"
    if cls in (nh.ARMOR_CLASS, nh.TOOL_CLASS):
        return descr or name
    if cls == nh.VENOM_CLASS:
        return f"splash of {name}"
    return name or descr or "strange object"


@functools.lru_cache(maxsize=1)
def glyph_tables():
    """(names, kind, blocking, cursor_names): per-glyph arrays built once from NLE's NetHack tables."""
    import nle.nethack as nh

    n = nh.MAX_GLYPH
    names = [""] * n
    cursor = [""] * n
    kind = np.zeros(n, np.int8)
    blocking = np.zeros(n, bool)
    mon = lambda g: nh.permonst(nh.glyph_to_mon(g)).mname  # noqa: E731
    for g in range(n):
        if g >= nh.GLYPH_STATUE_OFF:
            names[g], kind[g] = f"statue of a {nh.permonst(g - nh.GLYPH_STATUE_OFF).mname}", ANYWHERE
        elif g >= nh.GLYPH_WARNING_OFF:
            names[g], kind[g] = f"warning of a level {g - nh.GLYPH_WARNING_OFF} monster", ANYWHERE
        elif g >= nh.GLYPH_SWALLOW_OFF:
            who = nh.permonst((g - nh.GLYPH_SWALLOW_OFF) >> 3).mname
            names[g], kind[g] = f"inside of {who}", RAY
        elif g >= nh.GLYPH_ZAP_OFF:
            names[g], kind[g] = "zap beam", ANYWHERE
        elif g >= nh.GLYPH_EXPLODE_OFF:
            names[g], kind[g] = "explosion", ANYWHERE
        elif g >= nh.GLYPH_CMAP_OFF:
            c = g - nh.GLYPH_CMAP_OFF
            label = _CMAP_NAMES.get(c) or nh.symdef.from_idx(c).explanation
            cursor[g] = label or "effect"
            if c in _CMAP_FLOOR:
                continue
            if c in _CMAP_STRUCTURE:
                names[g], kind[g] = label, RAY
            elif c <= _CMAP_FEATURE_MAX or c == 77:  # 77: poison cloud
                names[g], kind[g] = label, ANYWHERE
            blocking[g] = c in _CMAP_BLOCKING
        elif g >= nh.GLYPH_OBJ_OFF:
            names[g], kind[g] = _object_name(nh, g - nh.GLYPH_OBJ_OFF), ANYWHERE
        elif g >= nh.GLYPH_RIDDEN_OFF:
            names[g], kind[g] = f"ridden {mon(g)}", ANYWHERE
        elif g >= nh.GLYPH_BODY_OFF:
            names[g], kind[g] = f"{nh.permonst(g - nh.GLYPH_BODY_OFF).mname} corpse", ANYWHERE
        elif g >= nh.GLYPH_DETECT_OFF:
            names[g], kind[g] = f"detected {mon(g)}", ANYWHERE
        elif g >= nh.GLYPH_INVIS_OFF:
            names[g], kind[g] = "invisible creature", ANYWHERE
        elif g >= nh.GLYPH_PET_OFF:
            names[g], kind[g] = f"tame {mon(g)}", ANYWHERE
        else:
            names[g], kind[g] = mon(g), ANYWHERE
        if not cursor[g]:
            cursor[g] = names[g]
    return names, kind, blocking, cursor


@functools.lru_cache(maxsize=8192)
def direction(dx: int, dy: int) -> str:
    """16-point compass name of an offset (dx east-positive, dy north-positive); '' for (0, 0)."""
    diag = min(abs(dx), abs(dy))
    ns = "north" if dy > 0 else "south"
    ew = "east" if dx > 0 else "west"
    rx, ry = abs(dx) - diag, abs(dy) - diag
    primary = ns if ry else ew if rx else ""
    if not diag:
        return primary
    return f"{primary}-{ns}{ew}" if primary else f"{ns}{ew}"


def _steps(d: int) -> str:
    return f"{d} step{'s' if d != 1 else ''}"


@functools.lru_cache(maxsize=4096)
def _plural(noun: str) -> str:
    for mass in ("boots", "shoes", "gloves", "gauntlets", "bars", "lava", "water", "ice", "area"):
        if noun.endswith(mass):
            return noun
    if noun.startswith(("scroll ", "statue of", "splash of", "warning of", "inside of")):
        head, _, tail = noun.partition(" ")
        return f"{_plural(head)} {tail}"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


def _join(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + ", and " + words[-1]


def describe_surroundings(glyphs: np.ndarray, px: int, py: int) -> str:
    """The "language observation" block for a 21x79 glyph map with the player at column px, row py."""
    names, kind, blocking, _ = glyph_tables()
    glyphs = np.asarray(glyphs)
    entries: list[tuple[str, int, str]] = []
    rows, cols = np.nonzero(kind[glyphs] == ANYWHERE)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r == py and c == px:
            continue
        dx, dy = c - px, py - r
        entries.append((names[glyphs[r, c]], max(abs(dx), abs(dy)), direction(dx, dy)))
    for sx, sy in ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)):
        for k in range(1, RAY_STEPS + 1):
            c, r = px + sx * k, py - sy * k
            if not (0 <= r < ROWS and 0 <= c < COLS):
                break
            g = glyphs[r, c]
            if kind[g] == RAY:
                entries.append((names[g], k, direction(sx * k, sy * k)))
            if blocking[g]:
                break
    # Nearest few of each kind, then far-to-near, north clockwise.
    entries.sort(key=lambda e: (e[1], _DIR_ORDER[e[2]]))
    kept, count = [], {}
    for e in entries:
        if count.get(e[0], 0) < MAX_PER_KIND:
            count[e[0]] = count.get(e[0], 0) + 1
            kept.append(e)
    kept.sort(key=lambda e: (-e[1], _DIR_ORDER[e[2]]))
    groups: dict[tuple[str, int], list[str]] = {}
    for name, d, dirn in kept:
        groups.setdefault((name, d), []).append(dirn)
    lines = []
    for (name, d), dirs in groups.items():
        unique = list(dict.fromkeys(dirs))
        if _plural(name) == name:  # mass nouns (lava, water): one line whatever the count
            lines.append(f"{name} {_steps(d)} {_join(unique)}")
            continue
        once = [x for x in unique if dirs.count(x) == 1]
        many = [x for x in unique if dirs.count(x) > 1]
        if once:
            lines.append(f"{name} {_steps(d)} {_join(once)}")
        if many:
            lines.append(f"{_plural(name)} {_steps(d)} {_join(many)}")
    return "\n".join(lines)


_PAGER = re.compile(r"--More--|\(end\)|\(\d+ of \d+\)")


def screen_rows(tty_chars: np.ndarray) -> list[str]:
    """The 24 terminal rows as strings (one decode for the whole screen)."""
    width = tty_chars.shape[1]
    text = np.ascontiguousarray(tty_chars).tobytes().decode("latin-1")
    return [text[i:i + width] for i in range(0, len(text), width)]


def screen_message(tty_chars: np.ndarray) -> str:
    """The message line, or a whole menu / text window drawn over the map.

    A window starts at the first row's indent and ends at the row with its pager mark (--More--,
    (end), (n of m)); without one, only the top line is the message.
    """
    rows = screen_rows(tty_chars)
    top = rows[0]
    if not top.strip(" \x00"):
        return ""
    indent = len(top) - len(top.lstrip(" "))
    lines = []
    for row in rows:
        line = row[indent:].strip(" \x00")
        lines.append(line)
        if _PAGER.search(line):
            return "\n".join(lines)
    return top.strip(" \x00")


def cursor_text(glyphs: np.ndarray, px: int, py: int, tty_cursor) -> str:
    """What the terminal cursor is on, then its screen position, as BALROG's cursor block."""
    _, _, _, cursor = glyph_tables()
    row, col = int(tty_cursor[0]), int(tty_cursor[1])
    r = row - 1  # tty row 0 is the message line
    if 0 <= r < ROWS and 0 <= col < COLS:
        name = cursor[int(glyphs[r, col])]
        if (col, r) == (px, py):
            what = f"Yourself a {name}"
        else:
            dx, dy = col - px, py - r
            what = f"{name} {_steps(max(abs(dx), abs(dy)))} {direction(dx, dy)}"
    else:
        what = ""
    return f"{what}\n(x={col}, y={row})"


def inventory_lines(inv_strs: np.ndarray, inv_letters: np.ndarray) -> list[tuple[str, str]]:
    out = []
    for letter, s in zip(inv_letters, inv_strs):
        if letter == 0:
            break
        out.append((chr(int(letter)), bytes(s).decode("latin-1").split("\x00", 1)[0]))
    return out



# -- BALROG's text (ports of balrog-nle 0.9.0's C++ and of BALROG's / AutoMem's Python) -----------

# The C++ trim() builds its set from a C string literal that holds a NUL, so only its first two
# characters count: space and \x1a.
_TRIM = " \x1a"


def _cpp_trim(s: str) -> str:
    start = next((i for i, ch in enumerate(s) if ch not in _TRIM), None)
    if start is None or start == len(s) - 1:
        return ""  # the C++ also returns "" when only the last character is not blank
    return s[start:].rstrip(_TRIM)


def _pager_mark(row: str) -> bool:
    """Whether a trimmed row ends a window page: ``(n of m)`` with one-digit n and m, ``--More--``, ``(end)``."""
    if "--More--" in row or "(end)" in row:
        return True
    k = row.find(" of ")  # only the first " of " is looked at
    return k >= 2 and k + 5 < len(row) and row[k - 2] == "(" and row[k + 5] == ")"


def text_message(tty_chars) -> str:
    """balrog-nle's ``text_message``: the top line, or a menu / text window drawn over the map.

    A window is read from the first row's indent down to the row holding its pager mark, blank
    rows skipped and without the final newline. A death screen (``Points`` or ``list!`` on the
    second row) ends after two blank rows. Without either, only the top line is the message.
    """
    rows = screen_rows(np.asarray(tty_chars, np.uint8))
    first, second = _cpp_trim(rows[0]), _cpp_trim(rows[1])
    if not first and not second:
        return ""
    death_screen = "Points" in second or "list!" in second
    top = rows[0]
    indent = len(top) - len(top.lstrip(" "))
    out, blanks = [], 0
    for r, row in enumerate(rows):
        if indent < len(top):
            line = row[indent:]
        else:
            # Blank top row: the C++ offset is npos, i.e. one byte before each row; the byte
            # before the screen is outside the array, taken here as blank.
            line = (rows[r - 1][-1] if r else " ") + row
        line = _cpp_trim(line)
        blanks = 0 if line else blanks + 1
        if line:
            out.append(line)
        if _pager_mark(line):
            return "\n".join(out)
        if death_screen and blanks > 1:
            return "".join(x + "\n" for x in out)
    return first


def text_inventory(inv_strs, inv_letters) -> str:
    """balrog-nle's ``text_inventory``: ``<letter>: <item>`` lines up to the first empty slot."""
    inv_strs = np.asarray(inv_strs, np.uint8)
    flat = inv_strs.tobytes()
    width = inv_strs.shape[1]
    lines = []
    for i, letter in enumerate(np.asarray(inv_letters).tolist()):
        if letter == 0:
            break
        item = flat[i * width:].split(b"\x00", 1)[0]  # a C string: runs on to the first NUL
        lines.append(f"{chr(letter)}: {item.decode('latin-1')}")
    return "\n".join(lines)


def map_rows(tty_chars, strip: bool = False) -> list[str]:
    """tty rows 1-23 (the 21 map rows and the two status lines); BALROG keeps all 80 columns."""
    rows = screen_rows(np.asarray(tty_chars, np.uint8))[1:]
    return [r.rstrip(" \x00") for r in rows] if strip else rows


# AutoMem's env_wrapper rewrites these words, in this order, in both contexts (whole words only).
_AUTOMEM_WORDS = (
    ("very far", "9+ steps away"), ("very near", "2 steps away"), ("far", "5-8 steps away"),
    ("near", "3-4 steps away"), ("adjacent", "1 step away (directly reachable)"),
    *((a + b + c, f"between {a} and {b}{c}") for a, b, c in (
        ("north", "north", "east"), ("east", "north", "east"), ("east", "south", "east"),
        ("south", "south", "east"), ("south", "south", "west"), ("west", "south", "west"),
        ("west", "north", "west"), ("north", "north", "west"))),
)
_AUTOMEM_RES = tuple((re.compile(rf"\b{re.escape(w)}\b"), r) for w, r in _AUTOMEM_WORDS)


def automem_rewrite(text: str) -> str:
    """AutoMem's distance / direction rewrite (``_parse_nle_distances``), applied to a whole context."""
    for pattern, replacement in _AUTOMEM_RES:
        text = pattern.sub(replacement, text)
    return text


def balrog_contexts(message: str, glyph_text: str, cursor_text_: str, tty_cursor, rows: list[str],
                    inventory_text: str) -> tuple[str, str]:
    """BALROG's ``render_hybrid``: each block is ``<name>:\n<text>\n``, blocks joined by a newline."""
    cursor = f"{cursor_text_}\n(x={int(tty_cursor[1])}, y={int(tty_cursor[0])})"
    screen = "".join(r + "\n" for r in rows)
    long_term = (f"message:\n{message}\n\nlanguage observation:\n{glyph_text}\n\n"
                 f"cursor:\n{cursor}\n\nmap:\n{screen}\n")
    return long_term, f"inventory:\n{inventory_text}\n"


TEXT_STYLES = ("balrog", "exact")


def read_message(tty_chars, text_style: str = "balrog") -> str:
    """The message of one screen: balrog-nle's, or the older describer's with ``"exact"``."""
    return screen_message(tty_chars) if text_style == "exact" else text_message(tty_chars)


def hybrid_text(message: str, glyphs, blstats, tty_chars, tty_cursor, inv_strs, inv_letters, *,
                text_style: str = "balrog", rewrite: bool = True):
    """(long_term, short_term, parts) in BALROG's hybrid layout.

    ``text_style="balrog"``: BALROG's text, then AutoMem's rewrite unless ``rewrite=False``.
    ``text_style="exact"``: the older describer (exact distances, stripped map rows). ``parts``
    holds "around" (the language observation as shown), "cursor", "map" (the tty rows before any
    rewrite) and "inventory" (letter -> item).
    """
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be 'balrog' or 'exact', got {text_style!r}")
    inv = dict(inventory_lines(inv_strs, inv_letters))
    if text_style == "exact":
        px, py = int(blstats[0]), int(blstats[1])
        around = describe_surroundings(glyphs, px, py)
        cur = cursor_text(glyphs, px, py, tty_cursor)
        rows = map_rows(tty_chars, strip=True)
        screen = "".join(r + "\n" for r in rows)
        long_term = (f"message:\n{message}\n\nlanguage observation:\n{around}\n\ncursor:\n{cur}\n\n"
                     f"map:\n{screen}\n")
        short_term = "inventory:\n" + "\n".join(f"{k}: {v}" for k, v in inv.items()) + "\n"
        return long_term, short_term, {"around": around, "cursor": cur, "map": rows, "inventory": inv}

    from . import nle_glyphs

    around = nle_glyphs.text_glyphs(glyphs, blstats)
    cur = nle_glyphs.text_cursor(glyphs, blstats, tty_cursor)
    rows = map_rows(tty_chars)
    long_term, short_term = balrog_contexts(message, around, cur, tty_cursor, rows,
                                            text_inventory(inv_strs, inv_letters))
    if rewrite:
        long_term, short_term = automem_rewrite(long_term), automem_rewrite(short_term)
        around, cur = automem_rewrite(around), automem_rewrite(cur)
    return long_term, short_term, {"around": around, "cursor": cur, "map": rows, "inventory": inv}
