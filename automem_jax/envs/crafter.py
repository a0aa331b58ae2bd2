"""The original Crafter (PyPI ``crafter``) behind BALROG's text: the env behind BALROG's and AutoMem's numbers."""
from __future__ import annotations

import secrets

import numpy as np

from . import describe_crafter as dc
from .base import EpisodeOverError, Obs, TextEnv, resolve_action
from .progression import CRAFTER_ACHIEVEMENTS, crafter_progression


class CrafterTextEnv(TextEnv):
    """One Crafter episode as text.

    ``reset(seed)`` builds the world of ``crafter.Env(seed=seed)``'s first episode and, like BALROG's
    wrapper, takes one ``Noop`` step so the first observation carries the step info (this step does not
    count towards ``max_steps``). ``max_steps`` is BALROG's per-episode bound (2000 in its config);
    reaching it truncates. RGB frames are not rendered unless ``render_images=True``: the text does not
    need them and they cost more than the game step.
    """

    def __init__(self, max_steps: int = 2000, area: tuple[int, int] = (64, 64), length: int = 10000,
                 render_images: bool = False):
        import crafter

        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        # view (9, 9) gives the 9x7 local view that BALROG's describer reads.
        self._env = crafter.Env(area=tuple(area), view=(9, 9), length=length, reward=True, seed=0)
        if not render_images:
            self._env._obs = lambda: None
        self.max_steps = max_steps
        self.actions = list(dc.ACTIONS)
        self._action_ids = {a: i for i, a in enumerate(dc.ACTIONS)}
        self.default_action = dc.DEFAULT_ACTION
        self.instruction = dc.instruction("Crafter")
        self.seed: int | None = None
        self._steps = 0
        self._done = True

    def reset(self, seed: int | None = None) -> Obs:
        self.seed = secrets.randbits(31) if seed is None else int(seed)
        # crafter seeds episode k's world with hash((seed, k)); episode 1 is crafter.Env(seed=seed)'s first.
        self._env._seed, self._env._episode = self.seed, 0
        self._env.reset()
        self._env.step(0)
        self._steps, self._done = 0, False
        return self.observe()

    def step(self, action: str):
        if self._done:
            raise EpisodeOverError("the Crafter episode is over (or was never reset); call reset()")
        executed, info = resolve_action(action, self._action_ids, self.default_action)
        _, reward, crafter_done, _ = self._env.step(self._action_ids[executed])
        self._steps += 1
        terminated = self._env._player.health <= 0
        truncated = not terminated and (crafter_done or self._steps >= self.max_steps)
        self._done = terminated or truncated
        obs = self.observe()
        info.update(step=self._steps, seed=self.seed, achievements=obs.extras["achievements"],
                    progression=len(obs.extras["achievements"]) / len(CRAFTER_ACHIEVEMENTS))
        return obs, float(reward), bool(terminated), bool(truncated), info

    def unlocked(self) -> list[str]:
        ach = self._env._player.achievements
        return [n for n in CRAFTER_ACHIEVEMENTS if ach.get(n, 0) > 0]

    def progression(self) -> float:
        return crafter_progression(self.unlocked()) if self._env._player is not None else 0.0

    def observe(self) -> Obs:
        """The text of the current state (no step taken)."""
        env, player = self._env, self._env._player
        local = dc.local_view(env._sem_view(), player.pos)
        inv = player.inventory
        vitals = np.array([[inv[v] for v in dc.VITALS]])
        items = np.array([[inv[i] for i in dc.ITEMS]])
        (long_term, short_term), = dc.describe_batch(
            local[None], np.array([player.facing]), [player.sleeping], [inv["health"] <= 0], vitals, items)
        vit, inv_d = dc.inventory_extras(vitals[0], items[0])
        extras = {"vitals": vit, "inventory": inv_d, "achievements": self.unlocked(),
                  "sleeping": bool(player.sleeping), "step": self._steps, "seed": self.seed,
                  "local_view": local}
        return Obs(long_term, short_term, extras)
