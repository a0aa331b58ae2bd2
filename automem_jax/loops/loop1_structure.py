"""Loop 1: a critic revises the MemoryStructure; a revision is kept only if it plays better.

Greedy hill-climb, as in AutoMem's scaffold optimisation: evaluate the start structure on fixed
seeds, then for each revision ask the critic for up to ``fresh_attempts`` proposals. Each reply is
parsed and validated; an unusable one is sent back once with the error (``invalid_feedback_rounds``)
and then archived as invalid without an evaluation. A valid candidate is evaluated on the same
seeds and accepted by the rule in ``Loop1Config.accept``. A valid fresh attempt that is not better
gets ``continuation_retries`` follow-up sessions that see its metrics, per-seed results, rationale
and traces. The first accepted candidate becomes the new best and ends the revision.

Workdir (local or gs://)::

    structures/v<k>.yaml              every accepted version (v0 = the start structure)
    structures/archive.jsonl          one row per finished unit (the baseline "v0" and each candidate)
    structures/best.json              the current best version, its metric and run folder
    structures/candidates/<id>/       structure.yaml, reply.txt, transcript.json, rationale.md,
                                      feedback.md, proposal.json, eval/ (the candidate's run folder)

Resume: a unit with an archive row is replayed from it (no critic call, no evaluation). A unit
whose proposal was saved (``proposal.json``) but whose row is missing was interrupted during its
evaluation: the saved proposal is evaluated again in the same run folder, where the Runner skips
finished episodes. Nothing the critic writes is executed: it is a YAML document that must pass
``MemoryStructure.validate()``.

Multi-host: every host runs the loop (the evaluations are SPMD programs); process 0 alone asks the
critic, reads the archive and candidate folders and writes them (``parallel.hosts.primary``), so
every host evaluates the same candidates and takes the same decisions.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from automem_jax import storage
from automem_jax.critic.protocol import ProposalError, parse_proposal
from automem_jax.critic.tools import TraceTools
from automem_jax.memory.diff import diff
from automem_jax.memory.structure import ENV_ALIASES, MemoryStructure, StructureError
from automem_jax.parallel import hosts
from automem_jax.rollout.traces import iter_episodes

_log = logging.getLogger(__name__)

ACCEPT_RULES = ("strict", "bootstrap")
# Bookkeeping fields: a proposal that changes only these changes nothing the agent sees.
META_KEYS = ("name", "version", "parent", "notes")
BASELINE_ID = "v0"


# --------------------------------------------------------------------------------------------
# Configuration and results

@dataclass
class Loop1Config:
    """Loop 1 knobs (upstream: 5 revisions x 3 fresh attempts, 1 continuation, strict improvement).

    revisions: revision indices to run; each ends at its first accepted candidate.
    fresh_attempts: fresh critic sessions per revision.
    continuation_retries: follow-up sessions after a valid fresh attempt that was not better.
    accept: "strict" (mean progression must beat the best by more than min_improvement) or
        "bootstrap" (paired bootstrap over seeds: P(mean per-seed gain > min_improvement) must reach
        bootstrap_confidence, and the observed mean gain must exceed min_improvement).
    min_improvement: margin in percentage points of average_progress (0 = strict improvement).
    bootstrap_confidence / bootstrap_samples / bootstrap_seed: the bootstrap rule (seeded, so a
        decision is reproducible).
    invalid_feedback_rounds: times an unusable reply is sent back with its error before the
        attempt is archived as invalid.
    """

    revisions: int = 5
    fresh_attempts: int = 3
    continuation_retries: int = 1
    accept: str = "strict"
    min_improvement: float = 0.0
    bootstrap_confidence: float = 0.9
    bootstrap_samples: int = 10000
    bootstrap_seed: int = 0
    invalid_feedback_rounds: int = 1

    def validate(self) -> "Loop1Config":
        for name in ("revisions", "fresh_attempts", "bootstrap_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Loop1Config.{name} must be an integer >= 1, got {v!r}")
        for name in ("continuation_retries", "invalid_feedback_rounds", "bootstrap_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Loop1Config.{name} must be an integer >= 0, got {v!r}")
        if self.accept not in ACCEPT_RULES:
            raise ValueError(f"Loop1Config.accept must be one of {', '.join(ACCEPT_RULES)}, got {self.accept!r}")
        if not 0.0 < float(self.bootstrap_confidence) <= 1.0:
            raise ValueError(f"Loop1Config.bootstrap_confidence must be in (0, 1], got {self.bootstrap_confidence!r}")
        if float(self.min_improvement) < 0:
            raise ValueError(f"Loop1Config.min_improvement must be >= 0, got {self.min_improvement!r}")
        return self


@dataclass
class Loop1Result:
    best: MemoryStructure
    best_metric: dict
    best_version: int
    archive: list[dict]  # every archive row, in order (the baseline row first)
    history: list[dict]  # one entry per revision: accepted id (or None) and the best after it
    best_run_dir: str | None = None


@dataclass
class Decision:
    accept: bool
    reason: str
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Metrics and the acceptance rule

def per_seed_progression(run_dir: str | None) -> dict[str, float]:
    """{seed: progression in [0, 1]} from a run folder's finished episodes (ep_<k>.json).

    Keys are the seed as a string; with several env/task folders (or a seed played twice) the key
    gets the task (and episode index) so that no result is overwritten.
    """
    if not run_dir:
        return {}
    found: list[tuple[str, str, int, dict]] = []
    for ep in iter_episodes(run_dir):
        result = ep.result()  # None for a torn write: that episode is left out
        if result is not None:
            found.append((ep.env, ep.task, ep.index, result))
    tasks = {(env, task) for env, task, _, _ in found}
    out: dict[str, float] = {}
    for env, task, k, ep in sorted(found, key=lambda t: (t[0], t[1], t[2])):
        key = str(ep.get("seed", k)) if len(tasks) == 1 else f"{env}/{task}:{ep.get('seed', k)}"
        if key in out:
            key = f"{key}#{k}"
        out[key] = float(ep.get("progression", 0.0))
    return out


def metric_of(summary: Mapping, run_dir: str | None) -> dict:
    """The metric Loop 1 compares: summary.json's average_progress (percent) and standard error,
    plus per-seed progression (a ``per_seed`` mapping in the summary wins over the run folder)."""
    if not isinstance(summary, Mapping) or "average_progress" not in summary:
        raise ValueError(f"the evaluation summary must be a mapping with 'average_progress' "
                         f"(a Runner summary.json), got {str(summary)[:200]}")
    per_seed = summary.get("per_seed")
    per_seed = ({str(k): float(v) for k, v in per_seed.items()} if isinstance(per_seed, Mapping)
                else per_seed_progression(run_dir))
    return {"average_progress": float(summary["average_progress"]),
            "standard_error": float(summary.get("standard_error", 0.0) or 0.0),
            "episodes": int(summary.get("episodes", len(per_seed)) or 0),
            "per_seed": per_seed}


def paired_bootstrap(diffs: Sequence[float], threshold: float = 0.0, samples: int = 10000,
                     seed: int = 0) -> float:
    """P(mean of a resample of `diffs` > threshold), by a seeded bootstrap over the pairs."""
    d = np.asarray(list(diffs), dtype=np.float64)
    if d.size == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(int(samples), d.size))
    return float(np.mean(d[idx].mean(axis=1) > threshold))


def decide(best: Mapping, candidate: Mapping, cfg: Loop1Config) -> Decision:
    """Accept or reject a candidate's metric against the best's (both from ``metric_of``)."""
    b, c = float(best["average_progress"]), float(candidate["average_progress"])
    margin = float(cfg.min_improvement)
    gain = c - b
    strict = Decision(gain > margin, (f"{c:.2f}% {'>' if gain > margin else '<='} {b:.2f}%"
                                      + (f" + {margin:g}" if margin else "") + " (strict)"),
                      {"rule": "strict", "gain": gain})
    if cfg.accept == "strict":
        return strict
    bs, cs = best.get("per_seed") or {}, candidate.get("per_seed") or {}
    paired = sorted(set(bs) & set(cs))
    if not paired:
        # No per-seed results to pair (e.g. a baseline given only as a summary): the means decide.
        strict.reason += "; no paired seeds for the bootstrap"
        strict.stats["rule"] = "strict-fallback"
        return strict
    diffs = [100.0 * (cs[k] - bs[k]) for k in paired]  # percentage points, like average_progress
    mean = float(np.mean(diffs))
    p = paired_bootstrap(diffs, margin, cfg.bootstrap_samples, cfg.bootstrap_seed)
    ok = p >= cfg.bootstrap_confidence and mean > margin
    reason = (f"paired bootstrap over {len(paired)} seeds: mean gain {mean:+.2f} points, "
              f"P(gain > {margin:g}) = {p:.3f} {'>=' if p >= cfg.bootstrap_confidence else '<'} "
              f"{cfg.bootstrap_confidence:g}")
    return Decision(ok, reason, {"rule": "bootstrap", "gain": gain, "paired_seeds": len(paired),
                                 "mean_paired_gain": mean, "p_improve": p})


# --------------------------------------------------------------------------------------------
# Evaluation helper

def runner_evaluator(client, env_name: str, seeds: Sequence[int], *, num_envs: int = 8, max_steps: int = 1000,
                     **runner_kwargs) -> Callable[[MemoryStructure, str], dict]:
    """``evaluate(structure, run_dir)`` that plays the fixed `seeds` with a Runner and returns its
    summary (a re-run in the same run_dir resumes after the finished episodes)."""
    from automem_jax.rollout.runner import Runner
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("runner_evaluator needs at least one seed")

    def evaluate(structure: MemoryStructure, run_dir: str) -> dict:
        runner = Runner(client, structure, run_dir, env_name, num_envs=min(num_envs, len(seeds)),
                        max_steps=max_steps, **runner_kwargs)
        return runner.run(seeds)

    return evaluate


# --------------------------------------------------------------------------------------------
# Feedback texts (our prose)

def invalid_feedback(previous: str | None, error: str) -> str:
    head = (previous.strip() + "\n\n") if previous else ""
    return (f"{head}Your last answer was NOT evaluated: it could not be used as a memory structure.\n"
            f"Problem:\n{error.strip()}\n"
            f"Answer again with the complete corrected document in one ```yaml block, then Rationale:.")


def continuation_feedback(best: MemoryStructure, best_metric: Mapping, failed: Mapping) -> str:
    """What a continuation session is told about the failed candidate (its traces are in the tools)."""
    fm = failed.get("metric") or {}
    lines = [
        f"Candidate {failed['id']} was evaluated on the same fixed seeds and was not kept.",
        f"- current best {best.label}: average progression {best_metric['average_progress']:.2f}% "
        f"± {best_metric.get('standard_error', 0.0):.2f}",
        f"- candidate {failed['id']}: average progression {fm.get('average_progress', 0.0):.2f}% "
        f"± {fm.get('standard_error', 0.0):.2f}",
        f"- decision: {failed.get('decision_reason', '')}",
    ]
    bs, cs = best_metric.get("per_seed") or {}, fm.get("per_seed") or {}
    if bs or cs:
        lines.append("Per-seed progression (current best -> candidate):")
        for k in sorted(set(bs) | set(cs), key=_seed_order):
            b, c = bs.get(k), cs.get(k)
            delta = f" ({100 * (c - b):+.1f})" if b is not None and c is not None else ""
            lines.append(f"  seed {k}: {_pct(b)} -> {_pct(c)}{delta}")
    if failed.get("diff"):
        lines.append("What the candidate changed, against the current best:")
        lines += [f"  {ln}" for ln in failed["diff"][:80]]
    if (failed.get("rationale") or "").strip():
        lines.append("The candidate's rationale:")
        lines += [f"  {ln}" for ln in failed["rationale"].strip().splitlines()]
    lines.append("The trace tools in this session browse the candidate's evaluation run. Find out why it did "
                 "not help, then revise the CURRENT BEST structure shown above: fix the candidate's change or "
                 "replace it with a better-founded one.")
    return "\n".join(lines)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _seed_order(k: str):
    return (0, int(k), "") if k.lstrip("-").isdigit() else (1, 0, k)


# --------------------------------------------------------------------------------------------
# The loop

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, default=str)


def _content(doc: Mapping) -> dict:
    return {k: v for k, v in doc.items() if k not in META_KEYS}


def _structural_diff(a: MemoryStructure, b: MemoryStructure) -> list[str]:
    # version and parent are always set by the loop itself; listing them would only add noise.
    return [ln for ln in diff(a, b) if not re.match(r"^[~+-] (version|parent): ", ln)]


def _sum_usage(usages: Sequence[Mapping]) -> dict:
    total: dict[str, Any] = {}
    for u in usages:
        for k, v in (u or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, str):
                total.setdefault(k, v)
    return total


class _Loop1:
    def __init__(self, critic, evaluate, workdir: str, cfg: Loop1Config, log: Callable[[str], Any]):
        self.critic, self.evaluate, self.cfg, self.log = critic, evaluate, cfg, log
        self.root = storage.join(str(workdir).rstrip("/"), "structures")
        self.archive_path = storage.join(self.root, "archive.jsonl")
        self.rows = self._read_archive()
        self.by_id = {r["id"]: r for r in self.rows}
        self.best: MemoryStructure | None = None
        self.best_version = 0
        self.best_metric: dict = {}
        self.best_run_dir: str | None = None
        self.best_id = BASELINE_ID

    # ---------------------------------------------------------------- storage

    def _read_archive(self) -> list[dict]:
        return hosts.primary(self._read_archive_here, f"loop1 archive {self.archive_path}")

    def _read_archive_here(self) -> list[dict]:
        try:
            text = storage.read_text(self.archive_path)
        except FileNotFoundError:
            return []
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                _log.warning("%s line %d is not JSON; ignored (its unit runs again)", self.archive_path, n)
        return rows

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        self.by_id[row["id"]] = row
        # storage has no append (gs:// objects are immutable); archives are small, so rewrite it whole.
        _write(self.archive_path, "".join(_dump(r) + "\n" for r in self.rows))

    def cand_dir(self, uid: str) -> str:
        return storage.join(self.root, "candidates", uid)

    def version_path(self, k: int) -> str:
        return storage.join(self.root, f"v{k}.yaml")

    def _load_version(self, k: int) -> MemoryStructure:
        path = self.version_path(k)
        return MemoryStructure.from_text(hosts.primary(lambda: storage.read_text(path), f"loop1 read {path}"))

    def _write_best(self) -> None:
        _write(storage.join(self.root, "best.json"), json.dumps({
            "version": self.best_version, "id": self.best_id, "label": self.best.label,
            "structure": self.version_path(self.best_version), "metric": self.best_metric,
            "run_dir": self.best_run_dir, "updated": _now()}, indent=2, ensure_ascii=True) + "\n")

    def _set_best(self, structure: MemoryStructure, version: int, metric: dict, run_dir: str | None,
                  uid: str) -> None:
        self.best, self.best_version, self.best_metric = structure, version, dict(metric)
        self.best_run_dir, self.best_id = run_dir, uid

    # ---------------------------------------------------------------- baseline

    def baseline(self, start: MemoryStructure, summary: Mapping | None, run_dir: str | None) -> None:
        row = self.by_id.get(BASELINE_ID)
        if row is not None:
            stored = self._load_version(0)
            if MemoryStructure.from_text(start.to_yaml()) != stored:
                raise ValueError(f"{self.version_path(0)} holds a different start structure ({stored.label}) than "
                                 f"the one given ({start.label}); resume with the same start, or use a fresh workdir")
            self._set_best(stored, 0, row["metric"], row.get("run_dir"), BASELINE_ID)
            self.log(f"loop1: baseline v0 replayed from the archive: {row['metric']['average_progress']:.2f}%")
            return
        _write(self.version_path(0), start.to_yaml())
        t0 = time.perf_counter()
        if summary is None and run_dir:
            summary = hosts.primary(lambda: storage.read_json(storage.join(run_dir, "summary.json"), default=None),
                                    f"loop1 baseline summary {run_dir}")
        if summary is None:
            run_dir = storage.join(self.cand_dir(BASELINE_ID), "eval")
            self.log(f"loop1: evaluating the start structure {start.label} -> {run_dir}")
            summary = self.evaluate(start, run_dir)
        metric = hosts.primary(lambda: metric_of(summary, run_dir), f"loop1 metric {run_dir}")
        self._set_best(start, 0, metric, run_dir, BASELINE_ID)
        self._append({"id": BASELINE_ID, "revision": 0, "attempt": 0, "kind": "baseline", "parent_version": None,
                      "version": 0, "status": "accepted", "metric": metric, "best_metric_before": None,
                      "decision_reason": "start structure", "rationale": "", "diff": [], "edits": [], "usage": {},
                      "transcript": None, "run_dir": run_dir, "error": None, "label": start.label,
                      "seconds": {"critic": 0.0, "eval": round(time.perf_counter() - t0, 3)}, "time": _now()})
        self._write_best()
        self.log(f"loop1: baseline v0 {start.label}: {metric['average_progress']:.2f}% "
                 f"± {metric['standard_error']:.2f}")

    # ---------------------------------------------------------------- one candidate

    def _candidate(self, text: str) -> tuple[MemoryStructure, str]:
        """(validated candidate, rationale) from a reply, or ProposalError saying what is wrong."""
        doc, rationale = parse_proposal(text)
        doc = dict(doc)
        # Version bookkeeping is the loop's job: the next version number, parented on the best.
        doc["version"] = int(self.best.version) + 1
        doc["parent"] = self.best.label
        try:
            cand = MemoryStructure(doc).validate()
        except StructureError as e:
            raise ProposalError("the proposed structure is invalid:\n"
                                + "\n".join(f"  {f}: {why}" for f, why in e.problems)) from None
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise ProposalError(f"the proposed structure is malformed: {type(e).__name__}: {e}") from None
        env_of = lambda s: ENV_ALIASES.get(s.env, s.env)  # noqa: E731
        if env_of(cand) != env_of(self.best):
            raise ProposalError(f"env: the structure is for {self.best.env!r} and must stay so, not {cand.env!r}")
        if _content(cand.doc) == _content(self.best.doc):
            raise ProposalError("the proposed structure makes no change to the current one (only name, version, "
                                "parent or notes differ); a revision needs at least one structural change")
        return cand, rationale

    def unit(self, uid: str, *, revision: int, attempt: int, kind: str, feedback: str | None,
             tools_dir: str | None, tools_structure: MemoryStructure | None, based_on: str | None = None) -> dict:
        """Run (or replay) one candidate and return its archive row."""
        if uid in self.by_id:
            row = self.by_id[uid]
            if row["status"] == "accepted":
                self._set_best(self._load_version(row["version"]), row["version"], row["metric"],
                               row.get("run_dir"), uid)
            self.log(f"loop1: {uid} replayed from the archive: {row['status']}")
            return row
        cdir = self.cand_dir(uid)
        base = {"id": uid, "revision": revision, "attempt": attempt, "kind": kind, "based_on": based_on,
                "parent_version": self.best_version, "parent_label": self.best.label, "version": None,
                "best_metric_before": self.best_metric, "metric": None, "decision_reason": "", "rationale": "",
                "diff": [], "edits": [], "usage": {}, "feedback_rounds": 0, "invalid_errors": [],
                "transcript": None, "run_dir": None, "error": None}
        if feedback:
            _write(storage.join(cdir, "feedback.md"), feedback + "\n")
        saved = hosts.primary(lambda: self._saved_proposal(cdir), f"loop1 saved proposal {uid}")
        if saved is not None:
            # Interrupted during its evaluation: evaluate the saved proposal again (no new critic call).
            cand = MemoryStructure.from_text(saved["structure"])
            row = {**base, **saved["proposal"]}
            self.log(f"loop1: {uid}: resuming the evaluation of the saved proposal")
        else:
            # Process 0 alone asks the critic and saves the proposal; every host gets its outcome.
            got = hosts.primary(lambda: self._propose_json(uid, cdir, base, attempt, feedback, tools_dir,
                                                           tools_structure), f"loop1 propose {uid}")
            if "structure" not in got:  # invalid or error: archived without an evaluation
                self._append(got["row"])
                return got["row"]
            cand, row = MemoryStructure.from_text(got["structure"]), got["row"]
        return self._evaluate(uid, cdir, cand, row)

    @staticmethod
    def _saved_proposal(cdir: str) -> dict | None:
        saved = storage.read_json(storage.join(cdir, "proposal.json"), default=None)
        if saved is None:
            return None
        return {"proposal": saved, "structure": storage.read_text(storage.join(cdir, "structure.yaml"))}

    def _propose_json(self, *args) -> dict:
        got = self._propose(*args)
        if isinstance(got, dict):
            return {"row": got}
        cand, row = got
        return {"structure": cand.to_yaml(), "row": row}

    def _propose(self, uid, cdir, base, attempt, feedback, tools_dir, tools_structure):
        tools = TraceTools(tools_dir, tools_structure) if tools_dir else None
        rounds, usages, errors = [], [], []
        fb, text, rationale, edits = feedback, "", "", []
        t0 = time.perf_counter()
        cand = None
        for rnd in range(1 + self.cfg.invalid_feedback_rounds):
            try:
                reply = self.critic.propose(self.best, tools, feedback=fb, attempt=attempt - 1)
            except Exception as e:  # noqa: BLE001 - a critic failure costs this attempt, not the loop
                err = f"{type(e).__name__}: {e}"
                rounds.append({"round": rnd, "feedback": fb, "error": err})
                self._save_rounds(cdir, rounds, text, rationale)
                self.log(f"loop1: {uid}: critic error: {err}")
                return {**base, "status": "error", "error": err, "feedback_rounds": rnd, "invalid_errors": errors,
                        "usage": _sum_usage(usages), "transcript": storage.join(cdir, "transcript.json"),
                        "decision_reason": "the critic call failed", "rationale": rationale,
                        "seconds": {"critic": round(time.perf_counter() - t0, 3), "eval": 0.0}, "time": _now()}
            text, usage = reply.text or "", dict(reply.usage or {})
            rationale, edits = reply.rationale or "", list(reply.edits or [])
            usages.append(usage)
            rounds.append({"round": rnd, "feedback": fb, "transcript": reply.transcript, "usage": usage,
                           "edits": edits})
            try:
                cand, parsed_rationale = self._candidate(text)
                rationale = rationale or parsed_rationale
                break
            except ProposalError as e:
                errors.append(str(e))
                rounds[-1]["error"] = str(e)
                self.log(f"loop1: {uid}: unusable reply (round {rnd + 1}): {str(e).splitlines()[0]}")
                fb = invalid_feedback(feedback, str(e))
        self._save_rounds(cdir, rounds, text, rationale)
        critic_s = round(time.perf_counter() - t0, 3)
        common = {"usage": _sum_usage(usages), "transcript": storage.join(cdir, "transcript.json"),
                  "rationale": rationale, "edits": edits, "invalid_errors": errors,
                  "feedback_rounds": len(rounds) - 1}
        if cand is None:
            n = len(rounds)
            return {**base, **common, "status": "invalid", "error": errors[-1],
                    "decision_reason": f"no usable structure after {n} {'reply' if n == 1 else 'replies'}",
                    "seconds": {"critic": critic_s, "eval": 0.0}, "time": _now()}
        storage.write_text(storage.join(cdir, "structure.yaml"), cand.to_yaml())
        saved = {**common, "diff": _structural_diff(self.best, cand), "critic_seconds": critic_s}
        # Written last: its presence means the proposal is complete and only the evaluation is left.
        storage.write_text(storage.join(cdir, "proposal.json"), json.dumps(saved, indent=1, ensure_ascii=True,
                                                                           default=str) + "\n")
        return cand, {**base, **saved}

    @staticmethod
    def _save_rounds(cdir: str, rounds: list[dict], text: str, rationale: str) -> None:
        storage.write_text(storage.join(cdir, "transcript.json"),
                           json.dumps(rounds, indent=1, ensure_ascii=True, default=str) + "\n")
        storage.write_text(storage.join(cdir, "reply.txt"), text)
        storage.write_text(storage.join(cdir, "rationale.md"), (rationale or "(no rationale)") + "\n")

    def _evaluate(self, uid: str, cdir: str, cand: MemoryStructure, row: dict) -> dict:
        run_dir = storage.join(cdir, "eval")
        critic_s = float(row.pop("critic_seconds", 0.0) or 0.0)
        row["run_dir"] = run_dir
        self.log(f"loop1: {uid}: evaluating {cand.label} ({len(row.get('diff') or [])} changed fields) -> {run_dir}")
        t0 = time.perf_counter()
        try:
            summary = self.evaluate(cand, run_dir)
            metric = hosts.primary(lambda: metric_of(summary, run_dir), f"loop1 metric {run_dir}")
        except Exception as e:  # noqa: BLE001 - one broken candidate must not end the loop
            err = f"evaluation failed: {type(e).__name__}: {e}"
            self.log(f"loop1: {uid}: {err}")
            row.update(status="error", error=err, decision_reason="the evaluation failed",
                       seconds={"critic": critic_s, "eval": round(time.perf_counter() - t0, 3)}, time=_now())
            self._append(row)
            return row
        d = decide(self.best_metric, metric, self.cfg)
        row.update(metric=metric, status="accepted" if d.accept else "rejected", decision_reason=d.reason,
                   decision=d.stats, seconds={"critic": critic_s, "eval": round(time.perf_counter() - t0, 3)})
        if d.accept:
            version = self.best_version + 1
            _write(self.version_path(version), cand.to_yaml())
            row["version"] = version
            self._set_best(cand, version, metric, run_dir, uid)
        row["time"] = _now()
        self._append(row)
        if d.accept:
            self._write_best()
        self.log(f"loop1: {uid}: {row['status']} ({d.reason})")
        return row

    # ---------------------------------------------------------------- revisions

    def run(self) -> list[dict]:
        history = []
        for r in range(1, self.cfg.revisions + 1):
            accepted = None
            for a in range(1, self.cfg.fresh_attempts + 1):
                uid = f"r{r}a{a}"
                row = self.unit(uid, revision=r, attempt=a, kind="fresh", feedback=None,
                                tools_dir=self.best_run_dir, tools_structure=self.best)
                if row["status"] == "accepted":
                    accepted = uid
                    break
                if row["status"] != "rejected":
                    continue  # invalid / error: nothing was evaluated, so there is nothing to follow up on
                failed = row
                for c in range(1, self.cfg.continuation_retries + 1):
                    cid = f"{uid}c{c}"
                    failed_structure = self._candidate_structure(failed["id"])
                    crow = self.unit(cid, revision=r, attempt=a, kind="continuation",
                                     feedback=continuation_feedback(self.best, self.best_metric, failed),
                                     tools_dir=failed.get("run_dir"), tools_structure=failed_structure,
                                     based_on=failed["id"])
                    if crow["status"] == "accepted":
                        accepted = cid
                        break
                    if crow["status"] == "rejected":
                        failed = crow  # a further continuation learns from the latest failure
                if accepted:
                    break
            history.append({"revision": r, "accepted": accepted, "best_version": self.best_version,
                            "best_id": self.best_id, "best_metric": self.best_metric["average_progress"]})
            self.log(f"loop1: revision {r}: {'accepted ' + accepted if accepted else 'no improvement'}; best "
                     f"v{self.best_version} ({self.best.label}) {self.best_metric['average_progress']:.2f}%")
        return history

    def _candidate_structure(self, uid: str) -> MemoryStructure | None:
        path = storage.join(self.cand_dir(uid), "structure.yaml")
        text = hosts.primary(lambda: storage.read_text(path) if storage.exists(path) else None, f"loop1 read {path}")
        try:
            return MemoryStructure.from_text(text) if text is not None else None
        except (StructureError, ValueError):
            return None


def _write(path: str, text: str) -> None:
    """Process 0 writes the loop's files; the other hosts keep the same state in memory."""
    if storage.primary_host():
        storage.write_text(path, text)


