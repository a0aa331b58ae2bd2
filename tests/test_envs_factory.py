"""make(): names, returned types, and errors that say what to do."""
import subprocess
import sys

import pytest

from automem_jax.envs import (KNOWN_ENVS, BatchedTextEnv, EpisodeView, Obs, SerialBatch, TextEnv,
                              make, resolve_action)
from automem_jax.envs.crafter import CrafterTextEnv
from automem_jax.envs.nethack import NetHackTextEnv


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        make("craftr")
    for name in ("craftax", "crafter", "nethack", "minihack:Corridor-R3", "minihack:Boxoban-Hard"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="Corridor-R3"):
        make("minihack:")
    with pytest.raises(ValueError, match="num_envs"):
        make("crafter", num_envs=0)
    with pytest.raises(ValueError, match="num_workers needs num_envs"):
        make("nethack", num_workers=2)


def test_types():
    craftax = make("craftax")  # one episode: a view of a batch of one (nothing compiled yet)
    assert isinstance(craftax, EpisodeView) and isinstance(craftax, TextEnv)
    assert isinstance(make("craftax", num_envs=3), BatchedTextEnv)
    assert isinstance(make("crafter"), CrafterTextEnv)
    crafters = make("crafter", num_envs=2)
    assert isinstance(crafters, SerialBatch) and crafters.num_envs == 2
    nh = make("nethack")
    assert isinstance(nh, NetHackTextEnv) and nh.task == "NetHackChallenge-v0"
    mh = make("minihack:MiniHack-MazeWalk-9x9-v0")
    assert mh.task == "MiniHack-MazeWalk-9x9-v0" and "maze" in mh.instruction
    assert set(KNOWN_ENVS) >= {"minihack:Quest-Medium", "minihack:CorridorBattle-Dark"}


def test_action_validation_reports_instead_of_raising():
    valid = {"Noop": 0, "Do": 5}
    assert resolve_action("Do", valid, "Noop") == ("Do", {"action": "Do", "raw_action": "Do",
                                                          "invalid_action": False})
    for bad in ("do", " Do", None, 5, "Do\n"):
        executed, info = resolve_action(bad, valid, "Noop")
        assert executed == "Noop" and info["invalid_action"] and info["raw_action"] == bad


def test_step_batch_input_checks():
    batch = make("crafter", num_envs=2)
    with pytest.raises(ValueError, match="sequence of 2"):
        batch.step_batch(["Noop"])
    with pytest.raises(IndexError):
        batch.step_batch({5: "Noop"})
    with pytest.raises(ValueError, match="seeds for"):
        batch.reset_batch([1, 2, 3])
    assert Obs("a", "b").text == "a\nb"


def test_importing_envs_loads_no_backend():
    code = ("import sys, automem_jax.envs; "
            "print(sorted(m for m in ('nle', 'minihack', 'crafter', 'craftax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
