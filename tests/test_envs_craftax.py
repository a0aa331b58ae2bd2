"""Craftax-Classic batched text env: random runs, reset handling, per-slot determinism, episode views."""
import numpy as np
import pytest

from automem_jax.envs import EpisodeOverError, TextEnv, make
from automem_jax.envs.progression import CRAFTER_ACHIEVEMENTS
from tests.test_envs_describe import assert_crafter_text

BALROG_ACTIONS = ["Noop", "Move West", "Move East", "Move North", "Move South", "Do", "Sleep", "Place Stone",
                  "Place Table", "Place Furnace", "Place Plant", "Make Wood Pickaxe", "Make Stone Pickaxe",
                  "Make Iron Pickaxe", "Make Wood Sword", "Make Stone Sword", "Make Iron Sword"]


@pytest.fixture(scope="module")
def batch():
    # Short episodes so that 200 steps see episodes end and slots reset on their own.
    b = make("craftax", num_envs=8, max_steps=120)
    yield b
    b.close()


@pytest.mark.slow  # ~25 s on 2 cores, mostly compiling the batched step
def test_random_run_batch_8(batch):
    rng = np.random.default_rng(0)
    assert batch.actions == BALROG_ACTIONS and batch.default_action == "Noop"
    for obs in batch.reset_batch(list(range(100, 108))):
        assert_crafter_text(obs)
    ended = 0
    choices = BALROG_ACTIONS + ["make wood pickaxe", "", "Move Up"]  # the last three are invalid
    for t in range(200):
        actions = [choices[k] for k in rng.integers(0, len(choices), 8)]
        results = batch.step_batch(actions)
        done = []
        for i, (a, r) in enumerate(zip(actions, results)):
            assert_crafter_text(r.obs)
            assert r.info["invalid_action"] == (a not in BALROG_ACTIONS)
            assert r.info["action"] == (a if a in BALROG_ACTIONS else "Noop")
            p = batch.progression(i)
            assert 0.0 <= p <= 1.0
            assert p == len(r.obs.extras["achievements"]) / 22
            assert set(r.obs.extras["achievements"]) <= set(CRAFTER_ACHIEVEMENTS)
            assert isinstance(r.reward, float) and not (r.terminated and r.truncated)
            if r.done:
                done.append(i)
        if done:
            ended += len(done)
            with pytest.raises(EpisodeOverError):
                batch.step_batch({done[0]: "Noop"})
            for i, obs in zip(done, batch.reset_batch([1000 + t * 8 + i for i in done], done)):
                assert obs.extras["step"] == 0 and batch.progression(i) == 0.0
    assert ended >= 8  # every slot hit max_steps at least once


def test_episode_depends_only_on_its_seed(batch):
    # Same seed in two slots, stepped at different times with different neighbours: same episode.
    rng = np.random.default_rng(1)
    actions = [BALROG_ACTIONS[k] for k in rng.integers(0, 17, 40)]
    first = batch.reset_batch([77, 77, 5], [2, 6, 0])
    a = [first[0].long_term]
    for act in actions:
        step = {2: act, **({0: "Move West"} if batch.is_live(0) else {})}
        a.append(batch.step_batch(step)[2].obs.long_term)
    b = [first[1].long_term]
    for act in actions:
        b.append(batch.step_batch({6: act})[6].obs.long_term)
    assert a == b
    other = batch.reset_batch([79], [6])[0].long_term
    assert other != first[0].long_term  # a different seed gives a different world


def test_episode_view(batch):
    env = batch.episode(3)
    assert isinstance(env, TextEnv) and env.actions == BALROG_ACTIONS
    assert "Collect Diamond" in env.instruction
    obs = env.reset(5)
    assert_crafter_text(obs)
    obs, reward, terminated, truncated, info = env.step("Dance")
    assert info["invalid_action"] and info["action"] == "Noop" and info["raw_action"] == "Dance"
    assert_crafter_text(obs)
    assert 0.0 <= env.progression() <= 1.0
