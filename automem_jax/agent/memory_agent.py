"""The LOG/PLAN memory agent, written as a coroutine so a runner can batch many of them.

Per env step: LOG (skipped at step 0) records what the previous action did, using read and write
ops, until DONE, a turn without ops, or the budget; PLAN consults memory read-only until the first
ACTION (no ops and no action, or an exhausted budget, gives the structure's fallback action).
The action is then validated against the env's action list (invalid -> the env's default action,
recorded). No chat history survives a step: all cross-step state is in the memory files.

Two-model mode (Loop 2): the memory specialist runs LOG and the memory consultation of PLAN; when
it commits (or stops issuing ops) its action is stripped and the chat is handed to the gameplay
model, which commits the action. Every turn records which model answered.

    gen = agent.act(obs)
    request = next(gen)                 # ChatRequest
    while True:
        try:
            request = gen.send(client.generate([request])[0])   # Completion
        except StopIteration as stop:
            action, record = stop.value
            break
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from automem_jax.agent.context import EpisodeHistory, obs_text, render_block
from automem_jax.agent.types import (PHASE_LOG, PHASE_PLAN, PHASES, ROLE_GAMEPLAY, ROLE_MEMORY,
                                     ROLE_POLICY, ChatRequest, Completion)
from automem_jax.memory.ops import strip_action
from automem_jax.memory.store import MemoryStore, OpResult, format_results
from automem_jax.memory.structure import MemoryStructure
from automem_jax.memory.template import placeholders, render

# Stands in for a specialist message that was nothing but its (stripped) action.
CONSULTATION_DONE = "(memory consultation complete)"

# What ends a turn loop, named as PhaseRecord.end_reason records it.
END_DONE, END_ACTION = "done", "action"


@dataclass(frozen=True)
class TurnPolicy:
    """What differs between the agent's turn loops: LOG, PLAN and the two-model consultation."""

    phase: str  # the turns' phase; the store runs only that phase's ops (PLAN is read-only)
    role: str  # the model that answers
    budget: int  # turns at most
    ends_on: str  # END_DONE: a turn with DONE; END_ACTION: a turn that commits an action
    continue_prompt: str  # the prompt that shows a turn's op results
    handoff: bool = False  # consultation: its end, or a turn without ops, hands the chat on


@dataclass
class TurnRecord:
    phase: str
    model_role: str
    prompt: str  # the user message this turn answered
    response: str
    ops: list[dict] = field(default_factory=list)  # memory ops run, in execution order
    tool_results: str = ""  # what the model was shown
    committed_action: str | None = None
    done: bool = False
    handoff: bool = False  # two-model: this specialist turn handed the chat to the gameplay model
    tokens_in: int = 0
    tokens_out: int = 0
    model_id: str = ""
    error: str | None = None


@dataclass
class PhaseRecord:
    phase: str
    initial_prompt: str = ""
    turns: list[TurnRecord] = field(default_factory=list)
    # log: done | no_ops | budget | error | skipped;  plan: action | no_ops | budget | error
    end_reason: str = ""
    final_action: str | None = None
    fallback: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_in(self) -> int:
        return sum(t.tokens_in for t in self.turns)

    @property
    def tokens_out(self) -> int:
        return sum(t.tokens_out for t in self.turns)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_in"], d["tokens_out"] = self.tokens_in, self.tokens_out
        return d


@dataclass
class StepRecord:
    """One line of a trace file (the runner fills in reward and done after env.step)."""

    step: int
    obs_long_term: str
    obs_short_term: str
    log: PhaseRecord
    plan: PhaseRecord
    raw_action: str  # what the agent submitted (after two-step repair)
    validated_action: str  # what the env will run
    action_valid: bool
    repaired: bool
    memory_snapshot: dict[str, str]
    context_blocks: dict[str, dict[str, str]]
    unchanged_count: int
    structure: str
    two_model: bool
    instruction_prompt: str | None = None  # step 0 only
    reward: float | None = None
    done: bool | None = None

    @property
    def tokens_in(self) -> int:
        return self.log.tokens_in + self.plan.tokens_in

    @property
    def tokens_out(self) -> int:
        return self.log.tokens_out + self.plan.tokens_out

    def turns(self) -> list[TurnRecord]:
        return self.log.turns + self.plan.turns

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["log"], d["plan"] = self.log.to_dict(), self.plan.to_dict()
        d["memory_snapshot"] = dict(self.memory_snapshot)
        d["tokens_in"], d["tokens_out"] = self.tokens_in, self.tokens_out
        return d


def _obs_parts(obs) -> tuple[str, str]:
    if isinstance(obs, str):
        return obs, ""
    if isinstance(obs, dict):
        text = obs.get("text", obs)
        return (str(text.get("long_term", text.get("long_term_context", "")) or ""),
                str(text.get("short_term", text.get("short_term_context", "")) or ""))
    return str(getattr(obs, "long_term", "") or ""), str(getattr(obs, "short_term", "") or "")


