"""Loop 2's judging: the accept/reject decision on every candidate, in batches, cached per dataset.
A judge is the offline heuristic critic, an LLM critic (``critic.client.LLMCritic.judge``) or
``LLMJudge`` below (any chat client with this module's instructions); each is shown candidates as
``critic.judge_view`` renders them and answers in ``critic.protocol``'s format.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from automem_jax import storage
from automem_jax.critic.judge_view import DEFAULT_TOKEN_BUDGET, render_batch, summarize_reports
from automem_jax.critic.protocol import JudgeError, parse_decisions
from automem_jax.rollout.traces import dumps

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_JUDGE_INSTRUCTIONS", "LLMJudge", "judge_candidates", "judge_render_stats"]


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
