"""The offline critic: deterministic, rule-based, no network.

It stands in for a hosted critic wherever none is configured (the tiny CPU config, tests) and
speaks the same protocol:

* ``propose(structure, tools, feedback=None, attempt=None) -> ProposalReply`` reads trace
  statistics through ``TraceTools`` and makes one rule-based structural edit (two on a
  continuation after a failed attempt) to the MemoryStructure document. The reply text has the
  exact format an LLM critic is asked for (``PROPOSAL_FORMAT``), so the loop parses both with
  ``parse_proposal`` (both in ``critic.protocol``).
* ``judge(candidates) -> [{"id", "decision", "reason"}]`` accepts or rejects Loop-2 memory turns
  by hygiene rules (no ops, failed ops, redundant writes, empty searches, oversized writes,
  re-reads).

Nothing a critic writes is executed: a proposal is a YAML document that must pass
``MemoryStructure.validate()``.
"""
from __future__ import annotations

import copy
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from automem_jax.critic.protocol import ProposalError, ProposalReply, format_proposal
from automem_jax.critic.tools import CONTROL_OPS, READ_OPS, is_empty_result
from automem_jax.memory.schema import MAX_BUDGET_TURNS
from automem_jax.memory.structure import MemoryStructure, StructureError

EDIT_TAG_RE = re.compile(r"\[edit: ([a-z_]+)\]")  # how a rationale names an edit (read back on continuation)


# --------------------------------------------------------------------------------------------
# Trace statistics

def run_stats(tools) -> dict:
    """Totals and rates over every episode of a run (from TraceTools.episode_stats())."""
    eps = tools.episode_stats() if tools is not None else []
    keys = ("steps", "invalid_actions", "unchanged_steps", "writes", "redundant_writes", "searches",
            "empty_searches", "ops", "failed_ops", "plan_fallbacks", "plan_budget_ends", "log_budget_ends",
            "log_no_ops", "plan_no_lookup", "repeat_reads", "turn_errors")
    a: dict[str, Any] = {k: sum(e[k] for e in eps) for k in keys}
    a["episodes"] = len(eps)
    a["deaths"] = sum(1 for e in eps if e["end_reason"] == "terminated")
    a["progression"] = sum(e["progression"] for e in eps) / max(1, len(eps))
    a["reward_events"] = sum(len(e["reward_events"]) for e in eps)
    a["max_unchanged"] = max((e["max_unchanged"] for e in eps), default=0)
    a["max_action_run"] = max((e["max_action_run"] for e in eps), default=0)
    a["max_payload_chars"] = max((e["max_payload_chars"] for e in eps), default=0)
    per_file: Counter = Counter()
    biggest: dict[str, dict] = {}
    for e in eps:
        per_file.update(e["writes_per_file"])
        for name, size in e["final_files"].items():
            if size["lines"] > biggest.get(name, {"lines": -1})["lines"]:
                biggest[name] = size
    a["writes_per_file"] = dict(per_file)
    a["final_files"] = biggest
    n = max(1, a["steps"])
    a["invalid_rate"] = a["invalid_actions"] / n
    a["unchanged_rate"] = a["unchanged_steps"] / n
    a["redundant_rate"] = a["redundant_writes"] / max(1, a["writes"])
    a["empty_rate"] = a["empty_searches"] / max(1, a["searches"])
    a["fallback_rate"] = (a["plan_fallbacks"] + a["plan_budget_ends"]) / n
    a["log_budget_rate"] = a["log_budget_ends"] / n
    a["ops_per_step"] = a["ops"] / n
    a["death_rate"] = a["deaths"] / max(1, a["episodes"])
    return a


