"""BALROG's Crafter text (its ``describe_frame``), vectorised over a batch with NumPy.

Input is a local semantic view in Crafter's convention: ``local[b, x, y]``, 9 cells wide (x grows
east) by 7 tall (y grows south), the player in the centre cell (4, 3), values are Crafter semantic
ids (``NAMES``). Both back ends produce it: crafter from its semantic map, Craftax-Classic from its
``map[row, col]`` plus mob arrays (transposed, see ``craftax.py``).

Output per episode, as BALROG writes it:
  long-term : [status prefix] "You see:\\n- <kind> <d> step(s) to your <dirs>" ... "\\n\\nYou face <kind> at
              your front."  -- one line per kind present (the nearest instance; ties and line order
              follow BALROG's scan, x-major), ``d`` the Manhattan distance, dirs like ``north-west``.
  short-term: "Your status:\\n- health: h/9 ..." then the non-zero inventory or "You have nothing in
              your inventory."
One deliberate difference: cells outside the world (near its edge) are left out. BALROG slices the
semantic map without padding there, which shifts or empties its view; we keep the geometry right.
"""
from __future__ import annotations

import numpy as np

# Crafter semantic ids: materials 0-12, objects 13-18 (crafter's SemanticView order); 19 is
# Craftax-Classic's WOOD block, which Crafter lacks. Id 0 is "no material" (outside the world).
NAMES: tuple[str, ...] = (
    "nothing", "water", "grass", "stone", "path", "sand", "tree", "lava", "coal", "iron", "diamond",
    "table", "furnace", "player", "cow", "zombie", "skeleton", "arrow", "plant", "wood",
)
ID = {n: i for i, n in enumerate(NAMES)}
NOTHING, PLAYER = ID["nothing"], ID["player"]
VIEW_W, VIEW_H = 9, 7
CENTER_X, CENTER_Y = VIEW_W // 2, VIEW_H // 2  # (4, 3)

VITALS: tuple[str, ...] = ("health", "food", "drink", "energy")
# Crafter's inventory order (data.yaml), which BALROG prints in.
ITEMS: tuple[str, ...] = (
    "sapling", "wood", "stone", "coal", "iron", "diamond", "wood_pickaxe", "stone_pickaxe",
    "iron_pickaxe", "wood_sword", "stone_sword", "iron_sword",
)

# BALROG's action strings; the index is the Crafter / Craftax-Classic action id.
ACTIONS: tuple[str, ...] = (
    "Noop", "Move West", "Move East", "Move North", "Move South", "Do", "Sleep", "Place Stone",
    "Place Table", "Place Furnace", "Place Plant", "Make Wood Pickaxe", "Make Stone Pickaxe",
    "Make Iron Pickaxe", "Make Wood Sword", "Make Stone Sword", "Make Iron Sword",
)
DEFAULT_ACTION = "Noop"
_ACTION_HELP = {
    "Noop": "wait a step",
    "Move West": "walk one cell west (or turn to face west if blocked)",
    "Move East": "walk one cell east (or turn to face east if blocked)",
    "Move North": "walk one cell north (or turn to face north if blocked)",
    "Move South": "walk one cell south (or turn to face south if blocked)",
    "Do": "interact with what you face: gather a material, drink water, eat, or attack a creature",
    "Sleep": "sleep to restore energy; you wake up when energy is full",
    "Place Stone": "put a stone from your inventory on the cell you face",
    "Place Table": "build a crafting table in front of you (uses wood)",
    "Place Furnace": "build a furnace in front of you, next to a table (uses stone)",
    "Place Plant": "plant a sapling on the grass you face",
    "Make Wood Pickaxe": "craft a wood pickaxe; needs a table nearby and wood",
    "Make Stone Pickaxe": "craft a stone pickaxe; needs a table nearby, wood and stone",
    "Make Iron Pickaxe": "craft an iron pickaxe; needs a table and a furnace nearby, wood, coal and iron",
    "Make Wood Sword": "craft a wood sword; needs a table nearby and wood",
    "Make Stone Sword": "craft a stone sword; needs a table nearby, wood and stone",
    "Make Iron Sword": "craft an iron sword; needs a table and a furnace nearby, wood, coal and iron",
}


def instruction(game: str = "Crafter") -> str:
    """The task instruction: valid actions, the 22 achievements, the goal."""
    from .progression import CRAFTER_ACHIEVEMENTS, achievement_title

    acts = "\n".join(f"{a}: {_ACTION_HELP[a]}" for a in ACTIONS)
    ach = "\n".join(f"{i}. {achievement_title(n)}" for i, n in enumerate(CRAFTER_ACHIEVEMENTS, 1))
    return (
        f"You are playing {game}, a 2D survival and crafting game seen from above. Each step you "
        f"choose exactly one of these actions (answer with the action name only):\n\n{acts}\n\n"
        f"Achievements you can unlock:\n{ach}\n\n"
        "Keep your health, food, drink and energy up: eat cows or plants, drink water, sleep when "
        "tired, and avoid or fight zombies and skeletons. Your goal is to unlock as many "
        "achievements as you can."
    )


