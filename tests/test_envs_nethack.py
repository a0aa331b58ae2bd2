"""NetHack and MiniHack as text: random runs, BALROG's layout and actions, progression, Boxoban."""
import re

import numpy as np
import pytest

from automem_jax.envs import EpisodeOverError, make
from automem_jax.envs.describe_nle import _DIR16, direction
from automem_jax.envs.nethack import MINIHACK_ACTION_NAMES, NetHackTextEnv
from automem_jax.envs.progression import (BL_DEPTH, BL_XP, NETHACK_DLVL, NETHACK_XP, MiniHackProgress,
                                          NetHackProgress, nethack_milestone)

_DIR = "|".join(sorted(_DIR16, key=len, reverse=True))
AROUND_LINE = re.compile(rf".+ \d+ steps? (?:{_DIR})(?:(?:, and |, | and )(?:{_DIR}))*")
CURSOR = re.compile(rf"(?:Yourself a .+|.+ \d+ steps? (?:{_DIR})|)\n\(x=(\d+), y=(\d+)\)")


def assert_hybrid_text(obs, done):
    lt, st = obs.long_term, obs.short_term
    m = re.fullmatch(r"message:\n(.*)\n\nlanguage observation:\n(.*)\n\ncursor:\n(.*)\n\nmap:\n(.*)\n\n", lt,
                     re.S)
    assert m, lt
    message, around, cursor, screen = m.groups()
    assert "\n\nmap:\n" not in around + cursor
    assert message == obs.extras["message"]
    if not done:
        assert "--More--" not in message
    for line in filter(None, around.split("\n")):
        assert AROUND_LINE.fullmatch(line), line
    c = CURSOR.fullmatch(cursor)
    assert c and 0 <= int(c.group(1)) < 80 and 0 <= int(c.group(2)) < 24, cursor
    rows = screen.split("\n")
    assert len(rows) == 23 and all(len(r) <= 80 for r in rows)
    assert rows == obs.extras["map"]
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
    for a in ("north", "far southwest", "down", "more", "esc", "pray", "travel", "a", "Z", "7", "00", "99"):
        assert a in env.actions
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
    assert "boulder 1 step east" in obs.long_term
    obs, reward, terminated, truncated, info = env.step("east")  # push the boulder onto the fountain
    assert terminated and env.progression() == 1.0
    with pytest.raises(ValueError, match="boxoban_levels="):  # the path did not leak into later envs
        make("minihack:Boxoban-Medium")
