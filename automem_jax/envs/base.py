"""The TextEnv contract: one episode of a game seen as text, and batched back ends behind it.

A ``TextEnv`` is one episode: ``reset(seed) -> Obs`` and ``step(action) -> (obs, reward, terminated,
truncated, info)`` with string actions. Batched back ends (Craftax under ``jax.vmap``, NLE worker pools)
implement ``BatchedTextEnv``: ``reset_batch`` / ``step_batch`` over N slots, plus ``episode(i)``, a
``TextEnv`` view of slot ``i`` so that code written for one episode runs unchanged on a batch.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass
class Obs:
    """One observation as text.

    ``long_term`` and ``short_term`` are BALROG's two context blocks: the long-term block goes into the
    agent's history, the short-term block (status, inventory) is shown for the current step only.
    ``extras`` carries structured data an agent's context blocks may want (inventory dict, vitals,
    map rows, ...); its keys depend on the environment and are documented by each back end.
    """

    long_term: str
    short_term: str
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        """Both blocks as one string, the way AutoMem shows an observation to its agent."""
        return self.long_term + "\n" + self.short_term


@dataclasses.dataclass
class StepResult:
    obs: Obs
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def as_tuple(self) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        return self.obs, self.reward, self.terminated, self.truncated, self.info


class EpisodeOverError(RuntimeError):
    """Raised by ``step`` on an episode that has ended (or was never reset)."""


def resolve_action(action: Any, valid: Mapping[str, Any] | set[str], default: str) -> tuple[str, dict]:
    """Map a proposed action string to an executable one.

    Exact string membership, as BALROG's ``check_action_validity``; anything else (wrong case, extra
    words, a non-string) becomes ``default``. Returns the executed action and the info fields that
    report what happened.
    """
    if isinstance(action, str) and action in valid:
        return action, {"action": action, "raw_action": action, "invalid_action": False}
    return default, {"action": default, "raw_action": action, "invalid_action": True}


def invalid_action_notice(executed: str) -> str:
    """The line put before the next observation after an invalid action (BALROG's
    ``feedback_on_invalid_action``; our wording): says the output was not a valid action and
    which action the game ran instead."""
    return (f"NOTE: your previous output was not a valid action, so the game played the default "
            f"action instead: {executed}\n\nCurrent observation:\n")


def with_invalid_notice(obs: Obs, executed: str) -> Obs:
    """``obs`` with the invalid-action notice put before its long-term block, as BALROG's evaluator
    does, so the notice reaches every prompt that shows the observation and the comparison of
    consecutive observations."""
    return dataclasses.replace(obs, long_term=invalid_action_notice(executed) + obs.long_term,
                               extras={**obs.extras, "invalid_action_notice": True})


class TextEnv(abc.ABC):
    """One episode of a text game. See the module docstring."""

    actions: list[str]
    default_action: str
    instruction: str

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> Obs: ...

    @abc.abstractmethod
    def step(self, action: str) -> tuple[Obs, float, bool, bool, dict[str, Any]]: ...

    @abc.abstractmethod
    def progression(self) -> float:
        """BALROG progression of the current episode, in [0, 1]."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BatchedTextEnv(abc.ABC):
    """N episode slots stepped together.

    ``step_batch`` takes either a mapping ``{slot: action}`` (slots left out are not stepped) and
    returns ``{slot: StepResult}``, or a sequence of length ``num_envs`` with ``None`` for slots not
    to step, and returns a list with ``None`` in those places. A slot whose episode has ended must be
    reset (``reset_batch(seeds, indices)``) before it is stepped again.
    """

    num_envs: int
    actions: list[str]
    default_action: str
    instruction: str

    @abc.abstractmethod
    def reset_batch(self, seeds: Sequence[int | None] | None = None,
                    indices: Sequence[int] | None = None) -> list[Obs]:
        """Start new episodes in ``indices`` (all slots if None) with ``seeds`` (None: fresh random)."""

    @abc.abstractmethod
    def _step_slots(self, actions: dict[int, str]) -> dict[int, StepResult]:
        """Step the given slots; ``actions`` may hold invalid strings (validated here)."""

    @abc.abstractmethod
    def progression(self, index: int) -> float: ...

    def step_batch(self, actions: Mapping[int, str] | Sequence[str | None]):
        if isinstance(actions, Mapping):
            for i in actions:
                self._check_index(i)
            return self._step_slots(dict(actions))
        if isinstance(actions, (str, bytes)) or len(actions) != self.num_envs:
            raise ValueError(
                f"step_batch expects a mapping {{slot: action}} or a sequence of {self.num_envs} actions "
                f"(None for slots not to step); got {type(actions).__name__} of length "
                f"{len(actions) if hasattr(actions, '__len__') else '?'}")
        out = self._step_slots({i: a for i, a in enumerate(actions) if a is not None})
        return [out.get(i) for i in range(self.num_envs)]

    def progressions(self) -> list[float]:
        return [self.progression(i) for i in range(self.num_envs)]

    def episode(self, index: int) -> "EpisodeView":
        self._check_index(index)
        return EpisodeView(self, index)

    def episodes(self) -> list["EpisodeView"]:
        return [EpisodeView(self, i) for i in range(self.num_envs)]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_index(self, index: int) -> None:
        if not isinstance(index, (int,)) or not 0 <= index < self.num_envs:
            raise IndexError(f"slot {index!r} out of range for a batch of {self.num_envs}")

    def _resolve_indices(self, seeds, indices) -> tuple[list[int | None], list[int]]:
        idx = list(range(self.num_envs)) if indices is None else [int(i) for i in indices]
        for i in idx:
            self._check_index(i)
        if len(set(idx)) != len(idx):
            raise ValueError(f"duplicate slots in {idx}")
        sd = [None] * len(idx) if seeds is None else list(seeds)
        if len(sd) != len(idx):
            raise ValueError(f"got {len(sd)} seeds for {len(idx)} slots")
        return sd, idx


class EpisodeView(TextEnv):
    """Slot ``index`` of a batched back end, seen as a single-episode TextEnv."""

    def __init__(self, batch: BatchedTextEnv, index: int):
        self.batch = batch
        self.index = index

    @property
    def actions(self) -> list[str]:  # type: ignore[override]
        return self.batch.actions

    @property
    def default_action(self) -> str:  # type: ignore[override]
        return self.batch.default_action

    @property
    def instruction(self) -> str:  # type: ignore[override]
        return self.batch.instruction

    def reset(self, seed: int | None = None) -> Obs:
        return self.batch.reset_batch([seed], [self.index])[0]

    def step(self, action: str):
        return self.batch.step_batch({self.index: action})[self.index].as_tuple()

    def progression(self) -> float:
        return self.batch.progression(self.index)


class SerialBatch(BatchedTextEnv):
    """N single-episode TextEnvs behind the batched interface, stepped one after another in-process."""

    def __init__(self, envs: Sequence[TextEnv]):
        if not envs:
            raise ValueError("SerialBatch needs at least one env")
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        first = self.envs[0]
        self.actions, self.default_action, self.instruction = first.actions, first.default_action, first.instruction

    def reset_batch(self, seeds=None, indices=None) -> list[Obs]:
        sd, idx = self._resolve_indices(seeds, indices)
        return [self.envs[i].reset(s) for s, i in zip(sd, idx)]

    def _step_slots(self, actions: dict[int, str]) -> dict[int, StepResult]:
        return {i: StepResult(*self.envs[i].step(a)) for i, a in actions.items()}

    def progression(self, index: int) -> float:
        return self.envs[index].progression()

    def close(self) -> None:
        for e in self.envs:
            e.close()