SLEEPING_TEXT = "You are sleeping, and will not be able take actions until energy is full."
DEAD_TEXT = "You died."

# Kinds that can be listed under "You see" (everything but "nothing" and the player).
_KINDS = np.array([i for i in range(len(NAMES)) if i not in (NOTHING, PLAYER)], np.int16)


def _cell_tables():
    xs, ys = np.meshgrid(np.arange(VIEW_W), np.arange(VIEW_H), indexing="ij")
    dx, dy = (xs - CENTER_X).ravel(), (ys - CENTER_Y).ravel()
    dist = np.abs(dx) + np.abs(dy)
    loc = []
    for ddx, ddy, d in zip(dx, dy, dist):
        dirs = (["north"] if ddy < 0 else ["south"] if ddy > 0 else []) + \
               (["west"] if ddx < 0 else ["east"] if ddx > 0 else [])
        loc.append(f"{d} step{'s' if d > 1 else ''} to your {'-'.join(dirs)}")
    return dist.astype(np.int16), loc


_DIST, _LOC = _cell_tables()  # flat index = x * VIEW_H + y, BALROG's scan order


def describe_batch(local, facing, sleeping, dead, vitals, inventory) -> list[tuple[str, str]]:
    """Texts for a batch.

    local: int [B, 9, 7] semantic ids (x, y); facing: int [B, 2] unit (dx, dy); sleeping, dead: bool [B];
    vitals: int [B, 4] in ``VITALS`` order; inventory: int [B, 12] in ``ITEMS`` order.
    Returns ``[(long_term, short_term)] * B``.
    """
    local = np.asarray(local)
    if local.ndim != 3 or local.shape[1:] != (VIEW_W, VIEW_H):
        raise ValueError(f"local view must be [B, {VIEW_W}, {VIEW_H}] (x, y), got {local.shape}")
    b = local.shape[0]
    flat = local.reshape(b, -1)
    hit = flat[:, :, None] == _KINDS[None, None, :]                     # [B, 63, K]
    present = hit.any(axis=1)                                            # [B, K]
    first = hit.argmax(axis=1)                                           # first cell in scan order
    nearest = np.where(hit, _DIST[None, :, None], 1 << 14).argmin(axis=1)  # ties -> first in scan
    facing = np.asarray(facing).reshape(b, 2)
    tx = np.clip(CENTER_X + facing[:, 0], 0, VIEW_W - 1)
    ty = np.clip(CENTER_Y + facing[:, 1], 0, VIEW_H - 1)
    front = local[np.arange(b), tx, ty]
    sleeping, dead = np.asarray(sleeping, bool).reshape(b), np.asarray(dead, bool).reshape(b)
    vitals, inventory = np.asarray(vitals).reshape(b, 4), np.asarray(inventory).reshape(b, len(ITEMS))

    out = []
    for i in range(b):
        ks = np.flatnonzero(present[i])
        if ks.size:
            ks = ks[np.argsort(first[i, ks], kind="stable")]
            seen = "You see:\n" + "\n".join(f"- {NAMES[_KINDS[k]]} {_LOC[nearest[i, k]]}" for k in ks)
        else:
            seen = "You see nothing away from you."
        env_text = f"{seen}\n\nYou face {NAMES[front[i]]} at your front."
        # BALROG joins status + "\n\n" + env, so a status line is followed by four newlines.
        status = SLEEPING_TEXT if sleeping[i] else DEAD_TEXT if dead[i] else ""
        long_term = f"{status}\n\n\n\n{env_text}" if status else env_text

        vit = "\n".join(f"- {n}: {int(v)}/9" for n, v in zip(VITALS, vitals[i]))
        inv = [f"- {n}: {int(c)}" for n, c in zip(ITEMS, inventory[i]) if c != 0]
        inv_text = "Your inventory:\n" + "\n".join(inv) if inv else "You have nothing in your inventory."
        out.append((long_term, f"Your status:\n{vit}\n\n{inv_text}"))
    return out


def local_view(semantic: np.ndarray, pos) -> np.ndarray:
    """The 9x7 window of a Crafter semantic map ``semantic[x, y]`` around ``pos``, 0 outside the world."""
    x, y = int(pos[0]), int(pos[1])
    out = np.zeros((VIEW_W, VIEW_H), semantic.dtype)
    x0, y0 = x - CENTER_X, y - CENTER_Y
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + VIEW_W, semantic.shape[0]), min(y0 + VIEW_H, semantic.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = semantic[sx0:sx1, sy0:sy1]
    return out


def inventory_extras(vitals_row, inventory_row) -> tuple[dict[str, int], dict[str, int]]:
    """Structured copies of one episode's vitals and non-zero inventory, for ``Obs.extras``."""
    vit = {n: int(v) for n, v in zip(VITALS, vitals_row)}
    inv = {n: int(c) for n, c in zip(ITEMS, inventory_row) if c != 0}
    return vit, inv
