"""Text environments behind one contract (``base.TextEnv`` / ``base.BatchedTextEnv``).

``make(name, num_envs=None, **kwargs)``:

- ``craftax``: Craftax-Classic in JAX (``craftax.CraftaxClassicBatch``), BALROG's Crafter text.
- ``crafter``: the original Crafter (``crafter.CrafterTextEnv``), BALROG's Crafter text.
- ``nethack``: ``NetHackChallenge-v0`` (``nethack.NetHackTextEnv``).
- ``minihack:<task>``: a MiniHack task, e.g. ``minihack:Corridor-R3`` (Boxoban needs ``boxoban_levels``).

With ``num_envs=None`` you get one episode (a ``TextEnv``); with ``num_envs=N`` a ``BatchedTextEnv``
of N slots: one jitted vmap for Craftax, ``num_workers`` processes for NetHack/MiniHack
(``num_workers=0`` steps them in this process), a serial batch for crafter.
Backends are imported on first use: importing this package pulls in neither JAX nor NLE.
"""
from __future__ import annotations

from .base import (BatchedTextEnv, EpisodeOverError, EpisodeView, Obs, SerialBatch, StepResult,
                   TextEnv, resolve_action)

from .nethack import MINIHACK_TASKS

MINIHACK_PREFIX = "minihack:"
KNOWN_ENVS = ("craftax", "crafter", "nethack") + tuple(MINIHACK_PREFIX + t for t in MINIHACK_TASKS)

__all__ = ["BatchedTextEnv", "EpisodeOverError", "EpisodeView", "KNOWN_ENVS", "Obs", "SerialBatch",
           "StepResult", "TextEnv", "make", "resolve_action"]


def make(name: str, num_envs: int | None = None, **kwargs) -> TextEnv | BatchedTextEnv:
    """Build an environment by name; see the module docstring for names and keywords."""
    if num_envs is not None and (not isinstance(num_envs, int) or num_envs < 1):
        raise ValueError(f"num_envs must be None (one episode) or a positive int, got {num_envs!r}")
    if name == "craftax":
        from .craftax import CraftaxClassicBatch

        batch = CraftaxClassicBatch(num_envs or 1, **kwargs)
        return batch if num_envs is not None else batch.episode(0)
    if name == "crafter":
        from .crafter import CrafterTextEnv

        if num_envs is None:
            return CrafterTextEnv(**kwargs)
        return SerialBatch([CrafterTextEnv(**kwargs) for _ in range(num_envs)])
    if name == "nethack" or name.startswith(MINIHACK_PREFIX):
        task = "NetHackChallenge-v0" if name == "nethack" else name[len(MINIHACK_PREFIX):]
        if not task:
            raise ValueError(f"{name!r} names no MiniHack task; e.g. {MINIHACK_PREFIX}Corridor-R3. "
                             f"Known: {', '.join(KNOWN_ENVS)}")
        num_workers = kwargs.pop("num_workers", None)
        if num_envs is None:
            if num_workers not in (None, 0):
                raise ValueError("num_workers needs num_envs (a batch); one episode runs in this process")
            from .nethack import NetHackTextEnv

            return NetHackTextEnv(task, **kwargs)
        if num_workers == 0:
            from .nethack import NetHackTextEnv

            return SerialBatch([NetHackTextEnv(task, **kwargs) for _ in range(num_envs)])
        from .workers import NLEWorkerPool

        return NLEWorkerPool(task, num_envs, num_workers, **kwargs)
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(KNOWN_ENVS)} "
                     f"(or {MINIHACK_PREFIX}<any registered MiniHack task>)")
