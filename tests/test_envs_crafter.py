"""The original crafter behind BALROG's Crafter text."""
import numpy as np
import pytest

from automem_jax.envs import EpisodeOverError, make
from automem_jax.envs.crafter import CrafterTextEnv
from tests.test_envs_craftax import BALROG_ACTIONS
from tests.test_envs_describe import assert_crafter_text


def test_random_run_200_steps():
    env = make("crafter", max_steps=90)
    assert isinstance(env, CrafterTextEnv)
    assert env.actions == BALROG_ACTIONS and env.default_action == "Noop"
    rng = np.random.default_rng(0)
    obs = env.reset(seed=3)
    assert_crafter_text(obs)
    assert env._env._step == 1  # BALROG's reset takes one Noop step
    episodes, steps = 1, 0
    for t in range(200):
        a = BALROG_ACTIONS[rng.integers(17)] if t % 7 else "jump"
        obs, reward, terminated, truncated, info = env.step(a)
        steps += 1
        assert_crafter_text(obs)
        assert info["invalid_action"] == (a == "jump") and info["action"] == ("Noop" if a == "jump" else a)
        assert 0.0 <= env.progression() <= 1.0
        assert env.progression() == len(info["achievements"]) / 22
        if terminated or truncated:
            assert truncated != terminated
            assert truncated == (steps == 90)
            with pytest.raises(EpisodeOverError):
                env.step("Noop")
            obs, episodes, steps = env.reset(seed=3 + episodes), episodes + 1, 0
            assert env.progression() == 0.0
    assert episodes >= 3


def test_seed_fixes_the_world():
    env = CrafterTextEnv()
    a = env.reset(seed=11)
    b = env.reset(seed=11)
    c = env.reset(seed=12)
    assert a.long_term == b.long_term
    assert (a.extras["local_view"] == b.extras["local_view"]).all()
    assert a.long_term != c.long_term


def test_lower_case_noop_is_invalid_and_runs_noop():
    # Upstream's Crafter fallback 'noop' is not one of Crafter's action strings.
    from automem_jax.envs.base import invalid_action_notice, with_invalid_notice
    env = make("crafter")
    env.reset(seed=3)
    obs, _, _, _, info = env.step("noop")
    assert (info["action"], info["raw_action"], info["invalid_action"]) == ("Noop", "noop", True)
    noted = with_invalid_notice(obs, info["action"])
    assert noted.long_term == invalid_action_notice("Noop") + obs.long_term
    assert noted.text.startswith("NOTE: your previous output was not a valid action") and noted.short_term == obs.short_term
