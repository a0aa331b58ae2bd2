"""Messages exchanged between a MemoryAgent and whatever runs the model.

The agent never calls a model: it yields a ChatRequest and is sent back a Completion. The LLM
client layer and the rollout runner import these two types from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from automem_jax.memory.schema import PHASE_LOG, PHASE_PLAN, PHASES  # noqa: F401  (part of this API)

# Who should answer a request. A single-model run routes everything to one model and ignores
# the role; the two-model router sends MEMORY to the specialist and GAMEPLAY/POLICY to the base.
ROLE_POLICY = "policy"
ROLE_MEMORY = "memory"
ROLE_GAMEPLAY = "gameplay"
ROLES = (ROLE_POLICY, ROLE_MEMORY, ROLE_GAMEPLAY)



@dataclass
class ChatRequest:
    """One generation request: a full chat (no system message; Qwen's template adds its own)."""

    messages: list[dict[str, str]]
    phase: str
    model_role: str
    stop: list[str] | None = None
    max_tokens: int = 4096

    @property
    def prompt(self) -> str:
        """The last user message: the part of the chat that is new for this turn."""
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class Completion:
    """A model's answer. `error` set means the call failed; the agent ends the phase then."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None
    model_id: str = ""


class ObsLike(Protocol):
    """What the agent reads from an observation; ``automem_jax.envs.base.Obs`` satisfies it."""

    long_term: str
    short_term: str

