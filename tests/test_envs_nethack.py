"""NetHack and MiniHack as text: random runs, BALROG's layout and actions, progression, Boxoban."""
import re

import numpy as np
import pytest

from automem_jax.envs import EpisodeOverError, make
from automem_jax.envs.describe_nle import automem_rewrite, direction
from automem_jax.envs.nethack import MINIHACK_ACTION_NAMES, NetHackTextEnv
from automem_jax.envs.progression import (BL_DEPTH, BL_XP, NETHACK_DLVL, NETHACK_XP, MiniHackProgress,
                                          NetHackProgress, nethack_milestone)

# BALROG's distances and directions as AutoMem rewrote them.
_DIR = r"(?:north|south)(?:east|west)?|east|west|between (?:north|south|east|west) and (?:north|south)(?:east|west)"
_DIST = r"1 step away \(directly reachable\)|2 steps away|3-4 steps away|5-8 steps away|9\+ steps away"
AROUND_LINE = re.compile(rf".+ (?:{_DIST}) (?:{_DIR})(?:(?:, and |, | and )(?:{_DIR}))*")
CURSOR = re.compile(rf"(?:Yourself a .*|(?:{_DIST}) (?:{_DIR}) .*|)\n\(x=(\d+), y=(\d+)\)")


def assert_hybrid_text(obs, done):
    lt, st = obs.long_term, obs.short_term
    m = re.fullmatch(r"message:\n(.*)\n\nlanguage observation:\n(.*)\n\ncursor:\n(.*)\n\nmap:\n(.*)\n\n", lt,
                     re.S)
    assert m, lt
    message, around, cursor, screen = m.groups()
    assert "\n\nmap:\n" not in around + cursor
    assert message == automem_rewrite(obs.extras["message"])
    if not done:
        assert "--More--" not in message
    for line in filter(None, around.split("\n")):
        assert AROUND_LINE.fullmatch(line), line
    c = CURSOR.fullmatch(cursor)
    assert c and 0 <= int(c.group(1)) < 80 and 0 <= int(c.group(2)) < 24, cursor
    rows = screen.split("\n")
    assert len(rows) == 23 and all(len(r) == 80 for r in obs.extras["map"])
    assert rows == [automem_rewrite(r) for r in obs.extras["map"]]
    assert st.startswith("inventory:\n") and st.endswith("\n")
    for line in filter(None, st[len("inventory:\n"):-1].split("\n")):
        assert re.fullmatch(r"[a-zA-Z$#]: .+", line), line


def _random_run(env, steps, rng, count_more=True):
    presses = {"more": 0}
    nle_step = env._env.step

    def counting_step(a):
        presses["more"] += a == env._more
        return nle_step(a)

    env._env.step = counting_step
    obs = env.reset(seed=int(rng.integers(1 << 30)))
    assert_hybrid_text(obs, False)
    episodes = 1
    for t in range(steps):
        a = env.actions[rng.integers(len(env.actions))] if t % 10 else "Go north!"
        obs, reward, terminated, truncated, info = env.step(a)
        assert_hybrid_text(obs, terminated or truncated)
        assert info["invalid_action"] == (a == "Go north!")
        assert info["action"] == (env.default_action if a == "Go north!" else a)
        assert 0.0 <= env.progression() <= 1.0 and env.progression() == info["progression"]
        if terminated or truncated:
            with pytest.raises(EpisodeOverError):
                env.step(env.default_action)
            env.reset(seed=int(rng.integers(1 << 30)))
            episodes += 1
    return episodes, presses["more"]


def test_nethack_random_run_200_steps():
    env = make("nethack")
    assert isinstance(env, NetHackTextEnv) and env.default_action == "esc"
    for a in ("north", "far southwest", "down", "more", "esc", "pray", "seegold", "a", "Z", "7", "00", "99"):
        assert a in env.actions
    assert "travel" not in env.actions  # BALROG's action space (see test_nethack_actions_are_balrogs)
    assert len(env.actions) == len(set(env.actions))
    episodes, more = _random_run(env, 200, np.random.default_rng(0))
    assert episodes >= 2
    assert more > 0  # --More-- came up and was answered for the agent
    env.close()


