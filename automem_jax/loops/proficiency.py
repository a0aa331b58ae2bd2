"""Loop 2 (memory proficiency): mine good memory decisions from traces and train on them.

One iteration, as in upstream AutoMem's training engine:

    traces ──extract_candidates──> one candidate per LOG phase and per PLAN memory consultation
           ──filter_top_episodes──> (optional) only the best X% of episodes
           ──postprocess──────────> upstream's fixed target clean-up (drops carry a reason)
           ──judge_candidates─────> an LLM (or heuristic) critic accepts or rejects each one in context
           ──build_iteration_dataset> datasets/<iter>/{selected.jsonl, review_decisions.jsonl, selection_stats.json}
    run_loop2: dataset -> train_fn -> eval_fn (two-model split) -> one ledger.jsonl row per iteration

Selection is by judgement of the memory ops, not by return: examples are the policy's own turns,
verbatim except for the post-processing of the last assistant message. Every unit of work (dataset,
training, evaluation, ledger row) leaves a marker, so re-running resumes where it stopped.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from automem_jax import storage
from automem_jax.agent.types import ROLE_GAMEPLAY
# Upstream's fixed post-processing rules live in loops.postprocess; re-exported for this module's callers.
from automem_jax.loops.postprocess import (ACTION_ONLY, ACTION_ONLY_CHARS, BAD_ROLES, FENCE_LEFT,  # noqa: F401
                                           NO_MEMORY_OP, NO_OP_IN_LAST, OK, POST_CHECK, post_checks, postprocess,
                                           postprocess_all, verify)
from automem_jax.loops.judging import (DEFAULT_TOKEN_BUDGET, render_batch, render_candidate,  # noqa: F401
                                       summarize_reports)
from automem_jax.memory import ops as ops_mod
from automem_jax.critic.protocol import JudgeError, parse_decisions  # noqa: F401  (JudgeError: part of this API)
from automem_jax.parallel import hosts
from automem_jax.rollout.traces import HygieneCounter, dumps, dumps_pretty

log = logging.getLogger(__name__)

__all__ = [
    "NotEnoughExamples", "JudgeError", "LLMJudge", "extract_candidates", "postprocess",
    "postprocess_all", "verify", "filter_top_episodes", "judge_candidates",
    "build_iteration_dataset", "run_loop2", "read_ledger", "MEMORY_OPS", "DEFAULT_JUDGE_INSTRUCTIONS",
]

# The phases a candidate can come from, with the ops that count as memory use in each (PLAN is
# read-only there). Post-processing itself is phase-agnostic, as upstream's is (loops.postprocess).
MEMORY_OPS: dict[str, tuple[str, ...]] = {
    "log": ops_mod.READ_OPS + ops_mod.WRITE_OPS + ("UPSERT_MAP",),
    "plan": ops_mod.READ_OPS,
}


class NotEnoughExamples(RuntimeError):
    """Fewer accepted examples than ``min_examples``; carries the counts so the caller can decide."""

    def __init__(self, selected: int, min_examples: int, stats: dict):
        self.selected, self.min_examples, self.stats = selected, min_examples, stats
        super().__init__(
            f"only {selected} examples were selected, fewer than min_examples={min_examples} "
            f"(candidates {stats.get('candidates')}, by reason {stats.get('by_reason')}); collect more "
            "traces, loosen the judge or top_pct, or pass allow_fewer=True")

    def __reduce__(self):  # rebuilt on the other hosts when process 0 raises it (parallel.hosts)
        return type(self), (self.selected, self.min_examples, self.stats)


# =================================================================================== candidates

def _read_jsonl(path: str) -> list[dict]:
    rows = []
    for i, line in enumerate(storage.read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # Only a killed writer's last line can be torn; anything earlier is a real problem.
            log.warning("%s: line %d is not JSON; the rest of the file is ignored", path, i + 1)
            break
    return rows


def _episode_files(run_dir: str) -> list[tuple[str, str, int, str]]:
    """(env, task, k, folder) of every finished episode under ``run_dir`` (or its traces/ folder)."""
    traces = storage.join(run_dir, "traces")
    if not storage.listdir(traces):
        traces = run_dir  # the caller pointed at the traces folder itself
    out = []
    for env in storage.listdir(traces):
        for task in storage.listdir(storage.join(traces, env)):
            folder = storage.join(traces, env, task)
            names = set(storage.listdir(folder))
            for name in names:
                m = re.fullmatch(r"ep_(\d+)\.jsonl", name)
                if not m:
                    continue
                if name[:-1] not in names:
                    # No ep_<k>.json: the episode was cut short and will be replayed on resume.
                    log.info("%s/%s: unfinished episode, skipped", folder, name)
                    continue
                out.append((env, task, int(m.group(1)), folder))
    return sorted(out)


def _phase_turns(phase_rec: dict, phase: str) -> list[dict]:
    """The turns of a phase that belong to a memory example.

    PLAN keeps only the memory consultation: the gameplay model's turns (two-model runs) are not
    the specialist's to learn. A failed call (error set) ends the usable part of a phase.
    """
    turns = []
    for t in phase_rec.get("turns") or []:
        if t.get("error") is not None:
            break
        if phase == "plan" and t.get("model_role") == ROLE_GAMEPLAY:
            break
        turns.append(t)
    # A trailing action-only turn stays: upstream's examples end with the turn that commits the
    # action, and post-processing drops a PLAN whose last turn is action-only.
    return turns


def _messages(turns: Sequence[dict]) -> list[dict]:
    # Each turn's prompt is the user message it answered (turn 0: the phase's initial prompt; later:
    # the continuation holding the previous turn's results), so this is the chat as the model saw it.
    msgs = []
    for t in turns:
        msgs.append({"role": "user", "content": t.get("prompt", "")})
        msgs.append({"role": "assistant", "content": t.get("response", "")})
    return msgs


def _phase_hygiene(prev_files: Mapping[str, str], turns: Sequence[dict]) -> HygieneCounter:
    # Prime the counter with the memory as it was before this step, then count only these turns.
    h = HygieneCounter()
    h.update({"memory_snapshot": dict(prev_files)})
    h.update({"log": {"turns": list(turns)}})
    return h


def extract_candidates(run_dir: str, phases: Sequence[str] = ("log", "plan")) -> list[dict]:
    """One candidate per LOG phase and per PLAN memory consultation of every finished episode.

    Keys: id ("<env>/<task>/ep<k>/s<step>/<phase>"), env, task, episode, seed, step, phase,
    messages (user/assistant chat ending with an assistant turn, verbatim), turns (the raw turn
    records), reward and progression_delta (of this step's env action), redundant_writes,
    empty_searches and n_ops (memory hygiene of these turns, counted like traces.HygieneCounter),
    episode_return, episode_progression; and, as context for a judge, observation (the text the
    game showed at this step), memory_before (files before this step) and prev_action.
    """
    bad = [p for p in phases if p not in MEMORY_OPS]
    if bad:
        raise ValueError(f"phases must be among {sorted(MEMORY_OPS)}, got {bad}")
    out = []
    for env, task, k, folder in _episode_files(run_dir):
        ep = json.loads(storage.read_text(storage.join(folder, f"ep_{k}.json")))
        prev_files: dict[str, str] = {}
        prev_prog, prev_action = 0.0, None
        for line in _read_jsonl(storage.join(folder, f"ep_{k}.jsonl")):
            step = int(line.get("step", 0))
            prog = float(line.get("progression") or 0.0)
            for phase in phases:
                turns = _phase_turns(line.get(phase) or {}, phase)
                if not turns:
                    continue  # step-0 LOG never runs; a phase whose first call failed has nothing
                h = _phase_hygiene(prev_files, turns)
                out.append({
                    "id": f"{env}/{task}/ep{k}/s{step}/{phase}",
                    "env": env, "task": task, "episode": k, "seed": ep.get("seed"),
                    "step": step, "phase": phase,
                    "messages": _messages(turns), "turns": turns,
                    "reward": float(line.get("reward") or 0.0),
                    "progression_delta": prog - prev_prog,
                    "redundant_writes": h.redundant_writes, "empty_searches": h.empty_searches,
                    "n_ops": h.ops,
                    # Context for a judge: what the game showed, the memory before this step and
                    # (for LOG) the action whose outcome is being recorded.
                    "observation": "\n".join(x for x in (line.get("obs_long_term"), line.get("obs_short_term")) if x),
                    "memory_before": prev_files,
                    "prev_action": prev_action,
                    "episode_return": float(ep.get("episode_return", 0.0)),
                    "episode_progression": float(ep.get("progression", 0.0)),
                })
            prev_files = dict(line.get("memory_snapshot") or {})
            prev_prog, prev_action = prog, line.get("validated_action")
    return out


def filter_top_episodes(candidates: Sequence[dict], top_pct: float) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): keep candidates of the top ``top_pct``% episodes of each env/task.

    Episodes rank by progression, then return. 100 keeps everything; at least one episode per
    env/task is always kept.
    """
    if not 0 < top_pct <= 100:
        raise ValueError(f"top_pct must be in (0, 100], got {top_pct}")
    if top_pct >= 100:
        return list(candidates), []
    episodes: dict[tuple, dict[int, tuple]] = defaultdict(dict)
    for c in candidates:
        episodes[(c["env"], c["task"])][c["episode"]] = (c["episode_progression"], c["episode_return"])
    keep = set()
    for group, eps in episodes.items():
        n = max(1, math.ceil(len(eps) * top_pct / 100))
        ranked = sorted(eps, key=lambda e: (eps[e][0], eps[e][1], -e), reverse=True)
        keep.update((group, e) for e in ranked[:n])
    kept = [c for c in candidates if ((c["env"], c["task"]), c["episode"]) in keep]
    dropped = [c for c in candidates if ((c["env"], c["task"]), c["episode"]) not in keep]
    return kept, dropped


# =================================================================================== judging

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
                for row in _read_jsonl(storage.join(cache_dir, name)):
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


# =================================================================================== dataset

def _ledger_row(c: dict, decision: str, reason: str, stage: str) -> dict:
    return {"id": c["id"], "env": c["env"], "task": c["task"], "episode": c["episode"], "step": c["step"],
            "phase": c["phase"], "decision": decision, "reason": reason, "stage": stage}


def _selection_stats(rows: list[dict], selected: list[dict], **meta) -> dict:
    by_phase: dict[str, Counter] = defaultdict(Counter)
    by_reason: Counter = Counter()
    by_stage: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_phase[r["phase"]]["candidates"] += 1
        by_phase[r["phase"]][r["decision"]] += 1
        by_stage[r["stage"]][r["decision"]] += 1
        # Judge reasons are free text: count them by kind, keep the codes of the fixed stages.
        if r["stage"] != "judge":
            code = r["reason"]
        else:
            src = r.get("source", "judge")
            code = r["decision"] if src == "judge" else f"{r['decision']}:{src}"
        by_reason[f"{r['stage']}:{code}"] += 1
    return {
        **meta,
        "candidates": len(rows), "selected": len(selected),
        "by_phase": {p: dict(c) for p, c in sorted(by_phase.items())},
        "by_decision": dict(Counter(r["decision"] for r in rows)),
        "by_stage": {s: dict(c) for s, c in by_stage.items()},
        "by_reason": dict(sorted(by_reason.items())),
        "edits": dict(Counter(e for s in selected for e in s["meta"]["edits"])),
        "violations": len(verify(selected)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _allocate(sizes: Mapping[Any, int], k: int, rng: random.Random) -> dict:
    """Largest-remainder split of ``k`` over strata proportional to their sizes; ties in the
    remainders go in a seeded random order, so a new seed can move the odd item elsewhere."""
    n = sum(sizes.values())
    if k >= n:
        return dict(sizes)
    keys = sorted(sizes, key=str)
    quota = {key: k * sizes[key] // n for key in keys}
    tiebreak = {key: rng.random() for key in keys}
    left = k - sum(quota.values())
    for key in sorted(keys, key=lambda x: (-(k * sizes[x] % n), tiebreak[x]))[:left]:
        quota[key] += 1
    return quota


def stratified_cap(selected: Sequence[dict], max_examples: int, seed: int) -> tuple[list[dict], dict]:
    """(kept, strata counts): at most ``max_examples`` rows, split over phases in proportion, then
    over episodes within each phase in proportion, drawn at random within an episode. Deterministic
    for a seed; the kept rows stay in their original order."""
    import random  # local: the module header is shared with other edits
    rng = random.Random(seed)
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in selected:
        m = s["meta"]
        groups[m["phase"]][f"{m['env']}/{m['task']}/ep{m['episode']}"].append(s)
    per_phase = _allocate({p: sum(len(v) for v in eps.values()) for p, eps in groups.items()}, max_examples, rng)
    keep: set[str] = set()
    strata: dict[str, dict] = {}
    for phase in sorted(groups):
        eps = groups[phase]
        quota = _allocate({e: len(v) for e, v in eps.items()}, per_phase[phase], rng)
        for ep in sorted(eps):
            ids = sorted(s["id"] for s in eps[ep])
            keep.update(rng.sample(ids, quota[ep]))
        strata[phase] = {"accepted": sum(len(v) for v in eps.values()), "kept": per_phase[phase],
                         "episodes_accepted": len(eps), "episodes_kept": sum(1 for q in quota.values() if q),
                         "by_episode": {ep: [len(eps[ep]), quota[ep]] for ep in sorted(eps)}}
    return [s for s in selected if s["id"] in keep], strata


def build_iteration_dataset(run_dir: str, out_dir: str, judge, *, min_examples: int, top_pct: float = 100,
                            version: Any = 0, batch_size: int = 20, allow_fewer: bool = False,
                            phases: Sequence[str] = ("log", "plan"), max_examples: int = 0,
                            sample_seed: int = 0) -> dict:
    """Mine ``run_dir``'s traces into a dataset folder; returns its selection stats.

    Writes ``selected.jsonl`` (post-processed sharegpt rows ``{id, conversations, meta: {env, task,
    episode, step, phase, edits}}``, as training.data.build_dataset reads them),
    ``review_decisions.jsonl`` (one row per candidate: id, env, task, episode, step, phase,
    decision, reason, stage — filter, postprocess, judge or cap), ``selection_stats.json`` and ``DONE``.
    With ``max_examples`` > 0 and more accepted, a stratified sample (``stratified_cap``, seeded by
    ``sample_seed``) keeps that many; the others are rejected at stage "cap" and the stats record
    accepted vs kept per phase and episode. If ``DONE`` exists the saved stats are returned at once.
    Fewer than ``min_examples`` selected raises NotEnoughExamples (the decisions and stats are still written, DONE is not) unless
    ``allow_fewer``. Judge answers are cached under ``judge_cache/`` so a re-run does not re-ask.
    """
    stats_path = storage.join(out_dir, "selection_stats.json")
    if storage.exists(storage.join(out_dir, "DONE")):
        return json.loads(storage.read_text(stats_path))
    candidates = extract_candidates(run_dir, phases)
    rows: dict[str, dict] = {}
    kept, dropped = filter_top_episodes(candidates, top_pct)
    for c in dropped:
        rows[c["id"]] = _ledger_row(c, "reject", f"episode outside the top {top_pct:g}%", "filter")
    # Post-process before judging: it is free and deterministic, and the critic should see the
    # exact target it is asked to approve.
    processed = []
    for c in kept:
        out, reason = postprocess(c)
        if out is None:
            rows[c["id"]] = _ledger_row(c, "reject", reason, "postprocess")
        else:
            processed.append(out)
    decisions = judge_candidates(processed, judge, batch_size, cache_dir=storage.join(out_dir, "judge_cache"))
    selected = []
    for c, d in zip(processed, decisions):
        rows[c["id"]] = {**_ledger_row(c, d["decision"], d["reason"], "judge"), "source": d["source"]}
        if d["decision"] == "accept":
            # The sharegpt row training.data.build_dataset reads: id, conversations, meta.
            selected.append({"id": c["id"], "conversations": c["messages"],
                             "meta": {k: c[k] for k in ("env", "task", "episode", "step", "phase", "edits")}})
    accepted = len(selected)
    cap: dict[str, Any] = {"max_examples": max_examples, "sample_seed": sample_seed, "accepted": accepted,
                           "kept": accepted, "applied": False}
    if max_examples and accepted > max_examples:
        # Without a cap an accept-all judge on long episodes would hand training 10^5 examples.
        selected, strata = stratified_cap(selected, max_examples, sample_seed)
        kept_ids = {s["id"] for s in selected}
        for r in rows.values():
            if r["stage"] == "judge" and r["decision"] == "accept" and r["id"] not in kept_ids:
                r.update(decision="reject", reason="over_max_examples", stage="cap", judge_decision="accept")
        cap.update(kept=len(selected), applied=True, strata=strata)
    ordered = [rows[c["id"]] for c in candidates]
    problems = verify(selected)
    if problems:  # a bug in postprocess, not in the data: never train on it
        raise AssertionError("post-processed examples violate the target rules: " + "; ".join(problems[:5]))
    stats = _selection_stats(ordered, selected, version=version, run_dir=run_dir, top_pct=top_pct,
                             min_examples=min_examples, accepted=accepted, cap=cap,
                             judge_render=judge_render_stats(storage.join(out_dir, "judge_cache")))
    storage.write_text(storage.join(out_dir, "selected.jsonl"), "".join(dumps(s) + "\n" for s in selected))
    storage.write_text(storage.join(out_dir, "review_decisions.jsonl"), "".join(dumps(r) + "\n" for r in ordered))
    if len(selected) < min_examples and not allow_fewer:
        storage.write_text(stats_path, dumps_pretty({**stats, "status": "not_enough_examples"}))
        raise NotEnoughExamples(len(selected), min_examples, stats)
    stats["status"] = "done"
    storage.write_text(stats_path, dumps_pretty(stats))
    storage.write_text(storage.join(out_dir, "DONE"), stats["created"] + "\n")
    return stats


# =================================================================================== the loop

def read_ledger(workdir: str) -> list[dict]:
    """The ledger as process 0 reads it (every host decides alike)."""
    path = storage.join(workdir, "ledger.jsonl")
    return hosts.primary(lambda: _read_jsonl(path) if storage.exists(path) else [], f"ledger {path}")


def _append_ledger(workdir: str, row: dict) -> None:
    # gs:// cannot append: rewrite the (small) file; local writes are atomic, so no torn ledger.
    # Process 0 alone writes it (every host runs the loop); later phases read it after a barrier.
    if not storage.primary_host():
        return
    path = storage.join(workdir, "ledger.jsonl")
    rows = (_read_jsonl(path) if storage.exists(path) else []) + [row]  # not read_ledger: one host here
    storage.write_text(storage.join(workdir, "ledger.jsonl"), "".join(dumps(r) + "\n" for r in rows))


def _unit(folder: str, result_name: str, fn: Callable[[], dict]) -> tuple[dict, float | None]:
    """Run ``fn`` once: its result is saved next to a DONE marker and reloaded on a re-run.
    Multi-host: every host runs ``fn`` (SPMD work); process 0's result is the one kept everywhere."""
    done, path = storage.join(folder, "DONE"), storage.join(folder, result_name)
    saved = hosts.primary(lambda: json.loads(storage.read_text(path)) if storage.exists(done) else None,
                          f"unit {folder}")
    if saved is not None:
        return saved, None
    if storage.primary_host():
        storage.makedirs(folder)  # the unit's folder exists for fn
    t = time.perf_counter()
    result = fn()
    if not isinstance(result, Mapping):
        raise TypeError(f"{result_name}: expected a dict from the callable, got {type(result).__name__}")
    result = hosts.primary(lambda: dict(result), f"unit result {folder}")
    if storage.primary_host():
        storage.write_text(path, dumps_pretty(dict(result)))
        storage.write_text(done, "ok\n")
    return dict(result), time.perf_counter() - t


def _episodes_of(run_dir: str) -> list[dict]:
    out = []
    for env, task, k, folder in _episode_files(run_dir):
        ep = json.loads(storage.read_text(storage.join(folder, f"ep_{k}.json")))
        out.append({"env": env, "task": task, "episode": k, "seed": ep.get("seed"),
                    "progression": ep.get("progression"), "return": ep.get("episode_return"),
                    "steps": ep.get("num_steps"), "end_reason": ep.get("end_reason")})
    return out


_HYGIENE_KEYS = ("redundant_write_rate", "empty_search_rate", "ops_per_step", "context_tokens_per_step")


def _eval_entry(summary: Mapping, run_dir: str) -> dict:
    per_task, hyg, weights = {}, defaultdict(float), 0
    for env, tasks in (summary.get("environments") or {}).items():
        for task, t in tasks.items():
            h = t.get("hygiene") or {}
            per_task[f"{env}/{task}"] = {"progression_percentage": t.get("progression_percentage"),
                                         "standard_error": t.get("standard_error"),
                                         "episodes": t.get("episodes"), "hygiene": h}
            w = t.get("steps") or 1  # pool the rates over steps across tasks
            weights += w
            for k in _HYGIENE_KEYS:
                hyg[k] += w * float(h.get(k, 0.0))
    episodes = hosts.primary(lambda: _episodes_of(run_dir) if storage.exists(run_dir) else [],
                             f"episodes {run_dir}")
    return {
        "run_dir": run_dir,
        "average_progress": summary.get("average_progress"), "standard_error": summary.get("standard_error"),
        "episodes": summary.get("episodes", len(episodes)),
        "per_episode": episodes or summary.get("per_episode", []),
        "per_task": per_task,
        "hygiene": {k: v / weights for k, v in hyg.items()} if weights else {},
    }


def _copy_judge_cache(src_dir: str, dst_dir: str) -> int:
    """Seed a new dataset's judge cache with an earlier one's verdicts (same judge level): a
    re-sample or another episode filter re-asks nothing the judge already answered."""
    src, dst = storage.join(src_dir, "judge_cache"), storage.join(dst_dir, "judge_cache")
    names = [n for n in storage.listdir(src) if n.startswith("batch_") and n.endswith(".jsonl")]
    if not names or storage.listdir(dst):
        return 0
    for n in names:
        storage.write_text(storage.join(dst, n), storage.read_text(storage.join(src, n)))
    return len(names)


def run_loop2(*, workdir: str, traces_dir: str, judge, train_fn: Callable[..., dict],
              eval_fn: Callable[[dict, str, int], dict], iterations: int = 1, min_examples: int = 300,
              top_pct: float = 100, start_iteration: int = 0, reuse_dataset: bool = False,
              allow_fewer: bool = False, batch_size: int = 20, max_examples: int = 0, sample_seed: int = 0,
              decider=None) -> list[dict]:
    """Run Loop-2 iterations ``start_iteration .. start_iteration + iterations - 1``; returns their ledger rows.

    Each iteration: dataset ``workdir/datasets/<i>/`` from the traces in ``traces_dir`` (at most
    ``max_examples``, see build_iteration_dataset), ``train_fn(dataset_dir, workdir/loop2/<i>/train, i)``,
    ``eval_fn(train_result, workdir/loop2/<i>/eval, i)`` (a run summary as traces.summarize
    writes it), then one row in ``workdir/ledger.jsonl``.

    Without ``decider`` every iteration repeats the configuration (``reuse_dataset``: every
    iteration after ``start_iteration`` trains on that iteration's dataset). With a
    loops.decider.Decider, each iteration first gets a decision from the ledger so far (process 0
    decides, the others receive it; saved in ``loop2/<i>/decision/``): which dataset (reuse one or
    regenerate with another judge level / episode filter / sample seed) and which recipe, passed
    as ``train_fn(..., recipe=...)``. The row records it under ``decision``.

    Finished units are never redone: an iteration with a ledger row is returned as recorded, and a
    decision, dataset, training or evaluation with its DONE marker is reloaded. A dataset below
    ``min_examples`` raises NotEnoughExamples (unless ``allow_fewer``) before anything is trained.
    """
    if iterations < 0 or start_iteration < 0:
        raise ValueError(f"iterations and start_iteration must be >= 0, got {iterations}, {start_iteration}")
    rows = []
    for it in range(start_iteration, start_iteration + iterations):
        ledger = read_ledger(workdir)
        recorded = [r for r in ledger if r.get("iteration") == it]
        if recorded:
            log.info("loop2 iteration %d already in the ledger, skipped", it)
            rows.append(recorded[-1])
            continue
        t0 = time.perf_counter()
        it_dir = storage.join(workdir, "loop2", str(it))
        it_judge, it_top, it_seed, seed_cache_from = judge, top_pct, sample_seed, None
        if decider is None:
            source = start_iteration if reuse_dataset else it
            dataset_dir = storage.join(workdir, "datasets", str(source))
            decision = {"by": "config", "data": "reuse" if source != it else "regenerate", "dataset_from": source,
                        "judge": "default", "top_pct": top_pct, "sample_seed": sample_seed, "recipe": None,
                        "rationale": "no decider: every iteration repeats the configuration"}
        else:
            history = [r for r in ledger if isinstance(r.get("iteration"), int) and r["iteration"] < it]
            # Saved before anything uses it: a resumed iteration keeps the choice its units were made with.
            decision, _ = _unit(storage.join(it_dir, "decision"), "decision.json",
                                lambda: hosts.primary(lambda: decider.decide(history, it), f"loop2 decision {it}"))
            log.info("loop2 iteration %d decision (%s): data %s, judge %s, top %s%%, recipe %s: %s", it,
                     decision["by"], decision["data"], decision["judge"], decision["top_pct"], decision["recipe"],
                     decision.get("rationale", ""))
            if decision["data"] == "reuse" and decision.get("dataset_dir"):
                dataset_dir, source = decision["dataset_dir"], decision.get("dataset_from")
            else:
                source = it
                dataset_dir = storage.join(workdir, "datasets", str(it))
                same = [r for r in history if (r.get("decision") or {}).get("judge", "default") == decision["judge"]
                        and r.get("dataset_dir")]
                seed_cache_from = same[-1]["dataset_dir"] if same else None
            it_judge = decider.judge(judge, decision["judge"])
            it_top, it_seed = decision["top_pct"], decision["sample_seed"]
        td = time.perf_counter()

        def build():
            done = storage.exists(storage.join(dataset_dir, "DONE"))
            if not done and seed_cache_from and seed_cache_from != dataset_dir:
                _copy_judge_cache(seed_cache_from, dataset_dir)
            return done, build_iteration_dataset(
                traces_dir, dataset_dir, it_judge, min_examples=min_examples, top_pct=it_top, version=source,
                batch_size=batch_size, allow_fewer=allow_fewer, max_examples=max_examples, sample_seed=it_seed)

        # Process 0 alone judges and writes the dataset; the others get its stats (or its error).
        resumed, stats = hosts.primary(build, f"loop2 dataset {dataset_dir}")
        dataset_s = None if resumed else time.perf_counter() - td
        train_dir = storage.join(it_dir, "train")
        recipe = {} if decider is None else {"recipe": decision["recipe"]}
        train, train_s = _unit(train_dir, "train_result.json",
                               lambda: train_fn(dataset_dir, train_dir, it, **recipe))
        eval_dir = storage.join(it_dir, "eval")
        summary, eval_s = _unit(eval_dir, "eval_summary.json", lambda: eval_fn(train, eval_dir, it))
        ev = _eval_entry(summary, eval_dir)
        row = {
            "iteration": it,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "decision": decision,
            "dataset_dir": dataset_dir, "dataset_version": stats.get("version", source),
            "dataset_reused_from": source if source != it else None,
            "n_examples": stats["selected"], "n_accepted": stats.get("accepted", stats["selected"]),
            "n_candidates": stats["candidates"],
            "counts": {"by_phase": stats["by_phase"], "by_decision": stats["by_decision"],
                       "by_stage": stats.get("by_stage", {})},
            "train": {**{k: train.get(k) for k in ("checkpoint", "peft", "first_loss", "final_loss", "steps",
                                                   "examples", "resumed_from", "recipe") if k in train},
                      "dir": train_dir},
            "eval": {k: ev[k] for k in ("run_dir", "average_progress", "standard_error", "episodes", "per_task")},
            "progression_mean": ev["average_progress"], "progression_se": ev["standard_error"],
            "per_episode": ev["per_episode"],
            "hygiene": ev["hygiene"],
            "config": {"min_examples": min_examples, "top_pct": top_pct, "reuse_dataset": reuse_dataset,
                       "batch_size": batch_size, "max_examples": max_examples},
            # Seconds spent in this invocation; None for a unit that was already finished.
            "seconds": {"dataset": dataset_s, "train": train_s, "eval": eval_s,
                        "total": time.perf_counter() - t0},
        }
        _append_ledger(workdir, row)
        log.info("loop2 iteration %d: %d examples (%d accepted), progression %.2f ± %.2f", it, row["n_examples"],
                 row["n_accepted"], row["progression_mean"] or 0.0, row["progression_se"] or 0.0)
        rows.append(row)
    return rows
