"""The hosted critic: an OpenAI-compatible chat endpoint with tool calling, and the Critic protocol.

* ``CriticClient`` talks to any ``/v1/chat/completions`` endpoint (OpenAI, the Gemini and Anthropic
  OpenAI-compatibility endpoints, vLLM, ``automem_jax.llm.server``) through the official ``openai``
  SDK. It shares ``OpenAIClient``'s endpoint (``automem_jax.llm.openai_http``: key read once from
  an environment variable and never shown, the SDK's retries with our jittered wait, one redacted
  error message), and adds tool calls and token accounting.
* ``run_session`` is the tool-calling loop: the model browses the traces through ``TraceTools``
  until it answers without tool calls (or a turn cap forces a final answer). Endpoints without
  tool calling get ``TraceTools.digest`` pasted into the prompt instead.
* ``LLMCritic`` and ``HeuristicCritic`` implement the ``Critic`` protocol the loops call:
  ``propose`` (Loop 1: a revised memory structure) and ``judge`` (Loop 2: accept/reject memory
  turns). ``make_critic(spec)`` builds either from a config mapping.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from automem_jax.critic.heuristic import HeuristicCritic
from automem_jax.critic.protocol import (PROPOSAL_FORMAT, JudgeError, ProposalError, ProposalReply, find_json_list,
                                         parse_proposal)
from automem_jax.critic.tools import TraceTools
from automem_jax.llm.client import check_kind_fields
from automem_jax.llm.openai_http import EndpointError, OpenAIEndpoint, check_range, message_text
from automem_jax.critic.judge_view import DEFAULT_TOKEN_BUDGET, render_batch
from automem_jax.memory import ops as ops_mod
from automem_jax.memory.schema import (BUDGET_DEFAULTS, CONTEXT_BLOCKS, LIMIT_DEFAULTS, PROMPT_PLACEHOLDERS,
                                       TOP_KEYS)
from automem_jax.memory.structure import MemoryStructure

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Replies, errors, usage

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class CriticReply:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    seconds: float = 0.0


class CriticError(EndpointError):
    """A critic call failed for good (after retries). The message names the endpoint and status,
    never the API key; it starts with one of openai_http's prefixes (``kind``)."""


class ToolsUnsupportedError(CriticError):
    """The endpoint refused a request because it carried tools (HTTP 400 that mentions tools)."""


@dataclass
class Usage:
    calls: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    per_call: list[dict] = field(default_factory=list)

    def add(self, reply: CriticReply, tools: bool) -> None:
        self.calls += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.seconds += reply.seconds
        self.per_call.append({"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                              "seconds": round(reply.seconds, 4), "finish_reason": reply.finish_reason,
                              "tool_calls": len(reply.tool_calls), "tools_offered": tools})

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# The HTTP client