@pytest.mark.parametrize("task", ["Corridor-R3", "Quest-Easy"])
def test_minihack_random_run_200_steps(task):
    env = make(f"minihack:{task}")
    assert env.default_action == "north" and env.task == f"MiniHack-{task}-v0"
    assert set(env.actions) <= set(MINIHACK_ACTION_NAMES)
    episodes, _ = _random_run(env, 200, np.random.default_rng(1))
    assert episodes >= 2  # 100-step episodes
    assert env.progression() in (0.0, 1.0)


def test_minihack_success_is_progression_one():
    # Walk to the staircase of a small lit room, reading the map the agent sees.
    env = make("minihack:Room-5x5")
    obs = env.reset(seed=4)
    for _ in range(12):
        rows = obs.extras["map"][:21]
        sy = next(r for r, row in enumerate(rows) if ">" in row)
        sx = rows[sy].index(">")
        x, y = obs.extras["stats"]["x"], obs.extras["stats"]["y"]
        move = direction(int(np.sign(sx - x)), int(np.sign(y - sy)))
        obs, reward, terminated, truncated, info = env.step(move)
        if terminated:
            break
    assert terminated and reward >= 1.0
    assert env.progression() == 1.0


def test_digit_pairs_are_two_keystrokes():
    env = make("nethack")
    env.reset(seed=5)
    obs, *_ = env.step("12")
    assert "Count: 12" in obs.extras["message"]


def test_same_seed_same_game():
    a, b = NetHackTextEnv(), NetHackTextEnv()
    oa, ob = a.reset(seed=21), b.reset(seed=21)
    assert oa.long_term == ob.long_term
    for act in ["west", "search", "far east", "i", "esc", "south"]:
        assert a.step(act)[0].long_term == b.step(act)[0].long_term
    assert a.state_hash() == b.state_hash()
    assert a.replay(21, ["west", "search", "far east", "i", "esc", "south"]) == b.state_hash()


def test_nethack_progression_from_blstats():
    bl = np.zeros(27, np.int64)
    bl[BL_DEPTH], bl[BL_XP] = 3, 5
    p = NetHackProgress()
    assert p.update(bl) == pytest.approx(0.029108986017138745)  # Xp:5 beats Dlvl:3 (0.0175...)
    assert p.highest == "Xp:5" and nethack_milestone("Dlvl", 3) == pytest.approx(0.017539535798967013)
    bl[BL_DEPTH] = 10
    assert p.update(bl) == pytest.approx(0.12558597019922987) and p.highest == "Dlvl:10"
    bl[BL_DEPTH], bl[BL_XP] = 1, 1  # progression is a running max
    assert p.update(bl) == pytest.approx(0.12558597019922987)
    bl[BL_DEPTH], bl[BL_XP] = 60, 31  # beyond BALROG's table: no figure
    assert p.update(bl) == pytest.approx(0.12558597019922987)
    assert len(NETHACK_DLVL) == 50 and len(NETHACK_XP) == 30
    assert all(a <= b for a, b in zip(NETHACK_DLVL, NETHACK_DLVL[1:]))
    assert NETHACK_XP[1] == pytest.approx(0.01847840456172601)


def test_minihack_progression_is_binary_on_latest_reward():
    p = MiniHackProgress()
    assert p.update(-0.01) == 0.0 and p.update(1.0) == 1.0 and p.update(0.5) == 0.0


BOXOBAN_LEVEL = "; 0\n##########\n" + "#        #\n" * 2 + "#  @$.   #\n" + "#        #\n" * 5 + "##########\n\n"


