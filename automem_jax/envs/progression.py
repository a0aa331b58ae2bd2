"""BALROG's progression metrics (BALROG paper, arXiv 2411.13543; code balrog-ai/BALROG@af7d1f1).

- Crafter / Craftax-Classic: achievements unlocked / 22 (a mean fraction, not Crafter's geometric score).
- MiniHack: 1.0 if the latest step's reward is >= 1.0 (the success step ends the episode), else 0.0.
- NetHack: the largest milestone figure reached, over dungeon levels (``Dlvl:d``, blstats depth) and
  experience levels (``Xp:x``). Each figure is the fraction of human games (NLD-NAO data) reaching that
  milestone that went on to ascend. The figures below are BALROG's
  ``balrog/environments/nle/achievements.json``, re-encoded as tables indexed by level.
"""
from __future__ import annotations

import numpy as np

# The 22 achievements in BALROG's prompt order (Crafter ids; Craftax-Classic uses the same names).
CRAFTER_ACHIEVEMENTS: tuple[str, ...] = (
    "collect_wood", "place_table", "eat_cow", "collect_sapling", "collect_drink", "make_wood_pickaxe",
    "make_wood_sword", "place_plant", "defeat_zombie", "collect_stone", "place_stone", "eat_plant",
    "defeat_skeleton", "make_stone_pickaxe", "make_stone_sword", "wake_up", "place_furnace",
    "collect_coal", "collect_iron", "make_iron_pickaxe", "make_iron_sword", "collect_diamond",
)


def achievement_title(name: str) -> str:
    """``collect_wood`` -> ``Collect Wood`` (BALROG's prompt spelling)."""
    return " ".join(w.capitalize() for w in name.split("_"))


def crafter_progression(unlocked) -> float:
    """Fraction of the 22 achievements unlocked; ``unlocked`` is any iterable of achievement names."""
    names = set(unlocked)
    unknown = names - set(CRAFTER_ACHIEVEMENTS)
    if unknown:
        raise ValueError(f"unknown Crafter achievements {sorted(unknown)}; known: {CRAFTER_ACHIEVEMENTS}")
    return len(names) / len(CRAFTER_ACHIEVEMENTS)


# P(ascend | reached dungeon level d), d = 1..50 (index 0 is Dlvl:1).
NETHACK_DLVL = (
    0.0, 0.015392269075361172, 0.017539535798967013, 0.021221378364235505, 0.026482449457437766,
    0.035428686118173014, 0.04846098359243788, 0.0695812141543123, 0.09770935198701912,
    0.12558597019922987, 0.1612677822768481, 0.20612854836308672, 0.2566039887664476,
    0.29247245425293333, 0.30881240110986263, 0.3249071349317381, 0.34007883702829594,
    0.3526455577544006, 0.3654881095022441, 0.37895667923256743, 0.39293747679675045,
    0.40832255575976223, 0.4258360748858015, 0.445181408701678, 0.46637631565303056,
    0.5067605633802816, 0.5543572044866264, 0.6015648510382184, 0.6465049415992812,
    0.6913110342176086, 0.7101094299371864, 0.7176456494828894, 0.7232124894378948,
    0.7284405900470092, 0.7327761924174481, 0.7368528917489855, 0.7421458943978863,
    0.7471321695760599, 0.753731343283582, 0.7610398408061306, 0.76740810314648,
    0.7725338491295938, 0.7771626297577855, 0.7812567949554251, 0.7858986134802957,
    0.7890256738822022, 0.7929718875502008, 0.7967408445768355, 0.8018467495718222,
    0.8067964442444019,
)
# P(ascend | reached experience level x), x = 1..30 (index 0 is Xp:1).
NETHACK_XP = (
    0.0, 0.01847840456172601, 0.02081163581974355, 0.024160136550546978, 0.029108986017138745,
    0.036887590648350246, 0.0507583712345433, 0.07453595273884014, 0.11704996473565571,
    0.17909953770432294, 0.25480449090205187, 0.33264942385807844, 0.41442590519821954,
    0.49403949403949404, 0.5778823703813513, 0.6261221999477034, 0.656281764586298,
    0.6810218550418937, 0.7015328516442704, 0.7174494081710576, 0.7286977843944303,
    0.7371004909327723, 0.7443446629532795, 0.7513449678519879, 0.7585537128343045,
    0.7642151855635002, 0.7703376822716808, 0.7759810263044415, 0.7783345263660224,
    0.7804561949196475,
)
# Milestones BALROG's table lists but its blstats-based tracker never awards; kept for reference.
NETHACK_OTHER_MILESTONES = {
    "Astral Plane": 0.8745866562925501, "Home 1": 0.3661126311920611, "Home 2": 0.5461852317697947,
    "Home 3": 0.5493249297123614, "Home 4": 0.561057980620522, "Home 5": 0.5655729909652877,
    "You ascend t": 1.0,
}

# blstats indices (NLE's NLE_BL_DEPTH / NLE_BL_XP).
BL_DEPTH = 12
BL_XP = 18


def nethack_milestone(kind: str, level: int) -> float | None:
    """Figure for ``Dlvl:level`` (kind ``"Dlvl"``) or ``Xp:level`` (kind ``"Xp"``); None outside the table."""
    table = {"Dlvl": NETHACK_DLVL, "Xp": NETHACK_XP}.get(kind)
    if table is None:
        raise ValueError(f"milestone kind must be 'Dlvl' or 'Xp', got {kind!r}")
    return table[level - 1] if 1 <= level <= len(table) else None


class NetHackProgress:
    """Running max over reached Dlvl/Xp milestones, fed one blstats vector per step."""

    def __init__(self):
        self.progression = 0.0
        self.highest: str | None = None
        self.max_depth = 0
        self.max_xp = 0

    def update(self, blstats) -> float:
        depth, xp = int(blstats[BL_DEPTH]), int(blstats[BL_XP])
        self.max_depth, self.max_xp = max(self.max_depth, depth), max(self.max_xp, xp)
        for kind, level in (("Xp", xp), ("Dlvl", depth)):
            value = nethack_milestone(kind, level)
            if value is not None and value > self.progression:
                self.progression, self.highest = value, f"{kind}:{level}"
        return self.progression


class MiniHackProgress:
    """BALROG's binary MiniHack progression: the latest step's reward reached 1.0."""

    def __init__(self):
        self.progression = 0.0

    def update(self, reward: float) -> float:
        self.progression = 1.0 if reward >= 1.0 else 0.0
        return self.progression


def crafter_unlocked_from_mask(mask) -> list[str]:
    """Names of set entries of a boolean vector in ``CRAFTER_ACHIEVEMENTS`` order."""
    return [n for n, m in zip(CRAFTER_ACHIEVEMENTS, np.asarray(mask, bool)) if m]
