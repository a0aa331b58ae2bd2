"""The critic: reads rollout traces and revises the memory structure (Loop 1), judges memory turns (Loop 2).

``make_critic({"kind": "openai", ...})`` gives a hosted critic (``LLMCritic`` over ``CriticClient``,
browsing the traces with ``TraceTools`` by tool calling); ``make_critic({"kind": "heuristic"})``
the deterministic offline one. Both return proposals in ``PROPOSAL_FORMAT``; ``parse_proposal``
turns one into a structure document (the reply formats live in ``critic.protocol``).
"""
from automem_jax.critic.client import (Critic, CriticClient, CriticError, CriticReply, LLMCritic, Session, ToolCall,
                                       ToolsUnsupportedError, Usage, make_critic, run_session)
from automem_jax.critic.heuristic import HeuristicCritic, judge_one, run_stats
from automem_jax.critic.protocol import (PROPOSAL_FORMAT, JudgeError, ProposalError, ProposalReply, format_proposal,
                                         parse_decisions, parse_proposal)
from automem_jax.critic.tools import TraceTools

__all__ = [
    "Critic", "CriticClient", "CriticError", "CriticReply", "HeuristicCritic", "JudgeError", "LLMCritic",
    "PROPOSAL_FORMAT", "ProposalError", "ProposalReply", "Session", "ToolCall", "ToolsUnsupportedError", "TraceTools",
    "Usage", "format_proposal", "judge_one", "make_critic", "parse_decisions", "parse_proposal", "run_session",
    "run_stats",
]
