"""What a judge is shown of one Loop-2 candidate, within a token budget: the critic's side of the
judgement protocol (``critic.protocol`` parses the reply).

Every LLM judge (``loops.judging.LLMJudge`` and ``critic.client.LLMCritic.judge``) renders
candidates here, so they see the same thing: the step's facts, the previous action, the
observation, every memory file as it was before the step, and every turn of the phase (the prompts
that carry command results, the replies, the ops run). When a candidate is over its budget the
least useful parts are clipped first: the phase's first prompt (mostly fixed instructions, and its
observation is shown on its own), then command results from the oldest on, then earlier replies;
the observation, the memory and the last reply go last. Tokens are counted with a tokenizer when
one is given (anything with ``encode(text)`` or a callable returning a sequence), else estimated as
characters / 4; every render reports which.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from automem_jax.rollout.traces import dumps

__all__ = ["DEFAULT_TOKEN_BUDGET", "token_counter", "render_candidate", "render_batch", "summarize_reports"]


DEFAULT_TOKEN_BUDGET = 6000  # per candidate
ESTIMATE = "chars/4 estimate"
TOKENIZER = "tokenizer"

# Clip order: lower ranks are clipped first. Replies and results add their position so older ones go first.
_FIRST_PROMPT, _RESULTS, _REPLY, _MEMORY, _OBSERVATION, _LAST_REPLY = 0, 100, 300, 700, 800, 900


def token_counter(tokenizer: Any = None) -> tuple[Callable[[str], int], str]:
    """(count(text) -> tokens, which counter it is)."""
    if tokenizer is None:
        return (lambda text: math.ceil(len(text) / 4)), ESTIMATE
    encode = getattr(tokenizer, "encode", None)
    fn = encode if callable(encode) else tokenizer
    if not callable(fn):
        raise TypeError(f"tokenizer must have encode(text) or be callable, got {type(tokenizer).__name__}")
    return (lambda text: len(fn(text))), TOKENIZER


@dataclass
class _Part:
    label: str
    text: str
    rank: int | None  # None: never clipped
    floor: int = 0  # tokens of text kept at least
    clipped: bool = False

    def render(self) -> str:
        return f"{self.label}\n{self.text}" if self.label else self.text


def _cut(text: str, keep_chars: int) -> str:
    # Head and tail both matter (a prompt's end holds the latest results), so keep both around a marker.
    if keep_chars <= 0:
        return f"[... all {len(text)} characters omitted ...]"
    head = keep_chars * 2 // 3
    tail = keep_chars - head
    return f"{text[:head]}\n[... {len(text) - keep_chars} characters omitted ...]\n{text[len(text) - tail:]}"


def _clip_to(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest head+tail cut of ``text`` that counts at most ``max_tokens`` (or the bare marker)."""
    if count(text) <= max_tokens:
        return text
    lo, hi = 0, len(text) - 1  # the largest keep_chars whose cut fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(_cut(text, mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return _cut(text, lo)


def _chat_of(c: Mapping) -> list[dict]:
    msgs = list(c.get("messages") or [])
    if msgs:
        return msgs
    out = []  # a candidate without its chat: rebuild it from the raw turns
    for t in c.get("turns") or []:
        out += [{"role": "user", "content": str(t.get("prompt", ""))},
                {"role": "assistant", "content": str(t.get("response", ""))}]
    return out


def _ops_line(turn: Mapping) -> str:
    calls = []
    for o in turn.get("ops") or []:
        args = ", ".join(str(a) if len(str(a)) <= 60 else str(a)[:57] + "..." for a in o.get("args") or [])
        call = f"{o.get('op')}({args})" if args else str(o.get("op"))
        calls.append(call if o.get("ok", True) else call + " FAILED")
    return "; ".join(calls)


