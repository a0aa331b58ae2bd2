"""Loop 2's judging: what a judge reads about one candidate (within a token budget), the LLM judge,
and the accept/reject decisions of every candidate, batched and cached.

Both LLM judges (``LLMJudge`` below and ``critic.client.LLMCritic.judge``) render
candidates here, so they see the same thing: the step's facts, the previous action, the
observation, every memory file as it was before the step, and every turn of the phase (the prompts
that carry command results, the replies, the ops run). When a candidate is over its budget the
least useful parts are clipped first: the phase's first prompt (mostly fixed instructions, and its
observation is shown on its own), then command results from the oldest on, then earlier replies;
the observation, the memory and the last reply go last. Tokens are counted with a tokenizer when
one is given (anything with ``encode(text)`` or a callable returning a sequence), else estimated as
characters / 4; every render reports which.

``critic.client`` imports this module (for the renderer), so the critic's reply format
(``critic.protocol``) is imported where it is used: a module-level import would run the critic
package's ``__init__`` (and so ``critic.client``) halfway through this module.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from automem_jax import storage
from automem_jax.rollout.traces import dumps

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOKEN_BUDGET", "token_counter", "render_candidate", "render_batch", "summarize_reports",
           "DEFAULT_JUDGE_INSTRUCTIONS", "LLMJudge", "judge_candidates", "judge_render_stats"]

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


# =================================================================================== judges

DEFAULT_JUDGE_INSTRUCTIONS = """\
You review the memory decisions of an agent that plays a game. The agent keeps notes in a few text \
files and works on them with inline commands such as <|READ|>file<|END|>, <|SEARCH|>file|keyword<|END|>, \
<|TAIL|>file|N<|END|>, <|COUNT|>file|keyword<|END|>, <|APPEND|>file|text<|END|>, <|WRITE|>file|text<|END|> \
and <|CREATE|>file<|END|>. Every game step has a LOG phase, in which the agent records what its previous \
action led to (ending with <|DONE|>), and a PLAN phase, in which it looks things up read-only before it \
chooses an action. Each item below is one such phase; the accepted ones become fine-tuning examples for \
the agent's memory skill, so accept only what is worth imitating.

How to judge, using the observation, the files and the command results shown in the item:
- LOG: accept when the notes are new (not already stored), agree with what the game actually showed, are \
specific enough to help later (positions, causes, failures, resources, dangers), go into fitting files, \
and the agent checked before writing where that mattered. Reject invented events, duplicates of stored \
lines, vague or useless notes, and misuse of the command syntax.
- PLAN: accept when the lookups aim at files and keywords that could hold what the current situation \
needs, and retrieve something relevant. Reject blind or repeated lookups, searches for keywords that \
cannot match, and reading everything without purpose. One empty search on a sensible keyword is fine.
- Judge only the memory commands and the reasoning around them. Ignore whether the game action was good.