def test_boxoban_needs_levels(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOMEM_BOXOBAN_LEVELS", raising=False)
    with pytest.raises(ValueError, match="boxoban_levels="):
        make("minihack:Boxoban-Medium")
    with pytest.raises(ValueError, match="has no 'hard' folder"):
        make("minihack:Boxoban-Hard", boxoban_levels=str(tmp_path))
    (tmp_path / "medium" / "train").mkdir(parents=True)
    (tmp_path / "medium" / "train" / "000.txt").write_text(BOXOBAN_LEVEL)
    env = make("minihack:Boxoban-Medium", boxoban_levels=str(tmp_path))
    assert env.actions == ["north", "east", "south", "west"]
    obs = env.reset(seed=0)
    assert_hybrid_text(obs, False)
    assert "boulder 1 step away (directly reachable) east" in obs.long_term
    obs, reward, terminated, truncated, info = env.step("east")  # push the boulder onto the fountain
    assert terminated and env.progression() == 1.0
    with pytest.raises(ValueError, match="boxoban_levels="):  # the path did not leak into later envs
        make("minihack:Boxoban-Medium")


def _balrog_nethack_actions():
    """BALROG's language_action_space for NetHack, rebuilt here from NLE independently of the env.

    BALROG keeps the entries of NLE's language-wrapper table that equal one of USEFUL_ACTIONS and
    takes each entry's first name. NLE actions compare by key code, so the text keys USEFUL_ACTIONS
    keeps ('+', '"', '$') bring in the commands on those keys (seespells, seeamulet, seegold). The
    table's order is by action group, and within the commands NLE's enum order with esc moved
    before engrave and fire before fight.
    """
    from nle.nethack import USEFUL_ACTIONS
    from nle.nethack import actions as A

    dirs = {"N": "north", "E": "east", "S": "south", "W": "west", "NE": "northeast", "SE": "southeast",
            "SW": "southwest", "NW": "northwest"}
    command_of = {int(c): c for c in A.Command}
    group = {A.CompassDirection: 0, A.CompassDirectionLonger: 1, A.MiscDirection: 2, A.MiscAction: 3,
             A.Command: 4, A.TextCharacters: 5}
    cmd_order = [c.name for c in A.Command]
    for first, second in (("ESC", "ENGRAVE"), ("FIRE", "FIGHT")):
        cmd_order.remove(first)
        cmd_order.insert(cmd_order.index(second), first)
    entries = []
    for a in USEFUL_ACTIONS:
        a = command_of.get(int(a), a) if isinstance(a, A.TextCharacters) else a
        kind = type(a)
        if kind is A.CompassDirection:
            name, rank = dirs[a.name], list(A.CompassDirection).index(a)
        elif kind is A.CompassDirectionLonger:
            name, rank = "far " + dirs[a.name], list(A.CompassDirectionLonger).index(a)
        elif kind is A.Command:
            name, rank = ("turnundead" if a.name == "TURN" else a.name.lower()), cmd_order.index(a.name)
        else:
            name, rank = a.name.lower(), list(kind).index(a)
        entries.append((group[kind], rank, name))
    named = [n for _, _, n in sorted(entries)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    return named + letters + [str(d) for d in range(10)] + [f"{d:02d}" for d in range(100)]


def test_nethack_actions_are_balrogs():
    env = NetHackTextEnv("nethack")
    expected = _balrog_nethack_actions()
    assert len(expected) == 248 and env.actions == expected
    # Spot checks against BALROG's list: its table order, the shared-key commands, no extras.
    a = env.actions
    assert a[:4] == ["north", "east", "south", "west"] and a[16:20] == ["up", "down", "wait", "more"]
    assert a.index("esc") < a.index("engrave") < a.index("enhance")
    assert a.index("fire") == a.index("fight") - 1
    assert a[a.index("zap") + 1:a.index("zap") + 3] == ["space", "a"] and a[-1] == "99"
    for name in ("seeamulet", "seegold", "seespells", "turnundead", "versionshort"):
        assert name in a
    for name in ("annotate", "overview", "teleport", "travel", "minus", "apos", "plus", "quote", "dollar",
                 "help", "extcmd", "save", "quit"):
        assert name not in a
    # The instruction lists exactly the named actions, one per line.
    listed = [ln.split(":")[0] for ln in env.instruction.split("\n\n")[1].splitlines()]
    assert listed == a[:a.index("a")]
    env.close()


def test_nethack_extra_commands_are_opt_in():
    env = NetHackTextEnv("nethack", extra_commands="travel, overview,minus")
    base = _balrog_nethack_actions()
    named = base[:base.index("a")]
    assert env.actions == named + ["travel", "overview", "minus"] + base[len(named):]
    listed = [ln.split(":")[0] for ln in env.instruction.split("\n\n")[1].splitlines()]
    assert listed[-3:] == ["travel", "overview", "minus"]
    env.reset(seed=42)
    _, _, _, _, info = env.step("travel")
    assert not info["invalid_action"] and info["action"] == "travel"
    env.close()
    plus = NetHackTextEnv("nethack", extra_commands=("plus",))
    assert plus._action_keys["plus"] == plus._action_keys["seespells"]  # the same '+' key
    plus.close()
    with pytest.raises(ValueError, match="unknown extra_commands"):
        NetHackTextEnv("nethack", extra_commands="fly")
    with pytest.raises(ValueError, match="NetHack only"):
        NetHackTextEnv("Corridor-R3", extra_commands="travel")