def _parts(c: Mapping) -> list[_Part]:
    phase = str(c.get("phase", "")).upper()
    head = (f"### candidate id={json.dumps(c.get('id'))} phase={phase} episode={c.get('episode')} "
            f"step={c.get('step')} reward={c.get('reward', 0)} progression_delta={c.get('progression_delta', 0)} "
            f"redundant_writes={c.get('redundant_writes', 0)} empty_searches={c.get('empty_searches', 0)}")
    if c.get("prev_action"):
        why = " (its outcome is what LOG records)" if phase == "LOG" else ""
        head += f"\nprevious action{why}: {c['prev_action']}"
    parts = [_Part("", head, None)]
    observation = str(c.get("observation") or "")
    if "observation" in c:
        parts.append(_Part("[observation at this step]", observation or "(none)", _OBSERVATION, floor=64))
    if "memory_before" in c:
        files = c.get("memory_before") or {}
        memory = "\n".join(f"== {name} ==\n{text}" for name, text in sorted(files.items())) or "(no files)"
        parts.append(_Part("[memory files before this step]", memory, _MEMORY, floor=64))
    msgs = _chat_of(c)
    turns = list(c.get("turns") or [])
    n_replies = sum(m.get("role") == "assistant" for m in msgs)
    reply = 0
    for i, m in enumerate(msgs):
        text = str(m.get("content", ""))
        if m.get("role") == "assistant":
            reply += 1
            last = reply == n_replies
            parts.append(_Part(f"[reply {reply}]", text, _LAST_REPLY if last else _REPLY + reply, floor=32))
            ops = _ops_line(turns[reply - 1]) if reply <= len(turns) else ""
            if ops:
                parts.append(_Part(f"[ops run by reply {reply}]", ops, None))
            if last and reply <= len(turns) and turns[reply - 1].get("tool_results"):
                parts.append(_Part(f"[results of reply {reply}]", str(turns[reply - 1]["tool_results"]),
                                   _RESULTS + reply))
        elif i == 0:
            if len(observation) > 40:  # shown on its own above; a short one could match by accident
                text = text.replace(observation, "[observation: shown above]")
            parts.append(_Part("[phase prompt: instructions and file index]", text, _FIRST_PROMPT))
        else:
            parts.append(_Part(f"[prompt {reply + 1}: results of reply {reply}]", text, _RESULTS + reply))
    return parts


def _fit(parts: list[_Part], budget: int, count: Callable[[str], int]) -> int:
    """Clip parts in rank order until the whole fits ``budget``; returns the tokens rendered."""
    def total() -> int:
        return count("\n".join(p.render() for p in parts))
    used = total()
    for p in sorted((p for p in parts if p.rank is not None), key=lambda p: p.rank):
        # A few rounds: joining parts and rounding can leave the total a token or two over.
        for _ in range(3):
            if used <= budget:
                return used
            have = count(p.text)
            want = max(p.floor, have - (used - budget))
            cut = _clip_to(p.text, want, count) if want < have else p.text
            if count(cut) >= have:
                break  # the omission marker would not save anything
            p.text, p.clipped = cut, True
            used = total()
    return used


def render_candidate(c: Mapping, token_budget: int = DEFAULT_TOKEN_BUDGET, tokenizer: Any = None, *,
                     count: Callable[[str], int] | None = None) -> tuple[str, dict]:
    """(text, {"tokens", "clipped", "over_budget"}) for one candidate."""
    if count is None:
        count, _ = token_counter(tokenizer)
    parts = _parts(c)
    used = _fit(parts, int(token_budget), count)
    text = "\n".join(p.render() for p in parts)
    return text, {"tokens": used, "clipped": any(p.clipped for p in parts), "over_budget": used > token_budget}


def render_batch(batch: Sequence[Mapping], token_budget: int = DEFAULT_TOKEN_BUDGET,
                 tokenizer: Any = None) -> tuple[list[str], dict]:
    """The rendered candidates and the batch's report: candidates, tokens (rendered in all),
    clipped and over_budget (how many candidates), budget_tokens (per candidate), counter."""
    count, which = token_counter(tokenizer)
    texts, tokens, clipped, over = [], 0, 0, 0
    for c in batch:
        text, info = render_candidate(c, token_budget, count=count)
        texts.append(text)
        tokens += info["tokens"]
        clipped += info["clipped"]
        over += info["over_budget"]
    return texts, {"candidates": len(batch), "tokens": tokens, "clipped": clipped, "over_budget": over,
                   "budget_tokens": int(token_budget), "counter": which}


def summarize_reports(reports: Sequence[Mapping]) -> dict | None:
    """Totals over batch reports (None when there are none), with the batches themselves."""
    if not reports:
        return None
    return {
        "batches": len(reports),
        "candidates": sum(r.get("candidates", 0) for r in reports),
        "tokens_rendered": sum(r.get("tokens", 0) for r in reports),
        "clipped": sum(r.get("clipped", 0) for r in reports),
        "over_budget": sum(r.get("over_budget", 0) for r in reports),
        "budget_tokens": sorted({r.get("budget_tokens") for r in reports}, key=str),
        "counter": sorted({str(r.get("counter")) for r in reports}),
        "per_batch": [dict(r) for r in reports],
    }
