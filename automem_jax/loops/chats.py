"""From one LOG or PLAN phase record of a trace line to the chat of a memory example.

The one converter of trace phases to training chats: Loop 2 mines its candidates with it and the
scripted teacher's warm-start data is built with it. Each turn's prompt is the user message it
answered (turn 0: the phase's initial prompt; later: the continuation holding the previous turn's
results), so the chat is the one the model saw, replies verbatim.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from automem_jax.agent.types import PHASE_PLAN, ROLE_GAMEPLAY

__all__ = ["memory_turns", "turns_chat", "phase_chat"]


def memory_turns(phase_rec: Mapping, phase: str | None = None) -> list[dict]:
    """The turns of a phase record that belong to a memory example (``phase``: "log" or "plan";
    by default the record's own ``phase``).

    PLAN keeps only the memory consultation: the gameplay model's turns (two-model runs) are not
    the specialist's to learn. A failed call (error set) ends the usable part of a phase. A
    trailing action-only turn stays: upstream's examples end with the turn that commits the
    action, and post-processing drops a PLAN whose last turn is action-only.
    """
    phase = phase or phase_rec.get("phase")
    turns = []
    for t in phase_rec.get("turns") or []:
        if t.get("error") is not None:
            break
        if phase == PHASE_PLAN and t.get("model_role") == ROLE_GAMEPLAY:
            break
        turns.append(t)
    return turns


def turns_chat(turns: Sequence[Mapping]) -> list[dict]:
    """User/assistant messages of ``turns``: each turn's prompt, then its reply."""
    msgs = []
    for t in turns:
        msgs.append({"role": "user", "content": t.get("prompt", "")})
        msgs.append({"role": "assistant", "content": t.get("response", "")})
    return msgs


def phase_chat(phase_rec: Mapping, phase: str | None = None) -> list[dict]:
    """The memory example's chat of one phase record (empty when no turn is usable)."""
    return turns_chat(memory_turns(phase_rec, phase))
