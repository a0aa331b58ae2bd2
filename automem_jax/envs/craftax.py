"""Craftax-Classic (PyPI ``craftax``): a batch of Crafter-like episodes stepped by one jitted ``vmap``.

Craftax's gymnax-style auto-reset rebuilds a whole world on every step (15-50x slower on CPU), so we
call its ``craftax_step`` / ``generate_world`` directly and reset slots ourselves, only when asked.
Each slot has its own PRNG key (from its seed), so an episode does not depend on which other episodes
share the batch. The jitted step also cuts each player's 7x9 window out of the map, overlays the mobs
and turns it into Crafter semantic ids in Crafter's (x, y) order; one ``device_get`` per step brings
those small arrays to the host, where ``describe_crafter`` writes BALROG's text for the whole batch.

Differences from Crafter that matter when comparing numbers: world generation, mob caps (3 zombies,
3 cows, 2 skeletons), furnace/iron-tool costs, and saplings/ripe plants being blocks (both shown as
``plant``, as Crafter's plant object). Same 17 actions, same 22 achievements, same text format.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from . import describe_crafter as dc
from .base import BatchedTextEnv, EpisodeOverError, Obs, StepResult, resolve_action
from .progression import CRAFTER_ACHIEVEMENTS, crafter_progression, crafter_unlocked_from_mask

_U32 = 0xFFFFFFFF


def _seed_to_key(seed: int) -> np.ndarray:
    # The high and low 32-bit words of the seed: jax.random.PRNGKey(seed) for seeds < 2**32, built
    # without a device dispatch (and without PRNGKey truncating larger seeds when x64 is off).
    if seed < 0 or seed >= 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return np.array([(seed >> 32) & _U32, seed & _U32], np.uint32)


class CraftaxClassicBatch(BatchedTextEnv):
    """``num_envs`` Craftax-Classic episodes behind BALROG's Crafter text.

    max_steps: steps per episode before truncation (BALROG's Crafter bound is 2000); Craftax's own
    10,000-step limit also truncates. device: where the game runs ("cpu" by default, leaving
    accelerators to the LLM; a jax Device or None for JAX's default). Obs.extras: ``vitals``,
    ``inventory``, ``achievements`` (unlocked names), ``sleeping``, ``step``, ``seed``, ``local_view``
    (9x7 Crafter semantic ids, x-major).
    """

    def __init__(self, num_envs: int = 1, max_steps: int = 2000, device="cpu"):
        import jax
        import jax.numpy as jnp
        from craftax.craftax_classic.constants import Achievement, BlockType
        from craftax.craftax_classic.envs.craftax_state import EnvParams, StaticEnvParams
        from craftax.craftax_classic.game_logic import craftax_step
        from craftax.craftax_classic.world_gen import generate_world

        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.num_envs, self.max_steps = num_envs, max_steps
        self.actions = list(dc.ACTIONS)
        self._action_ids = {a: i for i, a in enumerate(dc.ACTIONS)}
        self.default_action = dc.DEFAULT_ACTION
        self.instruction = dc.instruction("Craftax-Classic")
        # This process's own device: on a multi-host run jax.devices()[0] belongs to process 0.
        self._device = jax.local_devices(backend=device)[0] if isinstance(device, str) else device
        params, static = EnvParams(), StaticEnvParams()
        self._max_timesteps = int(params.max_timesteps)

        block_to_id = np.zeros(len(BlockType), np.int32)
        for b in BlockType:
            name = {"CRAFTING_TABLE": "table", "PLANT": "plant", "RIPE_PLANT": "plant",
                    "INVALID": "nothing", "OUT_OF_BOUNDS": "nothing"}.get(b.name, b.name.lower())
            block_to_id[b.value] = dc.ID[name]
        block_to_id = jnp.asarray(block_to_id)
        # player_direction: 1 LEFT, 2 RIGHT, 3 UP, 4 DOWN (Craftax Action ids) -> Crafter (dx, dy).
        facing_table = jnp.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], jnp.int32)
        ach_perm = jnp.array([Achievement[n.upper()].value for n in CRAFTER_ACHIEVEMENTS])
        mob_ids = [("zombies", dc.ID["zombie"]), ("cows", dc.ID["cow"]),
                   ("skeletons", dc.ID["skeleton"]), ("arrows", dc.ID["arrow"])]
        half = jnp.array([dc.VIEW_H // 2, dc.VIEW_W // 2])  # (rows, cols) = (3, 4)
        pad = max(dc.VIEW_W, dc.VIEW_H)

        def observe(state):
            # Craftax rows are y (south-positive) and columns x: crafter's view[x, y] is the transpose.
            grid = jnp.pad(state.map, pad, constant_values=BlockType.OUT_OF_BOUNDS.value)
            corner = state.player_position - half + pad
            view = block_to_id[jax.lax.dynamic_slice(grid, corner, (dc.VIEW_H, dc.VIEW_W))]
            for field, mob_id in mob_ids:
                mobs = getattr(state, field)
                rel = mobs.position - state.player_position + half
                inside = mobs.mask & (rel >= 0).all(-1) & (rel < jnp.array([dc.VIEW_H, dc.VIEW_W])).all(-1)
                rows = jnp.where(inside, rel[:, 0], dc.VIEW_H)  # out of range -> dropped
                view = view.at[rows, rel[:, 1]].set(mob_id, mode="drop")
            view = view.at[half[0], half[1]].set(dc.PLAYER)
            inv = state.inventory
            return {
                "local": view.T.astype(jnp.int8),
                "facing": facing_table[state.player_direction],
                "sleeping": jnp.asarray(state.is_sleeping, bool),
                "vitals": jnp.stack([state.player_health, state.player_food,
                                     state.player_drink, state.player_energy]).astype(jnp.int32),
                "inventory": jnp.stack([getattr(inv, n) for n in dc.ITEMS]).astype(jnp.int32),
                "achievements": state.achievements[ach_perm],
                "timestep": jnp.asarray(state.timestep, jnp.int32),
            }

        def strong(state):
            # Fresh worlds hold Python scalars (weakly typed once traced) where stepped states hold
            # int32 arrays; one concrete type for both keeps the jitted step to a single compile.
            return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.asarray(x).dtype), state)

        def new_episode(key):
            world_key, step_key = jax.random.split(key)
            return strong(generate_world(world_key, params, static)), step_key

        def step_one(state, key, action, active):
            next_key, sub = jax.random.split(key)
            new, reward = craftax_step(sub, state, action, params, static)
            state = strong(jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state))
            return state, jnp.where(active, next_key, key), jnp.where(active, reward, 0.0)

        def step(states, keys, actions, active):
            states, keys, rewards = jax.vmap(step_one)(states, keys, actions, active)
            return states, keys, rewards, jax.vmap(observe)(states)

        def reset_all(seed_keys):
            states, keys = jax.vmap(new_episode)(seed_keys)
            return states, keys, jax.vmap(observe)(states)

        def reset_one(states, keys, index, seed_key):
            state, key = new_episode(seed_key)
            states = jax.tree.map(lambda b, s: b.at[index].set(s), states, state)
            return states, keys.at[index].set(key), jax.tree.map(lambda x: x[None], observe(state))

        self._jnp = jnp
        self._jit_step = jax.jit(step, donate_argnums=(0, 1))
        self._jit_reset_all = jax.jit(reset_all)
        self._jit_reset_one = jax.jit(reset_one, donate_argnums=(0, 1))
        self._jit_observe = jax.jit(jax.vmap(observe))
        self._device_get = jax.device_get
        self._device_put = lambda x: jax.device_put(x, self._device)

        self._states = None
        self._keys = None
        self._seeds: list[int | None] = [None] * num_envs
        self._steps = np.zeros(num_envs, np.int64)
        self._live = np.zeros(num_envs, bool)
        self._ach = np.zeros((num_envs, len(CRAFTER_ACHIEVEMENTS)), bool)

    # -- batched API ---------------------------------------------------------------------------------
    def reset_batch(self, seeds: Sequence[int | None] | None = None,
                    indices: Sequence[int] | None = None) -> list[Obs]:
        sd, idx = self._resolve_indices(seeds, indices)
        sd = [secrets.randbits(31) if s is None else int(s) for s in sd]
        keys = np.stack([_seed_to_key(s) for s in sd])
        if self._states is None or len(idx) == self.num_envs:
            # One vmapped world generation; slots not being reset get throwaway worlds (and stay not live).
            full = np.zeros((self.num_envs, 2), np.uint32)
            full[idx] = keys
            self._states, self._keys, view = self._jit_reset_all(self._device_put(full))
            view = self._device_get(view)
            views = {i: {k: v[i:i + 1] for k, v in view.items()} for i in idx}
        else:
            views = {}
            for i, key in zip(idx, keys):
                self._states, self._keys, v = self._jit_reset_one(
                    self._states, self._keys, np.int32(i), self._device_put(key))
                views[i] = self._device_get(v)
        out = []
        for i, s in zip(idx, sd):
            self._seeds[i], self._steps[i], self._live[i] = s, 0, True
            self._ach[i] = views[i]["achievements"][0]
            out.append(self._texts(views[i], [i])[0])
        return out

    def _step_slots(self, actions: dict[int, str]) -> dict[int, StepResult]:
        if not actions:
            return {}
        for i in actions:
            if not self._live[i]:
                raise EpisodeOverError(f"Craftax slot {i} has no running episode; reset it first")
        act = np.zeros(self.num_envs, np.int32)
        active = np.zeros(self.num_envs, bool)
        infos = {}
        for i, a in actions.items():
            executed, infos[i] = resolve_action(a, self._action_ids, self.default_action)
            act[i], active[i] = self._action_ids[executed], True
        self._states, self._keys, rewards, view = self._jit_step(
            self._states, self._keys, self._device_put(act), self._device_put(active))
        rewards, view = self._device_get((rewards, view))
        idx = sorted(actions)
        obs = self._texts({k: v[idx] for k, v in view.items()}, idx)
        out = {}
        for j, i in enumerate(idx):
            self._steps[i] += 1
            self._ach[i] = view["achievements"][i]
            terminated = bool(view["vitals"][i, 0] <= 0)  # dead (standing in lava also zeroes health)
            truncated = not terminated and bool(
                self._steps[i] >= self.max_steps or view["timestep"][i] >= self._max_timesteps)
            self._live[i] = not (terminated or truncated)
            infos[i].update(step=int(self._steps[i]), seed=self._seeds[i],
                            achievements=obs[j].extras["achievements"], progression=self.progression(i))
            out[i] = StepResult(obs[j], float(rewards[i]), terminated, truncated, infos[i])
        return out

    def progression(self, index: int) -> float:
        self._check_index(index)
        return crafter_progression(crafter_unlocked_from_mask(self._ach[index]))

    def is_live(self, index: int) -> bool:
        """Whether slot ``index`` has an episode that can be stepped."""
        return bool(self._live[index])

    # -- text ----------------------------------------------------------------------------------------
    def _texts(self, view: dict, idx: list[int]) -> list[Obs]:
        vitals, inv = view["vitals"], view["inventory"]
        texts = dc.describe_batch(view["local"], view["facing"], view["sleeping"], vitals[:, 0] <= 0,
                                  vitals, inv)
        out = []
        for j, i in enumerate(idx):
            vit, inv_d = dc.inventory_extras(vitals[j], inv[j])
            extras = {"vitals": vit, "inventory": inv_d,
                      "achievements": crafter_unlocked_from_mask(view["achievements"][j]),
                      "sleeping": bool(view["sleeping"][j]), "step": int(self._steps[i]),
                      "seed": self._seeds[i], "local_view": view["local"][j]}
            out.append(Obs(texts[j][0], texts[j][1], extras))
        return out

    def describe_states(self, states) -> list[Obs]:
        """Texts for arbitrary batched Craftax-Classic ``EnvState``s (e.g. hand-built ones)."""
        view = self._device_get(self._jit_observe(states))
        n = len(view["local"])
        texts = dc.describe_batch(view["local"], view["facing"], view["sleeping"],
                                  view["vitals"][:, 0] <= 0, view["vitals"], view["inventory"])
        return [Obs(lt, st, {"local_view": view["local"][j]}) for j, (lt, st) in zip(range(n), texts)]
