"""Loop 2, the dataset of one iteration: candidates -> episode filter -> post-processing -> judge ->
(optional) stratified cap -> ``datasets/<iter>/{selected.jsonl, review_decisions.jsonl,
selection_stats.json, DONE}``.

Selection is by judgement of the memory ops, not by return: examples are the policy's own turns,
verbatim except for the post-processing of the last assistant message.
"""
from __future__ import annotations

import datetime as _dt
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from automem_jax import storage
from automem_jax.loops.judging import judge_candidates, judge_render_stats
from automem_jax.loops.loop2_mining import extract_candidates, filter_top_episodes
from automem_jax.loops.postprocess import postprocess, verify
from automem_jax.rollout.traces import dumps, dumps_pretty

__all__ = ["NotEnoughExamples", "stratified_cap", "build_iteration_dataset"]


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
    Fewer than ``min_examples`` selected raises NotEnoughExamples (the decisions and stats are still
    written, DONE is not) unless ``allow_fewer``. Judge answers are cached under ``judge_cache/`` so a re-run does not re-ask.
    """
    stats_path = storage.join(out_dir, "selection_stats.json")
    if storage.exists(storage.join(out_dir, "DONE")):
        return storage.read_json(stats_path)
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