class CriticClient(OpenAIEndpoint):
    """Chat completions with tool calls against one OpenAI-compatible endpoint (the ``openai`` SDK,
    through ``automem_jax.llm.openai_http``: key handling, retries and error messages are shared
    with ``OpenAIClient``).

    base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
    api_key_env: the environment variable holding the key (read here, once); None sends no key.
    timeout_s: seconds per attempt (connect, and each read of the reply): critic answers are long.
    max_retries: extra attempts after connection errors, timeouts, 408/409/429 and 5xx (the SDK's
        retries, waiting as ``backoff``/``backoff_max`` say; see openai_http).
    max_tokens / temperature: sent with every call (None = the endpoint's default).
    extra_body: merged into every request (e.g. {"reasoning_effort": "high"}).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout_s: float = 600,
                 max_retries: int = 3, max_tokens: int | None = 8192, temperature: float | None = None,
                 extra_body: Mapping[str, Any] | None = None, *, backoff: float = 1.0, backoff_max: float = 30.0):
        check_range("temperature", temperature, 0, 2, allow_none=True)
        check_range("max_tokens", max_tokens, 1, integer=True, allow_none=True)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ValueError(f"extra_body must be a mapping, got {type(extra_body).__name__}")
        super().__init__(base_url, model, api_key_env=api_key_env, timeout=timeout_s, max_retries=max_retries,
                         backoff=backoff, backoff_max=backoff_max, timeout_field="timeout_s")
        self.max_tokens, self.temperature = max_tokens, temperature
        self.extra_body = dict(extra_body or {})
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"CriticClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout}, max_retries={self.max_retries})")

    def chat(self, messages: list[dict], tools: list[dict] | None = None,
             tool_choice: str | dict | None = None) -> CriticReply:
        """One chat completion (the SDK retries transient failures inside it); raises CriticError
        (ToolsUnsupportedError for an HTTP 400 that mentions tools when tools were offered)."""
        t0 = time.perf_counter()
        try:
            obj = self.chat_completion(list(messages), max_tokens=int(self.max_tokens) if self.max_tokens else None,
                                       temperature=self.temperature, tools=list(tools) if tools else None,
                                       tool_choice=tool_choice if tools else None, extra_body=self.extra_body)
            reply = self._reply(obj)
        except EndpointError as e:
            with self._usage_lock:
                self.usage.failures += 1
            message = str(e)
            cls = (ToolsUnsupportedError if tools and e.status == 400 and "tool" in e.detail.lower()
                   else CriticError)
            log.warning("critic call failed: %s", message)
            raise cls(message, status=e.status, endpoint=e.endpoint, kind=e.kind, attempts=e.attempts,
                      detail=e.detail) from None
        reply.seconds = time.perf_counter() - t0
        with self._usage_lock:
            self.usage.add(reply, bool(tools))
        return reply

    def _reply(self, obj: dict) -> CriticReply:
        choice = obj["choices"][0]  # chat_completion checked choices[0].message is a dict
        msg = choice["message"]
        try:
            content = message_text(msg.get("content"))
            calls = []
            for i, tc in enumerate(msg.get("tool_calls") or []):
                fn = tc.get("function") or {}
                args = fn.get("arguments")
                if not isinstance(args, str):  # a few servers send the arguments as an object
                    args = json.dumps(args if args is not None else {})
                calls.append(ToolCall(id=str(tc.get("id") or f"call_{i}"), name=str(fn.get("name") or ""),
                                      arguments=args))
            usage = obj.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, TypeError, AttributeError) as e:
            raise self.malformed(self.chat_url, f"{type(e).__name__}: {e}", json.dumps(obj).encode(), 200) from None
        return CriticReply(content=content, tool_calls=calls, prompt_tokens=prompt_tokens,
                           completion_tokens=completion_tokens, finish_reason=str(choice.get("finish_reason") or ""))


# --------------------------------------------------------------------------------------------
# The tool-calling session

FINAL_ANSWER_NOTICE = ("You have used all the trace browsing this session allows. Do not call any more tools: "
                       "write your final answer now, in the format asked for at the start.")
DIGEST_HEADER = ("\n\nTRACE DIGEST (tools are not available in this session, so here are the per-episode "
                 "statistics and a sample of steps):\n")


@dataclass
class Session:
    final_text: str
    transcript: list[dict]
    usage: dict
    turns: int
    mode: str = "tools"  # tools | digest | plain


def run_session(client: CriticClient, messages: list[dict], tools: TraceTools | None, max_turns: int = 30,
                max_tool_calls: int = 100, *, use_tools: bool = True, digest_tokens: int = 6000) -> Session:
    """Send `messages`, run the model's tool calls through `tools`, repeat until it answers
    without tool calls; after `max_turns` calls (or `max_tool_calls` tool runs) one last call
    without tools asks for the final answer. With use_tools=False, or when the endpoint refuses
    tools, the trace digest goes into the last user message instead."""
    if max_turns < 1 or max_tool_calls < 0:
        raise ValueError(f"max_turns must be >= 1 and max_tool_calls >= 0, got {max_turns}, {max_tool_calls}")
    usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0, "tool_calls": 0,
             "tool_errors": 0}
    msgs = [dict(m) for m in messages]

    def send(ms, **kw) -> CriticReply:
        return _tally(usage, client.chat(ms, **kw))

    def finish(ms, reply: CriticReply, turns: int, mode: str) -> Session:
        ms.append({"role": "assistant", "content": reply.content})
        return Session(reply.content, ms, {**usage, "mode": mode}, turns, mode)

    if tools is None:
        return finish(msgs, send(msgs), 1, "plain")
    if not use_tools:
        digested = _with_digest(msgs, tools, digest_tokens)
        return finish(digested, send(digested), 1, "digest")
    schemas = tools.schemas()
    turns = 0
    while turns < max_turns and usage["tool_calls"] < max_tool_calls:
        try:
            reply = send(msgs, tools=schemas)
        except ToolsUnsupportedError as e:
            log.info("critic endpoint refused tools (%s); falling back to the trace digest", e)
            digested = _with_digest([dict(m) for m in messages], tools, digest_tokens)
            return finish(digested, send(digested), turns + 1, "digest")
        turns += 1
        if not reply.tool_calls:
            return finish(msgs, reply, turns, "tools")
        msgs.append({"role": "assistant", "content": reply.content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls]})
        for c in reply.tool_calls:
            if usage["tool_calls"] >= max_tool_calls:
                result = f"error: the tool-call budget ({max_tool_calls}) is spent; write your final answer"
            else:
                usage["tool_calls"] += 1
                result = tools.call(c.name, c.arguments)
            usage["tool_errors"] += int(result.startswith("error:"))
            msgs.append({"role": "tool", "tool_call_id": c.id, "content": result})
    msgs.append({"role": "user", "content": FINAL_ANSWER_NOTICE})
    return finish(msgs, send(msgs), turns + 1, "tools")


def _tally(usage: dict, reply: CriticReply) -> CriticReply:
    """Adds one reply's tokens and time to a session's usage dict."""
    usage["calls"] += 1
    usage["prompt_tokens"] += reply.prompt_tokens
    usage["completion_tokens"] += reply.completion_tokens
    usage["seconds"] += reply.seconds
    return reply


def _with_digest(messages: list[dict], tools: TraceTools, budget: int) -> list[dict]:
    digest = DIGEST_HEADER + tools.digest(budget)
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] += digest
            return messages
    return messages + [{"role": "user", "content": digest.lstrip()}]


# --------------------------------------------------------------------------------------------
# The Critic protocol and the LLM critic

@runtime_checkable
class Critic(Protocol):
    """What the loops call. `propose` returns a reply in PROPOSAL_FORMAT (parse it with
    parse_proposal); `judge` returns [{"id", "decision": "accept"|"reject", "reason"}] in order."""

    def propose(self, structure: MemoryStructure, tools: TraceTools | None, feedback: str | None = None,
                attempt: int | None = None) -> ProposalReply: ...

    def judge(self, candidates: list[dict]) -> list[dict]: ...


ENV_GOALS = {
    "crafter": "Crafter / Craftax-Classic: a 2D survival and crafting game. Progression is the share of the 22 "
               "achievements unlocked in an episode (collect wood, place a table, make tools, ...).",
    "minihack": "MiniHack: small NetHack tasks (corridors, rooms, quests). Progression is 1 when the task is "
                "solved and 0 otherwise.",
    "nethack": "NetHack: the full roguelike. Progression follows the dungeon-level and experience-level "
               "milestones (BALROG's table); average return also matters.",
}


def schema_reference() -> str:
    """What a structure document may contain, generated from the schema so it cannot drift."""
    blocks = "\n".join(f"  - {b.name} (default phases {'/'.join(b.phases)}; params "
                       f"{json.dumps(dict(b.params)) if b.params else 'none'}): {b.doc}"
                       for b in CONTEXT_BLOCKS.values())
    prompts = "\n".join(f"  - {k}: {', '.join('{' + p + '}' for p in sorted(v)) or '(no placeholders)'}"
                        for k, v in PROMPT_PLACEHOLDERS.items())
    return (f"Top-level sections: {', '.join(TOP_KEYS)}.\n"
            f"Prompts and the placeholders each may use (log and plan may also use {{context}} or a block's own "
            f"name):\n{prompts}\n"
            f"Built-in ops: {', '.join(ops_mod.BUILTIN_OPS)}. LOG must offer DONE; PLAN must offer ACTION and no "
            f"writing op. Keyed-update ops go under ops.keyed (name, file, key: coord|text, usage, description, "
            f"result with {{key}}/{{file}}) and are enabled by listing their name in ops.log.\n"
            f"limits: {', '.join(LIMIT_DEFAULTS)}. pruning: list of {{file, max_lines, keep_lines}}. "
            f"budgets: {', '.join(BUDGET_DEFAULTS)} (turns 1-100). action: fallback, two_step_commands, "
            f"match (exact|case_insensitive).\n"
            f"Context blocks (deterministic warnings computed from the episode; list entries "
            f"{{name, enabled, phases, params}}):\n{blocks}")


PROPOSE_SYSTEM = """\
You are a research engineer improving the external memory of an LLM agent that plays a text game.
Each game step the agent runs two phases. In LOG it records what just happened into a few text
files by writing memory ops inline (<|APPEND|>file|note<|END|>, <|SEARCH|>file|word<|END|>, ...),
then ends with <|DONE|>. In PLAN it may only look things up, and then commits one game action with
<|ACTION|>...<|END|>. Everything about this memory (the LOG and PLAN prompts, the initial files and
their descriptions, which ops each phase offers, keyed-update ops, limits and pruning rules, the
deterministic context blocks, the turn budgets and the fallback action) is set by one YAML
document: the memory structure. Your job is to revise that document.