def run_loop1(*, critic, start: MemoryStructure, evaluate: Callable[[MemoryStructure, str], Mapping],
              workdir: str, cfg: Loop1Config | None = None, baseline_summary: Mapping | None = None,
              baseline_run_dir: str | None = None, log: Callable[[str], Any] = print) -> Loop1Result:
    """Loop 1 (see the module docstring). Re-running the same call resumes from the archive.

    critic: a ``Critic`` (``propose(structure, tools, feedback=, attempt=)``).
    evaluate: ``evaluate(structure, run_dir) -> summary`` on the fixed seeds, writing traces into
        run_dir (``runner_evaluator`` builds one from a Runner).
    baseline_summary / baseline_run_dir: the start structure's existing evaluation, if any (a run
        dir alone is enough when it holds summary.json); otherwise the start is evaluated here.
    """
    cfg = (cfg or Loop1Config()).validate()
    if not isinstance(start, MemoryStructure):
        raise TypeError(f"start must be a MemoryStructure, got {type(start).__name__}")
    start.validate()
    loop = _Loop1(critic, evaluate, workdir, cfg, log)
    loop.baseline(start, baseline_summary, baseline_run_dir)
    history = loop.run()
    loop._write_best()  # also repairs a best.json left stale by a crash between the archive row and it
    return Loop1Result(best=loop.best, best_metric=loop.best_metric, best_version=loop.best_version,
                       archive=list(loop.rows), history=history, best_run_dir=loop.best_run_dir)


__all__ = ["ACCEPT_RULES", "Decision", "Loop1Config", "Loop1Result", "continuation_feedback", "decide",
           "invalid_feedback", "metric_of", "paired_bootstrap", "per_seed_progression", "run_loop1",
           "runner_evaluator"]
