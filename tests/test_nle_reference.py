"""Our NetHack / MiniHack text against BALROG's compiled C++ describer, observation by observation.

The reference is balrog-nle 0.9.0's ``NLELanguageObsv`` built by ``scripts/build_nle_reference.sh``;
around it this file rebuilds BALROG's Python (AutoMore, ``render_hybrid``) and AutoMem's rewrite,
written out here independently of ``describe_nle``. Every field must be identical. Skips only when
the reference could not be built (the reason comes from the build).
"""
from __future__ import annotations

import difflib
import re

import numpy as np
import pytest

from automem_jax.envs import describe_nle as dn
from automem_jax.envs.nethack import NetHackTextEnv
from tests import nle_reference

# (task, observations): NetHackChallenge plus four of the paper's MiniHack tasks, >= 2,000 in all.
RUNS = (("nethack", 1800), ("MazeWalk-9x9", 300), ("Corridor-R3", 300), ("CorridorBattle-Dark", 300),
        ("Quest-Easy", 300))
FIELDS = ("message", "message_per_screen", "glyphs", "cursor", "inventory", "map", "long_term",
          "short_term")

# AutoMem's scaffolds/*/environments/env_wrapper.py word list, in its order.
AUTOMEM = [(r"\bvery far\b", "9+ steps away"), (r"\bvery near\b", "2 steps away"),
           (r"\bfar\b", "5-8 steps away"), (r"\bnear\b", "3-4 steps away"),
           (r"\badjacent\b", "1 step away (directly reachable)")] + [
    (rf"\b{a}{b}\b", f"between {a} and {b}") for a, b in (
        ("north", "northeast"), ("east", "northeast"), ("east", "southeast"), ("south", "southeast"),
        ("south", "southwest"), ("west", "southwest"), ("west", "northwest"), ("north", "northwest"))]


def automem(text):
    for p, r in AUTOMEM:
        text = re.sub(p, r, text)
    return text


@pytest.fixture(scope="module")
def ref():
    obsv, reason = nle_reference.load()
    if obsv is None:
        pytest.skip(f"BALROG's C++ describer is not available: {reason}")
    return obsv


def _padded(tty):
    # text_message reads one byte before the screen when the top row is blank; make it a blank.
    buf = np.full(1 + tty.size, 32, np.uint8)
    buf[1:] = tty.reshape(-1)
    return buf[1:].reshape(tty.shape)


def ref_message(ref, tty):
    return ref.text_message(_padded(tty)).decode("latin-1")


def balrog_hybrid(ref, message, o):
    """BALROG's render_hybrid on C++ texts, then AutoMem's rewrite of both contexts."""
    glyphs = ref.text_glyphs(o["glyphs"], o["blstats"]).decode("latin-1")
    cursor = ref.text_cursor(o["glyphs"], o["blstats"], o["tty_cursor"]).decode("latin-1")
    inventory = ref.text_inventory(o["inv_strs"], o["inv_letters"]).decode("latin-1")
    ascii_map = "".join("".join(chr(c) for c in row) + "\n" for row in o["tty_chars"])
    ascii_map = "\n".join(ascii_map.split("\n")[1:])
    cur = o["tty_cursor"]
    blocks = [("message", message), ("language observation", glyphs),
              ("cursor", cursor + "\n" + f"(x={cur[1]}, y={cur[0]})"), ("map", ascii_map)]
    long_term = "\n".join(f"{k}:\n{v}\n" for k, v in blocks)
    short_term = "\n".join(f"{k}:\n{v}\n" for k, v in [("inventory", inventory)])
    return glyphs, cursor, inventory, ascii_map, automem(long_term), automem(short_term)


def _record(env, task, n_obs, seed):
    """Random play; per observation copies of the arrays, the screens seen since the last one, our text."""
    rng = np.random.default_rng(seed)
    frames = []
    inner_step = env._env.step

    def recording_step(key):
        raw, r, term, trunc, info = inner_step(key)
        frames.append((key, raw["tty_chars"].copy(), bool(term or trunc)))
        return raw, r, term, trunc, info

    env._env.step = recording_step
    records = []
    obs, keys, done = env.reset(seed=int(rng.integers(1 << 30))), None, False
    while True:
        o = {k: np.array(v, copy=True) for k, v in env._raw.items()}
        screens = [(None, o["tty_chars"], False)] if keys is None else list(frames)
        records.append(dict(task=task, obs=o, keys=keys, screens=screens, ours=obs))
        if len(records) >= n_obs:
            return records
        if done:
            obs, keys, done = env.reset(seed=int(rng.integers(1 << 30))), None, False
            continue
        frames.clear()
        action = env.actions[rng.integers(len(env.actions))]
        obs, _, term, trunc, info = env.step(action)
        keys, done = env._action_keys[info["action"]], term or trunc