Goal: {goal} Your revision is evaluated on the same fixed seeds and kept only if its mean
progression is strictly higher than the current structure's.

Rules for the revision:
- Make at least one STRUCTURAL change: files, ops, keyed ops, limits, pruning, context blocks,
  budgets, placeholders or action settings. Rewording prompt text alone does not count.
- The model must keep deciding itself what to store and what to look up, through memory ops. Do
  not replace that with automatic logging or summaries.
- Keep both phases: LOG writes, PLAN is read-only and ends with ACTION.
- Only use what the schema allows (below). The document is validated; an invalid one is thrown away.
- Base every change on evidence from the traces: how memory is used, whether it is accurate, whether
  it changes the actions, what is missing, what goes wrong. Token cost is not a concern.

Schema:
{schema}
"""

JUDGE_SYSTEM = """\
You review the memory turns of an LLM agent playing a text game, to choose training examples that
teach good memory management. Each candidate is one LOG or PLAN phase of one game step: what the
game showed at that step, the memory files as they were before it, the previous action, and the
phase's turns (the memory ops the model wrote and what they returned; long parts may be clipped).
Judge each one in context.

Accept a candidate only when its memory ops are correct and worth imitating: LOG writes record
new, accurate, short information tied to what actually happened (results of actions, discoveries,
failures, inventory and health changes); PLAN lookups go to the right file and what they return
bears on the action chosen. Reject candidates with no memory op, failed or malformed ops, writes
that repeat content already stored, lookups that find nothing, bloated writes, the same file read
twice, or notes that contradict the observation. Judge the memory ops, not the game action.
"""


class LLMCritic:
    """The Critic protocol on a hosted model (CriticClient)."""

    kind = "openai"

    def __init__(self, client: CriticClient, *, use_tools: bool = True, max_turns: int = 30,
                 max_tool_calls: int = 100, digest_tokens: int = 6000, judge_batch: int = 8,
                 repair_rounds: int = 1, judge_token_budget: int = DEFAULT_TOKEN_BUDGET, judge_tokenizer=None):
        self.client = client
        self.use_tools, self.max_turns, self.max_tool_calls = bool(use_tools), int(max_turns), int(max_tool_calls)
        self.digest_tokens, self.judge_batch, self.repair_rounds = int(digest_tokens), int(judge_batch), int(repair_rounds)
        # Loop 2: tokens per rendered candidate, counted with judge_tokenizer if set, else estimated.
        self.judge_token_budget, self.judge_tokenizer = int(judge_token_budget), judge_tokenizer
        self.render_log: list[dict] = []  # one report per judge request (critic.judge_view.render_batch)
        self._calls = 0

    def __repr__(self) -> str:
        return f"LLMCritic({self.client!r}, use_tools={self.use_tools}, max_turns={self.max_turns})"

    @property
    def usage(self) -> dict:
        return self.client.usage.as_dict()

    # ---------------------------------------------------------------- Loop 1

    def propose_messages(self, structure: MemoryStructure, tools: TraceTools | None, feedback: str | None = None,
                         attempt: int = 0) -> list[dict]:
        env = structure.env
        goal = ENV_GOALS.get({"craftax": "crafter"}.get(env, env), f"{env}: maximise the progression metric.")
        system = PROPOSE_SYSTEM.format(goal=goal, schema=schema_reference())
        parts = [f"## Current memory structure ({structure.label})\n```yaml\n{structure.to_yaml()}```"]
        if tools is not None:
            parts.append("## Results of this structure on the evaluation seeds\n" + _summary_line(tools))
            parts.append("## Per-episode statistics\n" + tools.list_episodes())
            if self.use_tools:
                parts.append("## Investigate before you revise\nUse the tools to read the traces (if this session "
                             "offers none, a digest of them follows below): walk through "
                             "whole episodes step by step (read_steps), look for patterns (search_traces), check "
                             "what the memory files held (read_memory). Ask: is memory used at all, is it "
                             "accurate, does it change the actions, what is missing, what structural problem "
                             "causes the failures you see?")
        if attempt:
            parts.append(f"## Attempt {attempt + 1}\nEarlier attempts at this revision were not kept. Choose a "
                         f"different structural change from the most obvious one.")
        if feedback:
            parts.append("## Feedback: your previous revision did NOT improve the metric\n" + feedback.strip()
                         + "\nFix what went wrong, or try a different structural change.")
        parts.append("## Your answer\n" + PROPOSAL_FORMAT)
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]

    def propose(self, structure: MemoryStructure, tools: TraceTools | None, feedback: str | None = None,
                attempt: int | None = None) -> ProposalReply:
        if attempt is None:
            attempt = self._calls
        self._calls += 1
        messages = self.propose_messages(structure, tools, feedback, attempt)
        session = run_session(self.client, messages, tools, self.max_turns, self.max_tool_calls,
                              use_tools=self.use_tools, digest_tokens=self.digest_tokens)
        text, transcript, usage = session.final_text, session.transcript, dict(session.usage)
        for _ in range(self.repair_rounds):
            try:
                parse_proposal(text, validate=True)
                break
            except ProposalError as e:
                # A broken document is cheap to repair in the same conversation; the traces are read.
                transcript = transcript + [{"role": "user", "content": (
                    f"Your answer could not be used: {e}\nReply again with the complete corrected document in "
                    f"one ```yaml block, followed by Rationale:.")}]
                reply = self.client.chat([m for m in transcript if m.get("role") in ("system", "user", "assistant")
                                          and not m.get("tool_calls")])
                text = _tally(usage, reply).content
                transcript.append({"role": "assistant", "content": text})
                usage["repairs"] = usage.get("repairs", 0) + 1
        try:
            _doc, rationale = parse_proposal(text)
        except ProposalError:
            rationale = ""
        return ProposalReply(text=text, rationale=rationale, transcript=transcript, usage=usage)

    # ---------------------------------------------------------------- Loop 2

    def judge(self, candidates: list[dict]) -> list[dict]:
        out: list[dict] = []
        for i in range(0, len(candidates), max(1, self.judge_batch)):
            batch = candidates[i:i + max(1, self.judge_batch)]
            texts, report = render_batch(batch, self.judge_token_budget, self.judge_tokenizer)
            body = "\n\n".join(texts)
            ask = ("Reply with a JSON array, one object per candidate in the order given: "
                   '{"id": <the candidate id>, "decision": "accept" or "reject", "reason": "<one specific '
                   'sentence naming the op and the evidence>"}. Nothing else.')
            reply = self.client.chat([{"role": "system", "content": JUDGE_SYSTEM},
                                      {"role": "user", "content": f"{body}\n\n{ask}"}])
            # The endpoint's own count of the whole request, next to ours of the candidates.
            self.render_log.append({**report, "prompt_tokens": reply.prompt_tokens})
            out += _decisions(batch, reply.content)
        return out


def _summary_line(tools: TraceTools) -> str:
    try:
        s = json.loads(tools.run_summary())
    except (ValueError, TypeError):
        return "(no summary.json)"
    rows = [f"average progression {s.get('average_progress', 0):.2f}% ± {s.get('standard_error', 0):.2f} "
            f"over {s.get('episodes')} episodes"]
    for env, tasks in (s.get("environments") or {}).items():
        for task, t in tasks.items():
            h = t.get("hygiene", {})
            rows.append(f"- {env}/{task}: {t.get('progression_percentage', 0):.2f}% ± {t.get('standard_error', 0):.2f}"
                        f", {t.get('episodes')} episodes, {t.get('mean_steps', 0):.1f} steps/episode, invalid-action "
                        f"rate {t.get('invalid_action_rate', 0):.3f}, redundant writes {h.get('redundant_writes')}, "
                        f"empty searches {h.get('empty_searches')}, ops/step {h.get('ops_per_step', 0):.2f}")
    return "\n".join(rows)


def _decisions(batch: list[dict], text: str) -> list[dict]:
    """Decisions for a batch from the critic's JSON; a candidate it skipped is rejected, saying so."""
    found: dict[str, dict] = {}
    try:
        items = find_json_list(text or "")
    except JudgeError:
        items = []  # an unusable reply rejects the whole batch, candidate by candidate
    for it in items:
        if isinstance(it, dict) and str(it.get("decision", "")).lower() in ("accept", "reject"):
            found.setdefault(str(it.get("id")), it)
    out = []
    for c in batch:
        it = found.get(str(c.get("id")))
        if it is None:
            out.append({"id": c.get("id"), "decision": "reject",
                        "reason": "the critic gave no valid decision for this candidate"})
        else:
            out.append({"id": c.get("id"), "decision": str(it["decision"]).lower(),
                        "reason": str(it.get("reason") or "(no reason given)")})
    return out