def _as_completion(reply) -> Completion:
    # Upstream's client strips each completion before the agent parses it or puts it in the chat.
    if isinstance(reply, Completion):
        text = (reply.text or "").strip()
        return reply if reply.text == text else dataclasses.replace(reply, text=text)
    if isinstance(reply, str):
        return Completion(text=reply.strip())
    return Completion(text="", error="no completion was sent to the agent")


class MemoryAgent:
    """One episode's agent. Call ``act(obs)`` once per env step and drive the generator."""

    def __init__(self, structure: MemoryStructure, *, actions: Sequence[str],
                 default_action: str, instruction: str = "", two_model: bool = False,
                 mirror_dir: str | os.PathLike | None = None, history_window: int = 64):
        # A private copy: later edits to the caller's document must not change a running agent.
        self.structure = s = structure.copy().validate()
        self.actions = list(actions)
        self._action_set = set(self.actions)
        self._action_lower = {a.lower(): a for a in self.actions}
        self.default_action = default_action
        self.instruction = s.instruction(instruction, self.actions)
        self.two_model = two_model
        self.budgets = s.budgets
        self.store = MemoryStore.from_structure(s, mirror_dir=mirror_dir)
        self._two_step = {c.lower() for c in s.two_step_commands}
        self._history_window = history_window
        self._commands = {p: s.commands_text(p) for p in PHASES}
        self._blocks = {p: s.context_blocks(p) for p in PHASES}
        self._file_guide = s.file_guide()
        self.reset()

    @classmethod
    def for_env(cls, structure: MemoryStructure, env, **kwargs) -> "MemoryAgent":
        """Take actions, default action and instruction from a TextEnv."""
        return cls(structure, actions=env.actions, default_action=env.default_action,
                   instruction=env.instruction, **kwargs)

    def reset(self) -> None:
        """Start a new episode: initial files, empty history."""
        self.store.reset()
        self.history = EpisodeHistory(window=self._history_window)
        self.prev_raw: str | None = None
        self.prev_validated: str | None = None
        self.prev_valid = True

    # ----------------------------------------------------------------- actions

    def repair_action(self, action: str) -> str:
        """'eat d' -> 'eat' for commands that take their argument at the game's next prompt."""
        action = action.strip()
        parts = action.split(None, 1)
        if len(parts) == 2 and parts[0].lower() in self._two_step:
            return parts[0].lower()
        return action

    def validate_action(self, action: str) -> tuple[str, bool]:
        """(action the env will run, whether the submitted one was valid)."""
        a = action.strip()
        if a in self._action_set:
            return a, True
        if self.structure.action_match == "case_insensitive" and a.lower() in self._action_lower:
            return self._action_lower[a.lower()], True
        return self.default_action, False

    # ----------------------------------------------------------------- the step coroutine

    def act(self, obs) -> Generator[ChatRequest, Completion, tuple[str, StepRecord]]:
        long_term, short_term = _obs_parts(obs)
        self.history.observe(long_term, short_term)
        step = self.history.step
        text = obs_text(long_term, short_term)
        blocks = {p: {name: render_block(name, self.history, p, params)
                      for name, params in self._blocks[p]} for p in PHASES}

        if step > 0 and self.prev_raw is not None:
            log = yield from self._log_phase(step, text, blocks[PHASE_LOG])
            log.notes.extend(self.store.prune())
        else:
            log = PhaseRecord(PHASE_LOG, end_reason="skipped")
        plan = yield from self._plan_phase(step, text, blocks[PHASE_PLAN])

        submitted = self.repair_action(plan.final_action)
        validated, valid = self.validate_action(submitted)
        self.history.record_action(submitted, validated)
        self.prev_raw, self.prev_validated, self.prev_valid = submitted, validated, valid
        record = StepRecord(
            step=step, obs_long_term=long_term, obs_short_term=short_term, log=log, plan=plan,
            raw_action=submitted, validated_action=validated, action_valid=valid,
            repaired=submitted != plan.final_action.strip(),
            memory_snapshot=self.store.snapshot(), context_blocks=blocks,
            unchanged_count=self.history.unchanged_streak, structure=self.structure.label,
            two_model=self.two_model, instruction_prompt=self.instruction if step == 0 else None)
        return validated, record

    # ----------------------------------------------------------------- phases

    def _values(self, phase: str, step: int, text: str, blocks: dict[str, str]) -> dict:
        template = self.structure.prompts[phase]
        named = placeholders(template)
        rest = [v for k, v in blocks.items() if k not in named and v.strip()]
        return {"guidance": self.structure.prompts.get("guidance") or "", "observation": text,
                "file_index": self.store.index(), "file_guide": self._file_guide,
                "commands": self._commands[phase],
                "step": step, "context": "\n\n".join(rest), **blocks}

    def _request(self, messages: list[dict], policy: TurnPolicy) -> ChatRequest:
        return ChatRequest(messages=list(messages), phase=policy.phase, model_role=policy.role,
                           stop=None, max_tokens=self.budgets["max_tokens"])

    def _turn(self, policy: TurnPolicy, messages: list[dict], reply: Completion,
              results: list[OpResult] | None = None) -> TurnRecord:
        results = results or []
        mem = [r for r in results if not r.is_control]
        action = next((r.args[0] for r in results if r.op == "ACTION"), None)
        return TurnRecord(phase=policy.phase, model_role=policy.role,
                          prompt=messages[-1]["content"], response=reply.text,
                          ops=[r.to_dict() for r in mem], tool_results=format_results(mem),
                          committed_action=action,
                          done=any(r.op == "DONE" for r in results),
                          tokens_in=reply.tokens_in, tokens_out=reply.tokens_out,
                          model_id=reply.model_id, error=reply.error)

    def _turns(self, policy: TurnPolicy, rec: PhaseRecord, messages: list[dict],
               extra: dict | None = None):
        """The one turn loop: ask, run the reply's ops, show their results, until the policy's end.

        Appends every turn to ``rec.turns`` and the chat to ``messages``; returns why it stopped:
        the policy's ``ends_on``, ``no_ops``, ``budget``, ``error`` or ``handoff``. ``extra`` holds
        values for the continue prompt beyond results and file_index.
        """
        p = self.structure.prompts
        for _ in range(policy.budget):
            reply = _as_completion((yield self._request(messages, policy)))
            if reply.error is not None:
                rec.turns.append(self._turn(policy, messages, reply))
                return "error"
            results = self.store.execute(reply.text, policy.phase)
            turn = self._turn(policy, messages, reply, results)
            rec.turns.append(turn)
            ended = turn.done if policy.ends_on == END_DONE else turn.committed_action is not None
            if policy.handoff and (ended or not turn.ops):
                # The specialist never chooses the game action: drop it, keep its lookups.
                turn.handoff = True
                said = (strip_action(reply.text) or CONSULTATION_DONE) if ended else reply.text
                handoff = (render(p["handoff_with_results"], {"results": turn.tool_results})
                           if turn.tool_results else p["handoff"])
                messages += [{"role": "assistant", "content": said},
                             {"role": "user", "content": handoff}]
                return "handoff"
            messages.append({"role": "assistant", "content": reply.text})
            if ended:
                return policy.ends_on
            if not turn.ops:
                return "no_ops"
            messages.append({"role": "user", "content": render(p[policy.continue_prompt], {
                "results": turn.tool_results, "file_index": self.store.index(), **(extra or {})})})
        return "budget"

    def _log_phase(self, step: int, text: str, blocks: dict[str, str]):
        p = self.structure.prompts
        facts = {"prev_step": step - 1, "action": self.prev_validated, "raw_action": self.prev_raw}
        key = "action_taken" if self.prev_valid else "action_invalid"
        values = self._values(PHASE_LOG, step, text, blocks)
        values.update(action_description=render(p[key], facts), prev_step=step - 1)
        rec = PhaseRecord(PHASE_LOG, initial_prompt=render(p["log"], values))
        messages = [{"role": "user", "content": rec.initial_prompt}]
        policy = TurnPolicy(PHASE_LOG, ROLE_MEMORY if self.two_model else ROLE_POLICY,
                            self.budgets["log_turns"], END_DONE, "log_continue")
        rec.end_reason = yield from self._turns(policy, rec, messages, {
            "step": step, "prev_step": step - 1,
            "action_description": values["action_description"]})
        return rec

    def _plan_phase(self, step: int, text: str, blocks: dict[str, str]):
        p = self.structure.prompts
        values = self._values(PHASE_PLAN, step, text, blocks)
        values["instruction"] = self.instruction
        rec = PhaseRecord(PHASE_PLAN, initial_prompt=render(p["plan"], values))
        messages = [{"role": "user", "content": rec.initial_prompt}]
        if self.two_model:
            # The specialist's lookups first; how they end only shapes the chat handed on.
            consult = TurnPolicy(PHASE_PLAN, ROLE_MEMORY, self.budgets["plan_turns"], END_ACTION,
                                 "plan_continue", handoff=True)
            yield from self._turns(consult, rec, messages)
            policy = TurnPolicy(PHASE_PLAN, ROLE_GAMEPLAY, self.budgets["gameplay_turns"],
                                END_ACTION, "plan_continue")
        else:
            policy = TurnPolicy(PHASE_PLAN, ROLE_POLICY, self.budgets["plan_turns"], END_ACTION,
                                "plan_continue")
        rec.end_reason = yield from self._turns(policy, rec, messages)
        if rec.end_reason == END_ACTION:
            rec.final_action = rec.turns[-1].committed_action
        else:
            rec.final_action, rec.fallback = self.structure.fallback_action, True
        return rec


def drive(step: Generator[ChatRequest, Completion, tuple[str, StepRecord]],
          respond: Callable[[ChatRequest], Completion]) -> tuple[str, StepRecord]:
    """Run one ``act`` generator to the end with a synchronous responder (tests, simple loops)."""
    try:
        request = next(step)
        while True:
            request = step.send(respond(request))
    except StopIteration as stop:
        return stop.value