def describe_stats(a: dict) -> str:
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    return (f"{a['episodes']} episodes, {a['steps']} steps, mean progression {a['progression']:.3f}; "
            f"invalid actions {a['invalid_actions']} ({pct(a['invalid_rate'])}); unchanged observations on "
            f"{a['unchanged_steps']} steps ({pct(a['unchanged_rate'])}, longest streak {a['max_unchanged']}); "
            f"longest run of one action {a['max_action_run']}; writes {a['writes']} of which redundant "
            f"{a['redundant_writes']} ({pct(a['redundant_rate'])}); searches {a['searches']} of which empty "
            f"{a['empty_searches']} ({pct(a['empty_rate'])}); failed ops {a['failed_ops']}; ops per step "
            f"{a['ops_per_step']:.2f}; PLAN fallbacks/budget ends {a['plan_fallbacks'] + a['plan_budget_ends']}; "
            f"LOG budget ends {a['log_budget_ends']}; deaths {a['deaths']}.")


# --------------------------------------------------------------------------------------------
# Structural edits. Each works on a normalised document and returns a one-line description of
# what it changed, or None when it does not apply (already in place, or nothing to change).

def _ensure_placeholder(doc: dict, phase: str, name: str) -> None:
    """Make prompts[phase] show `{name}` (or {context} for blocks): a line just before the observation."""
    prompt = doc["prompts"][phase]
    if "{" + name + "}" in prompt or (name != "file_guide" and "{context}" in prompt):
        return
    lines = prompt.split("\n")
    if name == "file_guide":  # right after the file index, under its own heading
        at = next((i + 1 for i, ln in enumerate(lines) if "{file_index}" in ln), len(lines))
        lines[at:at] = ["", "WHAT EACH FILE IS FOR:", "{file_guide}"]
    else:  # above the observation, and above the observation's heading line if it has one
        at = next((i for i, ln in enumerate(lines) if "{observation}" in ln), len(lines))
        if at > 0 and lines[at - 1].rstrip().endswith(":"):
            at -= 1
        lines[at:at] = ["{context}", ""]
    doc["prompts"][phase] = "\n".join(lines)


def _enable_block(doc: dict, name: str, phases: list[str], params: dict | None = None) -> str | None:
    for c in doc["context"]:
        if c.get("name") == name:
            if c.get("enabled") and set(phases) <= set(c.get("phases", [])):
                return None
            c["enabled"] = True
            c["phases"] = sorted(set(c.get("phases", [])) | set(phases), key=["log", "plan"].index)
            break
    else:
        doc["context"].append({"name": name, "enabled": True, "phases": list(phases), "params": dict(params or {})})
    for p in phases:
        _ensure_placeholder(doc, p, name)
    return f"switched on the {name} context block for {'/'.join(p.upper() for p in phases)}"


def _fresh_name(doc: dict, stem: str) -> str:
    taken = {f["name"] for f in doc["files"]}
    name, i = f"{stem}.txt", 2
    while name in taken:
        name, i = f"{stem}_{i}.txt", i + 1
    return name


def _edit_repetition(doc, a):
    return _enable_block(doc, "repetition", ["plan"])


def _edit_stuck(doc, a):
    return _enable_block(doc, "stuck_counter", ["log", "plan"], {"threshold": 3})


def _edit_recent_actions(doc, a):
    return _enable_block(doc, "recent_actions", ["plan"], {"n": 5})


def _edit_vitals(doc, a):
    return _enable_block(doc, "vitals_urgency", ["plan"])


def _edit_inventory(doc, a):
    return _enable_block(doc, "inventory_change", ["log"])


def _edit_unchanged_sooner(doc, a):
    for c in doc["context"]:
        if c.get("name") == "unchanged_observation" and c.get("enabled"):
            old = int(c["params"].get("critical_after", 3))
            if old <= 2:
                return None
            c["params"]["critical_after"] = old - 1
            return f"the unchanged_observation block escalates to its critical warning after {old - 1} " \
                   f"unchanged steps instead of {old}"
    return None


def _edit_action_match(doc, a):
    if doc["action"].get("match") == "case_insensitive":
        return None
    doc["action"]["match"] = "case_insensitive"
    return "actions are matched case-insensitively (action.match: case_insensitive)"


