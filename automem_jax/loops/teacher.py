"""Scripted teacher for the tiny CPU config: plays Craftax-Classic through the real agent prompts.

A random tiny model cannot use memory ops at all, so Loop 2 would have nothing to mine. The
teacher is a ``Client`` (``generate(requests) -> completions``) that answers the MemoryAgent's
LOG/PLAN chats in the op grammar, and the tiny model is warm-started (SFT) on its traces
(``teacher_examples``). It reads only what a model reads: the chat messages. Observation, file
index, offered commands and tool results are parsed out of the prompt text, so it keeps working
when Loop 1 rewords prompts, renames files or changes the op vocabulary. This module holds the
client and the warm-start export; the parsing is ``loops.teacher_prompt``, the game policy and the
LOG facts ``loops.teacher_policy``, and the chats come from ``loops.chats`` (as Loop 2's do).

How it uses memory (its good habits):
  * a state file (the one named like strategy/plan/goal) holds ``Key: value`` lines: goal,
    exploration heading, last known inventory and vitals, kinds already noted, things done.
    LOG reads it, diffs it against the new observation, and rewrites it only when it changed;
    PLAN reads it (or SEARCHes its Heading line when exploring) before committing an action.
  * LOG appends step-stamped facts that are new: inventory gains and losses, crafts and
    placements, failed actions, blocked moves, health and vitals events, first sightings.
  * LOG looks at the tail of the events file before appending to it.

Its deliberate bad habits, at configured rates, so Loop 2 has something to reject:
  * redundant writes: APPEND of one or two lines memory already holds: state-file lines it
    was just shown go back into the state file, or, when it read nothing, a line it appended
    earlier in the same reply is appended again. ``redundant_write_rate`` is the chance per LOG
    phase that writes something; the run summary's
    ``hygiene.redundant_write_rate`` (a share of all writes) is lower.
  * useless reads: READ of a file it then ignores: never the state file or the events file,
    and never written in the same phase (LOG sends the facts meant for it to the events file).
    ``useless_read_rate`` is the chance per LOG or PLAN phase.
It never SEARCHes for something that is not there (no empty searches) and never sends an op
the phase does not offer.

Everything is a pure function of (seed, request messages): decisions use a hash of the seed and
the phase's first message, so results do not depend on batching or on call order.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from automem_jax.agent.types import PHASE_LOG, PHASE_PLAN, ROLE_GAMEPLAY, ChatRequest, Completion
from automem_jax.loops.chats import phase_chat
from automem_jax.loops.teacher_policy import Dice, decide, log_facts
from automem_jax.loops.teacher_prompt import (DEFAULT_NOTES_FILE, DEFAULT_STATE_FILE, Notes, View, assign_roles,
                                              file_index, offered_ops, parse_observation, previous_action,
                                              is_unchanged, result_lines, tool_results)
from automem_jax.rollout.traces import iter_episodes

MODEL_ID = "teacher"

_APPEND_OP_RE = re.compile(r"<\|APPEND\|>([^|]*)\|(.*)<\|END\|>", re.DOTALL)


# ----------------------------------------------------------------------------- the client


def _op(name: str, *args: str) -> str:
    return f"<|{name}|>" + "|".join(args) + "<|END|>"


@dataclass
class _Prompt:
    """What the teacher takes from a request: everything comes from the message text."""

    first: str
    ops: set[str]
    files: dict[str, int]
    roles: dict[str, str]
    view: View | None
    unchanged: bool
    results: list[tuple[str, str]]
    turn: int


class TeacherClient:
    """Scripted Craftax-Classic player behind the Client contract (see the module docstring).

    seed: varies the teacher's choices (and its habits) between runs; redundant_write_rate:
    chance per LOG phase that writes of re-appending one or two lines memory already holds; useless_read_rate:
    chance per LOG or PLAN phase of reading a file and ignoring it; structure: optional
    MemoryStructure whose per-phase ops and budgets override what the prompt text shows;
    tokenizer: optional HF tokenizer for token counts (else about 4 characters a token).
    """

    def __init__(self, seed: int = 0, redundant_write_rate: float = 0.3,
                 useless_read_rate: float = 0.2, *, structure=None, tokenizer=None,
                 model_id: str = MODEL_ID):
        for name, value in (("redundant_write_rate", redundant_write_rate),
                            ("useless_read_rate", useless_read_rate)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        self.seed = int(seed)
        self.redundant_write_rate = float(redundant_write_rate)
        self.useless_read_rate = float(useless_read_rate)
        self.structure = structure
        self.tokenizer = tokenizer
        self.model_id = model_id

    # -- Client contract ---------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        out = []
        for req in requests:
            try:
                text = self.respond(req)[0]
            except Exception as exc:  # a parsing corner case must not end a rollout
                out.append(Completion("", error=f"teacher failed: {type(exc).__name__}: {exc}",
                                      model_id=self.model_id))
                continue
            out.append(Completion(text, self._count("\n".join(m.get("content", "")
                                                              for m in req.messages)),
                                  self._count(text), model_id=self.model_id))
        return out

    def respond(self, request: ChatRequest) -> tuple[str, dict]:
        """The reply to one request and the habits it shows: ``redundant_writes`` (count),
        ``useless_read`` (file or None)."""
        p = self._read_prompt(request)
        if request.phase == PHASE_LOG:
            return self._log(p)
        return self._plan(p, request.model_role)

    def _count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"])
        return max(1, len(text) // 4)

    def _read_prompt(self, request: ChatRequest) -> _Prompt:
        msgs = request.messages
        first = msgs[0]["content"] if msgs else ""
        if self.structure is not None:
            ops = set(self.structure.phase_ops(request.phase))
        else:
            ops = offered_ops(first)
        files = {}
        for m in msgs:  # the newest index wins (later user messages may show it again)
            if m.get("role") == "user":
                files.update(file_index(m.get("content", "")))
        return _Prompt(first, ops, files, assign_roles(files), parse_observation(first),
                       is_unchanged(first), tool_results(msgs),
                       sum(m.get("role") == "assistant" for m in msgs))

    def _budget(self, key: str) -> int:
        if self.structure is not None:
            return int(self.structure.budgets.get(key, 2))
        return 2  # the teacher needs two turns per phase; prompts do not show the budget

    def _reader(self, p: _Prompt, file: str) -> str | None:
        if "READ" in p.ops:
            return _op("READ", file)
        if "TAIL" in p.ops:
            return _op("TAIL", file, "200")
        return None

    def _useless_read(self, p: _Prompt, dice: Dice, keep: Iterable[str]) -> str | None:
        """The bad habit: pick a file the phase has no use for (None when it does not fire)."""
        if "READ" not in p.ops or dice.uniform("useless") >= self.useless_read_rate:
            return None
        others = sorted(set(p.files) - set(keep))
        return dice.choice("useless-file", others) if others else None

    # -- LOG -----------------------------------------------------------------------------------

    def _log(self, p: _Prompt) -> tuple[str, dict]:
        dice = Dice(self.seed, "log\x00" + p.first)
        habits = {"redundant_writes": 0, "useless_read": None}
        if p.view is None or p.turn >= 2:
            return "<|DONE|>", habits
        state_file = p.roles.get("state", DEFAULT_STATE_FILE)
        events_file = p.roles.get("events")
        if p.turn == 0 and self._budget("log_turns") >= 2:
            # Look before writing: the state file, and the tail of the events file.
            reads = []
            if p.files.get(state_file, 0) > 0 and (r := self._reader(p, state_file)):
                reads.append(r)
            if events_file and p.files.get(events_file, 0) > 0 and "TAIL" in p.ops:
                reads.append(_op("TAIL", events_file, "3"))
            useless = self._useless_read(p, dice, [state_file, events_file or ""])
            if useless:
                reads.append(_op("READ", useless))
                habits["useless_read"] = useless
            if reads:
                return "\n".join(reads), habits

        prev_action, prev_step = previous_action(p.first)
        state_lines = result_lines(p.results, state_file)
        notes = Notes.parse(state_lines)
        plan = log_facts(p.view, notes, prev_action, prev_step, p.unchanged, p.roles, dice)

        lines: list[str] = []
        can_append, can_write = "APPEND" in p.ops, "WRITE" in p.ops
        # A file read only out of habit stays untouched: its facts go to the events file.
        ignored = {h.split(" ")[1] for h, _ in p.results if h.startswith("READ ")} \
            - {state_file, events_file}
        sink = events_file or DEFAULT_NOTES_FILE
        if can_append:
            lines += [_op("APPEND", sink if f in ignored else f, t) for f, t in plan.appends]
        # The state is rewritten only when it changed, and only when its old content is known
        # (shown by a read, or empty in the index): a blind rewrite could repeat the file.
        state_known = state_lines is not None or p.files.get(state_file, 0) == 0
        old_state = "\n".join(state_lines or [])
        if state_known and plan.state.strip() and plan.state.strip() != old_state.strip():
            if can_write:
                lines.append(_op("WRITE", state_file, plan.state))
            elif can_append:
                # No WRITE offered: add the changed lines, step-stamped so none repeats an old one.
                current = set(notes.render().splitlines())
                lines += [_op("APPEND", state_file, f"{ln} (step {prev_step + 1})")
                          for ln in plan.state.splitlines() if ln not in current]
        # The habit repeats what memory already holds: lines of the state file it just read go
        # back into it, or, when it read nothing, a line it appended earlier in this reply is
        # appended again. Any phase that writes can carry it, and whole phases do (not a share of
        # every phase), so the clean phases Loop 2 keeps are a fair sample of all phases.
        pool = [(state_file, ln) for ln in dict.fromkeys(state_lines or []) if ln.strip()]
        own = [(i, *m.groups()) for i, op in enumerate(lines) if (m := _APPEND_OP_RE.fullmatch(op))]
        n_dup = 0
        if can_append and lines and (pool or own) and dice.uniform("dup") < self.redundant_write_rate:
            n_dup = 1 + int(len(pool or own) > 1 and dice.uniform("dup-count") < 0.5)
        if n_dup and pool:
            dups = dice.shuffled("dup-lines", pool)[:n_dup]
            for f, ln in dups:
                at = int(dice.uniform(f"dup-at/{ln}") * (len(lines) + 1))
                lines.insert(at, _op("APPEND", f, ln))
            habits["redundant_writes"] = len(dups)
        elif n_dup:
            picks = sorted(dice.shuffled("dup-own", own)[:n_dup], reverse=True)
            for i, f, t in picks:  # right after the original, from the end so indices hold
                lines.insert(i + 1, _op("APPEND", f, t))
            habits["redundant_writes"] = len(picks)
        lines.append("<|DONE|>")
        return "\n".join(lines), habits

    # -- PLAN ----------------------------------------------------------------------------------

    def _plan(self, p: _Prompt, role: str) -> tuple[str, dict]:
        dice = Dice(self.seed, "plan\x00" + p.first)
        habits = {"redundant_writes": 0, "useless_read": None}
        if p.view is None:
            return _op("ACTION", "Noop"), habits
        state_file = p.roles.get("state", DEFAULT_STATE_FILE)
        if p.turn == 0 and role != ROLE_GAMEPLAY and self._budget("plan_turns") >= 2:
            reads = []
            if p.files.get(state_file, 0) > 0:
                first_guess = decide(p.view, Notes(), dice, p.unchanged)
                if first_guess.kind == "explore" and "SEARCH" in p.ops:
                    # The heading line is always there once LOG has run: never an empty search.
                    reads.append(_op("SEARCH", state_file, "Heading"))
                elif (r := self._reader(p, state_file)):
                    reads.append(r)
            useless = self._useless_read(p, dice, [state_file])
            if useless:
                reads.append(_op("READ", useless))
                habits["useless_read"] = useless
            if reads:
                return "\n".join(reads), habits
        notes = Notes.parse(result_lines(p.results, state_file))
        action = decide(p.view, notes, dice, p.unchanged).action
        return _op("ACTION", action), habits


# ----------------------------------------------------------------------------- warm-start data


def teacher_examples(run_dir: str) -> list[dict]:
    """ShareGPT conversations, one per LOG and PLAN phase in the run folder's traces (finished
    episodes or not), built by ``loops.chats`` as Loop 2 builds its candidates.

    ``{"conversations": [{"role": "user", ...}, {"role": "assistant", ...}, ...],
    "id": "ep<k>/s<step>/<phase>"}`` in episode, step, phase (LOG then PLAN) order. A phase with a
    failed turn is left out whole (Loop 2 keeps the turns before the failure).
    """
    examples = []
    for ep in iter_episodes(run_dir, finished=False):
        if not ep.has_steps:
            continue
        for line in ep.steps():
            for phase in (PHASE_LOG, PHASE_PLAN):
                rec = line.get(phase) or {}
                if any(t.get("error") for t in rec.get("turns") or []):
                    continue
                conv = phase_chat(rec, phase)
                if conv:
                    examples.append({"conversations": conv,
                                     "id": f"ep{line['episode']}/s{line['step']}/{phase}"})
    return examples