Reply with nothing but a JSON list holding one object per item, every id exactly once:
[{"id": "<item id>", "decision": "accept" or "reject", "reason": "<one short sentence>"}]
"""


def _reply_text(reply) -> str:
    if isinstance(reply, str):
        return reply
    content = getattr(reply, "content", None)
    if content is None and isinstance(reply, Mapping):
        content = reply.get("content")
    return content if isinstance(content, str) else ""


class LLMJudge:
    """Judges a batch of candidates with a critic chat model (anything with ``chat(messages)``).

    Each candidate is rendered by ``loops.judging`` within ``token_budget`` tokens (counted with
    ``tokenizer`` if given, else estimated); each batch's render report goes to ``render_log``.
    An unparseable reply is retried once with the parse error fed back; if the retry fails too,
    every item of the batch is rejected with the error as the reason (marked ``error``), so a bad
    critic reply never accepts anything and never stops the run.
    """

    def __init__(self, critic_client, instructions: str | None = None, *,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, tokenizer=None, retries: int = 1):
        self.client = critic_client
        self.instructions = instructions or DEFAULT_JUDGE_INSTRUCTIONS
        self.token_budget, self.tokenizer = int(token_budget), tokenizer
        self.retries = retries
        self.render_log: list[dict] = []  # one report per batch rendered (see judge_candidates)

    def prompt(self, batch: Sequence[dict]) -> str:
        texts, report = render_batch(batch, self.token_budget, self.tokenizer)
        self.render_log.append(report)
        ids = ", ".join(c["id"] for c in batch)
        return f"{self.instructions}\n{len(batch)} items (ids: {ids}):\n\n" + "\n\n".join(texts)

    def judge(self, batch: Sequence[dict]) -> list[dict]:
        from automem_jax.critic.protocol import JudgeError, parse_decisions  # see the module docstring
        messages = [{"role": "user", "content": self.prompt(batch)}]
        error = ""
        for attempt in range(self.retries + 1):
            text = _reply_text(self.client.chat(messages))
            try:
                return parse_decisions(text)
            except JudgeError as e:
                error = str(e)
                log.warning("judge reply unusable (attempt %d): %s", attempt + 1, error)
                messages = messages + [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"Your reply could not be used: {error}. Reply again with "
                     "only the JSON list of {\"id\", \"decision\", \"reason\"} objects, one per item."}]
        return [{"id": c["id"], "decision": "reject", "reason": f"judge reply unusable: {error}",
                 "error": True} for c in batch]


def _normalise(batch: Sequence[dict], reply) -> list[dict]:
    """One decision per candidate of ``batch``, in order; never accepts what the judge did not."""
    from automem_jax.critic.protocol import JudgeError  # see the module docstring
    if not isinstance(reply, list) or not all(isinstance(d, Mapping) for d in reply):
        raise JudgeError(f"judge.judge must return a list of {{id, decision, reason}} dicts, "
                         f"got {type(reply).__name__}: {str(reply)[:200]}")
    by_id: dict[str, list[Mapping]] = defaultdict(list)
    for d in reply:
        by_id[str(d.get("id"))].append(d)
    wanted = {c["id"] for c in batch}
    extra = sorted(set(by_id) - wanted)
    if extra:
        log.warning("judge answered for ids it was not given (ignored): %s", extra[:5])
    out = []
    for c in batch:
        got = by_id.get(c["id"], [])
        decisions = {str(d.get("decision", "")).strip().lower() for d in got}
        if not got:
            out.append({"id": c["id"], "decision": "reject", "reason": "no decision", "source": "missing"})
        elif len(decisions) > 1:
            out.append({"id": c["id"], "decision": "reject", "reason": "conflicting decisions for one id",
                        "source": "conflict"})
        elif decisions != {"accept"} and decisions != {"reject"}:
            out.append({"id": c["id"], "decision": "reject",
                        "reason": f"invalid decision {next(iter(decisions))!r}", "source": "invalid"})
        else:
            d = got[0]
            out.append({"id": c["id"], "decision": decisions.pop(), "reason": str(d.get("reason", "")),
                        "source": "judge_error" if d.get("error") else "judge"})
    return out


def judge_candidates(candidates: Sequence[dict], judge, batch_size: int = 20, *,
                     cache_dir: str | None = None) -> list[dict]:
    """Decisions ``{id, decision, reason, source}`` for every candidate, in candidate order.

    ``judge`` is any object with ``judge(list[dict]) -> list[{id, decision, reason}]``. An id the
    reply leaves out is rejected with reason "no decision"; duplicates that disagree, unknown
    decision words and judge errors are rejections too. With ``cache_dir`` each finished batch is
    saved there, and a re-run only asks about candidates without a saved decision. A judge that
    keeps a ``render_log`` (the LLM judges) has each batch's render report logged and, with
    ``cache_dir``, saved as ``render_<n>.json`` next to the batch (see ``judge_render_stats``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [c["id"] for c in candidates]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"candidate ids must be unique; repeated: {dup[:5]}")
    cached: dict[str, dict] = {}
    n_files = 0
    if cache_dir is not None:
        for name in storage.listdir(cache_dir):
            if name.startswith("batch_") and name.endswith(".jsonl"):
                n_files += 1
                for row in storage.read_jsonl(storage.join(cache_dir, name)):
                    cached[row["id"]] = row
    todo = [c for c in candidates if c["id"] not in cached]
    if cached:
        log.info("judge: %d decisions reused from %s, %d to ask", len(candidates) - len(todo), cache_dir, len(todo))
    for i in range(0, len(todo), batch_size):
        batch = todo[i:i + batch_size]
        render_log = getattr(judge, "render_log", None)
        seen = len(render_log) if isinstance(render_log, list) else 0
        decided = _normalise(batch, judge.judge([dict(c) for c in batch]))
        reports = render_log[seen:] if isinstance(render_log, list) else []
        for r in reports:
            log.info("judge input: %d candidates, %d tokens (%s), %d clipped to %s tokens each, %d still over",
                     r.get("candidates"), r.get("tokens"), r.get("counter"), r.get("clipped"),
                     r.get("budget_tokens"), r.get("over_budget"))
        for d in decided:
            cached[d["id"]] = d
        if cache_dir is not None:
            # Only clean verdicts are kept: a missing, malformed or failed answer is asked again on a re-run.
            keep = [d for d in decided if d["source"] == "judge"]
            storage.write_text(storage.join(cache_dir, f"batch_{n_files:06d}.jsonl"),
                               "".join(dumps(d) + "\n" for d in keep))
            if reports:
                storage.write_text(storage.join(cache_dir, f"render_{n_files:06d}.json"), dumps(list(reports)))
            n_files += 1
    return [cached[i] for i in ids]


def judge_render_stats(cache_dir: str) -> dict | None:
    """What the judge was shown for a dataset (every render saved in ``cache_dir``, re-runs
    included): batches, candidates, tokens_rendered, clipped, over_budget, budget_tokens, counter
    and per_batch; None when the judge reported nothing (a heuristic or stub judge)."""
    reports = []
    for name in sorted(storage.listdir(cache_dir)):
        if name.startswith("render_") and name.endswith(".json"):
            reports += json.loads(storage.read_text(storage.join(cache_dir, name)))
    return summarize_reports(reports)