def _raise_budget(doc, key: str) -> str | None:
    old = int(doc["budgets"][key])
    new = min(MAX_BUDGET_TURNS, max(old + 2, old + old // 2))
    if new <= old:
        return None
    doc["budgets"][key] = new
    return f"budgets.{key} raised from {old} to {new}"


def _edit_plan_budget(doc, a):
    return _raise_budget(doc, "plan_turns")


def _edit_log_budget(doc, a):
    return _raise_budget(doc, "log_turns")


def _biggest_file(doc, a) -> tuple[str, int] | None:
    ruled = {r["file"] for r in doc["pruning"]}
    sizes = [(s["lines"], name) for name, s in a["final_files"].items() if name not in ruled and s["lines"] >= 2]
    if not sizes:
        return None
    lines, name = max(sizes)
    return name, lines


def _edit_prune(doc, a):
    big = _biggest_file(doc, a)
    if big is None:
        return None
    name, lines = big
    cap = max(20, min(200, lines // 2))
    doc["pruning"].append({"file": name, "max_lines": cap, "keep_lines": max(1, cap // 2)})
    return f"pruning rule for {name} (it reached {lines} lines): above {cap} lines keep the newest {cap // 2}"


def _hot_file(a) -> tuple[str, float] | None:
    w = a["writes_per_file"]
    total = sum(w.values())
    if not total:
        return None
    name, n = max(w.items(), key=lambda kv: (kv[1], kv[0]))
    return name, n / total


def _edit_split_file(doc, a):
    hot = _hot_file(a)
    src = hot[0] if hot else (doc["files"][0]["name"] if doc["files"] else "notes.txt")
    stem = re.sub(r"[^a-z0-9]+", "_", src.rsplit(".", 1)[0].lower()).strip("_") or "notes"
    name = _fresh_name(doc, f"{stem}_key_facts")
    if len(doc["files"]) >= doc["limits"]["max_files"]:
        return None
    doc["files"].append({"name": name, "description": (
        f"Durable facts distilled from {src}: one short line per fact, each fact kept once; "
        f"rewrite the line when it changes instead of adding another."), "content": ""})
    for p in ("log", "plan"):
        _ensure_placeholder(doc, p, "file_guide")
    share = f" ({100 * hot[1]:.0f}% of all writes)" if hot else ""
    return f"new initial file {name} with a description, for the lasting facts now piling into {src}{share}; " \
           f"file descriptions shown in LOG and PLAN via {{file_guide}}"


def _edit_keyed_facts(doc, a):
    names = {k["name"] for k in doc["ops"]["keyed"]}
    if "UPSERT_FACT" in names:
        if "UPSERT_FACT" in doc["ops"]["log"]:
            return None
        spec = next(k for k in doc["ops"]["keyed"] if k["name"] == "UPSERT_FACT")
    else:
        fname = _fresh_name(doc, "facts")
        spec = {"name": "UPSERT_FACT", "file": fname, "key": "text",
                "usage": "<|UPSERT_FACT|>topic|fact<|END|>",
                "description": f"Set the one line of {fname} for a topic, replacing the old line "
                               f"instead of adding a duplicate",
                "result": "[Updated {file}: {key}]"}
        doc["ops"]["keyed"].append(spec)
        if len(doc["files"]) < doc["limits"]["max_files"]:
            doc["files"].append({"name": fname, "description": "One line per topic, kept current with UPSERT_FACT.",
                                 "content": ""})
    log_ops = doc["ops"]["log"]
    log_ops.insert(log_ops.index("DONE") if "DONE" in log_ops else len(log_ops), "UPSERT_FACT")
    return f"keyed-update op UPSERT_FACT on {spec['file']} in LOG: facts are replaced by topic, not appended again"


def _edit_file_guide(doc, a):
    if not any(f["description"].strip() for f in doc["files"]):
        return None
    changed = [p for p in ("plan", "log") if "{file_guide}" not in doc["prompts"][p]]
    if not changed:
        return None
    for p in changed:
        _ensure_placeholder(doc, p, "file_guide")
    return f"file descriptions ({{file_guide}}) shown in {'/'.join(p.upper() for p in changed)}, so lookups " \
           f"go to the file that holds the answer"


@dataclass(frozen=True)
class Edit:
    id: str
    score: Callable[[dict], float]  # relevance from run stats; higher first
    apply: Callable[[dict, dict], str | None]
    evidence: Callable[[dict], str]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


EDITS: tuple[Edit, ...] = (
    Edit("repetition_alert", lambda a: 2 * a["unchanged_rate"] + 0.5 * (a["max_action_run"] >= 3), _edit_repetition,
         lambda a: f"unchanged observations on {_pct(a['unchanged_rate'])} of steps; one action ran "
                   f"{a['max_action_run']} times in a row"),
    Edit("stuck_counter", lambda a: 1.5 * a["unchanged_rate"] + 0.4 * (a["max_unchanged"] >= 3), _edit_stuck,
         lambda a: f"the observation stayed the same for up to {a['max_unchanged']} steps in a row"),
    Edit("recent_actions", lambda a: 3 * a["invalid_rate"] + 0.5 * a["unchanged_rate"], _edit_recent_actions,
         lambda a: f"{a['invalid_actions']} invalid actions ({_pct(a['invalid_rate'])})"),
    Edit("action_match", lambda a: 4 * a["invalid_rate"], _edit_action_match,
         lambda a: f"{a['invalid_actions']} invalid actions ({_pct(a['invalid_rate'])})"),
    Edit("plan_budget", lambda a: 4 * a["fallback_rate"] + 0.05, _edit_plan_budget,
         lambda a: f"{a['plan_fallbacks'] + a['plan_budget_ends']} PLAN phases ended by fallback or budget"),
    Edit("log_budget", lambda a: 3 * a["log_budget_rate"] + 0.02, _edit_log_budget,
         lambda a: f"{a['log_budget_ends']} LOG phases ran out of turns"),
    Edit("prune_file", lambda a: min(2.0, max((s["lines"] for s in a["final_files"].values()), default=0) / 100),
         _edit_prune,
         lambda a: "largest file at the end: " + (max(((s["lines"], n) for n, s in a["final_files"].items()),
                                                      default=(0, "none"))[1])),
    Edit("split_file", lambda a: ((_hot_file(a) or ("", 0))[1] if a["writes"] >= 3 else 0) + 0.5 * a["redundant_rate"],
         _edit_split_file,
         lambda a: f"{(_hot_file(a) or ('no file', 0))[0]} took {_pct((_hot_file(a) or ('', 0))[1])} of "
                   f"{a['writes']} writes"),
    Edit("keyed_facts", lambda a: 3 * a["redundant_rate"], _edit_keyed_facts,
         lambda a: f"{a['redundant_writes']} of {a['writes']} writes repeated content already stored"),
    Edit("file_guide", lambda a: 2 * a["empty_rate"], _edit_file_guide,
         lambda a: f"{a['empty_searches']} of {a['searches']} searches found nothing"),
    Edit("unchanged_sooner", lambda a: a["unchanged_rate"], _edit_unchanged_sooner,
         lambda a: f"unchanged observations on {_pct(a['unchanged_rate'])} of steps"),
    Edit("vitals_urgency", lambda a: 2 * a["death_rate"], _edit_vitals,
         lambda a: f"{a['deaths']} of {a['episodes']} episodes ended in death"),
    Edit("inventory_change", lambda a: 0.1 + 0.2 * (a["reward_events"] > 0), _edit_inventory,
         lambda a: f"{a['reward_events']} reward events to tie to inventory changes"),
)
EDITS_BY_ID = {e.id: e for e in EDITS}


# --------------------------------------------------------------------------------------------
# The critic

REJECT, ACCEPT = "reject", "accept"
OVERSIZED_WRITE_CHARS = 600
OVERSIZED_WRITE_LINES = 8


class HeuristicCritic:
    """Deterministic offline critic (see the module docstring). `seed` breaks ties between edits
    of equal relevance; the same seed, structure, traces and attempt give the same proposal."""

    kind = "heuristic"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._calls = 0
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}

    def __repr__(self) -> str:
        return f"HeuristicCritic(seed={self.seed})"

    # ---------------------------------------------------------------- Loop 1

    def _ranked(self, doc: dict, a: dict) -> list[tuple[Edit, dict, str]]:
        """Applicable edits, most relevant first: (edit, edited copy of doc, description)."""
        out = []
        for i, e in enumerate(EDITS):
            trial = copy.deepcopy(doc)
            what = e.apply(trial, a)
            if what is None or trial == doc:
                continue
            try:
                MemoryStructure(trial).validate()
            except StructureError:
                continue  # never propose an invalid document
            tie = (i * 7919 + self.seed * 104729) % 1009  # seeded, stable tie-break
            out.append((-round(e.score(a), 6), tie, e, trial, what))
        out.sort(key=lambda t: (t[0], t[1]))
        return [(e, trial, what) for _s, _t, e, trial, what in out]

    def propose(self, structure: MemoryStructure, tools=None, feedback: str | None = None,
                attempt: int | None = None) -> ProposalReply:
        t0 = time.perf_counter()
        if attempt is None:
            attempt = self._calls
        self._calls += 1
        base = MemoryStructure(structure.to_dict() if isinstance(structure, MemoryStructure) else structure)
        base.validate()
        doc = base.to_dict()
        a = run_stats(tools)
        ranked = self._ranked(doc, a)
        if not ranked:
            raise ProposalError("the heuristic critic found no applicable structural edit for this structure")
        if feedback:
            # Continuation: leave out the edits the failed attempt made, and combine the two most
            # relevant remaining ones, so it also differs from every single-edit fresh attempt.
            failed = set(EDIT_TAG_RE.findall(feedback)) or {ranked[attempt % len(ranked)][0].id}
            rest = [r for r in ranked if r[0].id not in failed] or ranked
            chosen = [rest[0]]
            if len(rest) > 1:
                second = copy.deepcopy(rest[0][1])
                what = rest[1][0].apply(second, a)
                try:
                    if what is not None and second != rest[0][1]:
                        MemoryStructure(second).validate()
                        chosen = [(rest[0][0], second, rest[0][2]), (rest[1][0], second, what)]
                except StructureError:
                    pass
        else:
            chosen = [ranked[attempt % len(ranked)]]
        new = copy.deepcopy(chosen[-1][1])
        old_label = f"{doc['name']}@v{doc['version']}"
        new["version"] = int(doc["version"]) + 1
        new["parent"] = old_label
        m = re.fullmatch(r"(.*-v)\d+", doc["name"])
        new["name"] = f"{m.group(1)}{new['version']}" if m else doc["name"]
        change = "; ".join(what for _e, _d, what in chosen)
        new["notes"] = (doc.get("notes", "").strip() + f"\nv{new['version']} (heuristic critic): {change}.").strip()
        MemoryStructure(new).validate()
        lines = [f"- {what} [edit: {e.id}]. Evidence: {e.evidence(a)}." for e, _d, what in chosen]
        if feedback:
            lines.append("- Continuation after a revision that did not improve: the edits it made are left out "
                         "and the next two candidates are combined.")
        rationale = "\n".join(lines)
        analysis = "Trace statistics: " + describe_stats(a)
        text = format_proposal(new, rationale, analysis)
        secs = time.perf_counter() - t0
        self.usage["calls"] += 1
        self.usage["seconds"] += secs
        transcript = [{"role": "critic", "kind": "heuristic", "attempt": attempt, "feedback": feedback or "",
                       "stats": {k: v for k, v in a.items() if not isinstance(v, dict)},
                       "ranked": [e.id for e, _d, _w in ranked]},
                      {"role": "assistant", "content": text}]
        usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": secs, "kind": "heuristic"}
        return ProposalReply(text=text, rationale=rationale, transcript=transcript, usage=usage,
                             edits=[e.id for e, _d, _w in chosen])

    # ---------------------------------------------------------------- Loop 2

    def judge(self, candidates: list[dict]) -> list[dict]:
        out = []
        for c in candidates:
            if not isinstance(c, dict) or "id" not in c:
                raise ValueError(f"each candidate must be a dict with an 'id', got {str(c)[:200]}")
            decision, reason = judge_one(c)
            out.append({"id": c["id"], "decision": decision, "reason": reason})
        return out


def _op_label(op: dict) -> str:
    args = [str(x) for x in op.get("args") or []]
    shown = args[0] if args else ""
    if op.get("op") in ("SEARCH", "COUNT") and len(args) > 1:
        shown += f" for '{args[1][:40]}'"
    return f"{op.get('op')}({shown})"


def judge_one(c: dict) -> tuple[str, str]:
    """Rule-based decision for one Loop-2 candidate: (accept|reject, specific reason)."""
    phase = str(c.get("phase", "")).upper() or "PHASE"
    turns = c.get("turns") or []
    ops = [op for t in turns for op in (t.get("ops") or []) if op.get("op") not in CONTROL_OPS]
    errors = [t.get("error") for t in turns if t.get("error")]
    if errors:
        return REJECT, f"the {phase} phase hit a model error: {str(errors[0])[:120]}"
    if not ops:
        return REJECT, f"no memory op in this {phase} phase (only {'DONE' if phase == 'LOG' else 'the action'})"
    for i, op in enumerate(ops, 1):
        if not op.get("ok", True):
            return REJECT, f"op {i} {_op_label(op)} failed: {str(op.get('text', ''))[:120]}"
    if int(c.get("redundant_writes") or 0) > 0:
        return REJECT, f"{c['redundant_writes']} write(s) re-recorded content already in memory"
    seen_writes: set[tuple[str, str]] = set()
    for op in ops:
        args = [str(x) for x in op.get("args") or []]
        if op.get("op") not in READ_OPS and op.get("op") != "CREATE" and len(args) > 1:
            key = (args[0], " ".join(args[-1].split()))
            if key in seen_writes:
                return REJECT, f"{_op_label(op)} wrote the same text twice in one phase"
            seen_writes.add(key)
            payload = args[-1]
            if len(payload) > OVERSIZED_WRITE_CHARS or len(payload.splitlines()) > OVERSIZED_WRITE_LINES:
                return REJECT, (f"oversized write: {_op_label(op)} stored {len(payload)} chars in "
                                f"{len(payload.splitlines())} lines; notes should be short")
    empty = int(c.get("empty_searches") or 0)
    empty_ops = [op for op in ops if op.get("op") in READ_OPS and is_empty_result(op)]
    if empty or empty_ops:
        what = _op_label(empty_ops[0]) if empty_ops else f"{empty} search(es)"
        return REJECT, f"empty lookup: {what} found nothing"
    read_since_write: set[str] = set()
    for op in ops:
        args = [str(x) for x in op.get("args") or []]
        fname = args[0] if args else ""
        if op.get("op") == "READ":
            if fname in read_since_write:
                return REJECT, f"READ({fname}) re-read a file already read in this phase with no change in between"
            read_since_write.add(fname)
        elif op.get("op") not in READ_OPS:
            read_since_write.discard(fname)
    writes = [op for op in ops if op.get("op") not in READ_OPS]
    reads = [op for op in ops if op.get("op") in READ_OPS]
    if c.get("phase") == "log":
        if not writes:
            return REJECT, f"LOG only looked things up ({', '.join(map(_op_label, reads[:3]))}) and recorded nothing"
        files = sorted({str((op.get("args") or [''])[0]) for op in writes})
        checked = f" after checking with {_op_label(reads[0])}" if reads else ""
        return ACCEPT, (f"all {len(ops)} op(s) succeeded; recorded new information in {', '.join(files)}{checked}"
                        + _reward_note(c))
    action = next((t.get("committed_action") for t in turns if t.get("committed_action")), None)
    got = ", ".join(map(_op_label, reads[:3]))
    return ACCEPT, (f"retrieved relevant memory ({got}) before committing "
                    f"{repr(action) if action else 'the action'}; all {len(ops)} op(s) succeeded" + _reward_note(c))


def _reward_note(c: dict) -> str:
    r, p = float(c.get("reward") or 0.0), float(c.get("progression_delta") or 0.0)
    if r > 0 or p > 0:
        return f"; the step earned reward {r:g}" + (f" and progression +{p:.3f}" if p > 0 else "")
    return ""