# --------------------------------------------------------------------------------------------
# Factory

_CLIENT_ARGS = ("base_url", "model", "api_key_env", "timeout_s", "max_retries", "max_tokens", "temperature",
                "extra_body", "backoff", "backoff_max")
_CRITIC_ARGS = ("use_tools", "max_turns", "max_tool_calls", "digest_tokens", "judge_batch", "repair_rounds",
                "judge_token_budget")
_FIELDS = {"openai": {"kind", *_CLIENT_ARGS, *_CRITIC_ARGS}, "heuristic": {"kind", "seed"}}


def make_critic(spec: Mapping[str, Any], _where: str = "critic") -> Critic:
    """A critic from a config mapping (or ml_collections ConfigDict):

    ``{"kind": "openai", "base_url", "model", "api_key_env", "timeout_s", "max_retries", "max_tokens",
    "temperature", "extra_body", "use_tools", "max_turns", "max_tool_calls", "digest_tokens",
    "judge_batch", "repair_rounds", "judge_token_budget"}`` or ``{"kind": "heuristic", "seed"}``.
    """
    spec, kind = check_kind_fields(spec, _where, _FIELDS)
    if kind == "heuristic":
        seed = spec.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{_where}.seed must be an integer, got {seed!r}")
        return HeuristicCritic(seed=seed)
    for f in ("base_url", "model"):
        if spec.get(f) in (None, ""):
            raise ValueError(f"{_where}.{f} is required for kind 'openai'")
    for f in ("max_turns", "digest_tokens", "judge_batch", "judge_token_budget"):
        v = spec.get(f, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{_where}.{f} must be an integer >= 1, got {v!r}")
    for f in ("max_tool_calls", "repair_rounds"):
        v = spec.get(f, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{_where}.{f} must be an integer >= 0, got {v!r}")
    if not isinstance(spec.get("use_tools", True), bool):
        raise ValueError(f"{_where}.use_tools must be true or false, got {spec['use_tools']!r}")
    try:
        client = CriticClient(**{k: spec[k] for k in _CLIENT_ARGS if k in spec})
    except ValueError as e:
        raise ValueError(f"{_where}: {e}") from None
    return LLMCritic(client, **{k: spec[k] for k in _CRITIC_ARGS if k in spec})