def balrog_automore(ref, keys, screens, more_key):
    """BALROG's AutoMore over the recorded screens: (message, screens used) or (None, why)."""
    if keys is None:
        return ref_message(ref, screens[0][1]), 1
    i, message = 0, ""
    for key in keys:
        if i >= len(screens) or screens[i][0] != key:
            return None, f"screen {i} is not the agent's key {key}"
        _, tty, done = screens[i]
        i += 1
        message = ref_message(ref, tty)
        while "--More--" in message and not done:
            message = message.replace("--More--", "\n")
            if i >= len(screens) or screens[i][0] != more_key:
                return None, f"BALROG presses MORE after screen {i - 1}; we did not"
            _, tty, done = screens[i]
            i += 1
            message += ref_message(ref, tty)
        if done:
            break
    if i != len(screens):
        return None, f"BALROG stops after {i} screens; we stepped {len(screens)}"
    return message, i


def _show(a, b):
    if "\n" not in a + b:
        return f"    ours: {a!r}\n    C++ : {b!r}"
    diff = difflib.unified_diff(b.split("\n"), a.split("\n"), "C++", "ours", lineterm="", n=1)
    return "\n".join("    " + repr(line) for line in list(diff)[:14])


def test_text_identical_to_balrog_cpp(ref):
    from automem_jax.envs import nle_glyphs

    records = []
    for task, n in RUNS:
        env = NetHackTextEnv(task)
        try:
            records += [dict(r, more=env._more) for r in _record(env, task, n, seed=len(records))]
        finally:
            env.close()
    assert len(records) >= 2000

    agree = {f: 0 for f in FIELDS}
    total = {f: 0 for f in FIELDS}
    diffs = {f: [] for f in FIELDS}

    def check(field, ours, theirs, where):
        total[field] += 1
        if ours == theirs:
            agree[field] += 1
        elif len(diffs[field]) < 3:
            diffs[field].append(f"  [{where}]\n{_show(ours, theirs)}")

    for n, r in enumerate(records):
        o, ours = r["obs"], r["ours"]
        where = f"{r['task']} obs {n}"
        for _, tty, _ in r["screens"]:
            check("message_per_screen", dn.text_message(tty), ref_message(ref, tty), where)
        message, why = balrog_automore(ref, r["keys"], r["screens"], r["more"])
        if message is None:
            check("message", ours.extras["message"], f"<{why}>", where)
            message = ours.extras["message"]  # judge the rest of the context on its own
        else:
            check("message", ours.extras["message"], message, where)
        glyphs, cursor, inventory, ascii_map, long_term, short_term = balrog_hybrid(ref, message, o)
        check("glyphs", nle_glyphs.text_glyphs(o["glyphs"], o["blstats"]), glyphs, where)
        check("cursor", nle_glyphs.text_cursor(o["glyphs"], o["blstats"], o["tty_cursor"]), cursor, where)
        check("inventory", dn.text_inventory(o["inv_strs"], o["inv_letters"]), inventory, where)
        check("map", "".join(row + "\n" for row in ours.extras["map"]), ascii_map, where)
        check("long_term", ours.long_term, long_term, where)
        check("short_term", ours.short_term, short_term, where)

    summary = "\n".join(f"{f}: {agree[f]}/{total[f]} identical" for f in FIELDS)
    print(f"\n{len(records)} observations\n{summary}")
    bad = [f for f in FIELDS if agree[f] != total[f]]
    assert not bad, summary + "\n\nfirst differences:\n" + "\n".join(
        f"{f}:\n" + "\n".join(diffs[f]) for f in bad)


# Screens built to hit text_message's rules that random play rarely reaches: windows at an indent,
# pager marks of every kind, death screens (Points / list! on row 1), a blank top row.
_LINES = ["Things that are here:", "a +0 dagger", "--More--", "(end)", "(1 of 2)", "(2 of 3)",
          "(12 of 13)", "x (1 of 2)", "one of them", "Points Name", "You made the top ten list!",
          "Hello Agent, welcome to NetHack!", "  indented  ", "a", "\x1a pad \x1a", "trail ofx"]


def test_text_message_on_built_screens(ref):
    rng = np.random.default_rng(7)
    bad, total = [], 1000
    for _ in range(total):
        tty = np.full((24, 80), 32, np.uint8)
        for row in rng.choice(24, size=int(rng.integers(0, 8)), replace=False):
            text = _LINES[rng.integers(len(_LINES))]
            if rng.random() < 0.3:
                text += " " + _LINES[rng.integers(len(_LINES))]
            col = int(rng.choice([0, 0, 1, 30, 79 - len(text) if len(text) < 79 else 0]))
            raw = text.encode("latin-1")[: 80 - col]
            tty[row, col:col + len(raw)] = np.frombuffer(raw, np.uint8)
        if rng.random() < 0.2:
            tty[0, 79] = ord("z")  # only the last column set: the C++ trim reads it as blank
        ours, theirs = dn.text_message(tty), ref_message(ref, tty)
        if ours != theirs:
            bad.append(_show(ours, theirs))
    assert not bad, f"{len(bad)}/{total} differ; first:\n" + "\n".join(bad[:3])
