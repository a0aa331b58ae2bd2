"""Loop 2, first stage: the candidates mined from traces (as upstream's data engine mines them).

One candidate per LOG phase and per PLAN memory consultation of every finished episode, with the
chat the model saw (``loops.chats``), the memory hygiene of its turns and, as context for a judge,
the observation, the memory before the step and the previous action. ``filter_top_episodes``
keeps the best episodes only. Post-processing (``loops.postprocess``) and judging
(``loops.judging``) come next; ``loops.loop2_data`` builds the dataset folder.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from automem_jax import storage
from automem_jax.loops.chats import memory_turns, turns_chat
from automem_jax.memory import ops as ops_mod
from automem_jax.rollout.traces import HygieneCounter, iter_episodes

__all__ = ["MEMORY_OPS", "extract_candidates", "filter_top_episodes"]

# The phases a candidate can come from, with the ops that count as memory use in each (PLAN is
# read-only there). Post-processing itself is phase-agnostic, as upstream's is (loops.postprocess).
MEMORY_OPS: dict[str, tuple[str, ...]] = {
    "log": ops_mod.READ_OPS + ops_mod.WRITE_OPS + ("UPSERT_MAP",),
    "plan": ops_mod.READ_OPS,
}


def _finished(run_dir: str):
    # Finished episodes that have steps (ep_<k>.json and ep_<k>.jsonl); an episode cut short has
    # no result yet and is replayed on resume.
    return [ep for ep in iter_episodes(run_dir) if ep.has_steps]


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
    for e in _finished(run_dir):
        env, task, k = e.env, e.task, e.index
        ep = storage.read_json(e.result_path)
        prev_files: dict[str, str] = {}
        prev_prog, prev_action = 0.0, None
        for line in e.steps():
            step = int(line.get("step", 0))
            prog = float(line.get("progression") or 0.0)
            for phase in phases:
                turns = memory_turns(line.get(phase) or {}, phase)
                if not turns:
                    continue  # step-0 LOG never runs; a phase whose first call failed has nothing
                h = _phase_hygiene(prev_files, turns)
                out.append({
                    "id": f"{env}/{task}/ep{k}/s{step}/{phase}",
                    "env": env, "task": task, "episode": k, "seed": ep.get("seed"),
                    "step": step, "phase": phase,
                    "messages": turns_chat(turns), "turns": turns,
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


def episodes_of(run_dir: str) -> list[dict]:
    """One row per finished episode: env, task, episode, seed, progression, return, steps, end_reason."""
    out = []
    for e in _finished(run_dir):
        ep = storage.read_json(e.result_path)
        out.append({"env": e.env, "task": e.task, "episode": e.index, "seed": ep.get("seed"),
                    "progression": ep.get("progression"), "return": ep.get("episode_return"),
                    "steps": ep.get("num_steps"), "end_reason": ep.get("end_reason")})
    return out
