"""Loop 1 (structure revision): a scripted critic over real HTTP on 127.0.0.1, real Crafter rollouts
played by the scripted teacher, the archive and its resume, the acceptance rules, the offline critic.

Why "better" and "worse" are real here: the teacher looks its notes up in PLAN before it commits an
action (two turns). A structure with ``budgets.plan_turns: 1`` ends every PLAN after the lookup, so
the agent plays the fallback action ``Noop`` and unlocks nothing; restoring the budget lets the
teacher act and unlock achievements; crippling it again loses them. Crafter (the original game) is
used instead of Craftax because it needs no JAX compile, so an evaluation takes seconds.
"""
import copy
import json
import os
import uuid

import pytest
import yaml

from automem_jax.critic import CriticClient, HeuristicCritic, LLMCritic, ProposalReply, format_proposal
from automem_jax.loops.loop1_structure import (Loop1Config, continuation_feedback, decide, metric_of, paired_bootstrap,
                                         run_loop1, runner_evaluator)
from automem_jax.loops.teacher import TeacherClient
from automem_jax.memory.structure import MemoryStructure
from tests.critic_server import ScriptedCriticServer

SEEDS = [1, 2]
STEPS = 25


def _files_containing(root, needle: str) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                if needle.encode() in fh.read():
                    hits.append(p)
    return hits


def _doc(plan_turns: int, base: dict | None = None, **budgets) -> dict:
    doc = copy.deepcopy(base) if base is not None else MemoryStructure.default("crafter_tiny").to_dict()
    doc["budgets"]["plan_turns"] = plan_turns
    doc["budgets"].update(budgets)
    return doc


class _CountingEval:
    """The real evaluation (Runner + teacher on Crafter), counting calls and remembering run dirs."""

    def __init__(self):
        self.inner = runner_evaluator(TeacherClient(seed=0, redundant_write_rate=0.0, useless_read_rate=0.0),
                                      "crafter", SEEDS, num_envs=2, max_steps=STEPS, progress=False)
        self.calls: list[str] = []

    def __call__(self, structure, run_dir):
        self.calls.append(run_dir)
        return self.inner(structure, run_dir)


def _user_text(body: dict) -> str:
    return "\n".join(m.get("content") or "" for m in body["messages"] if m.get("role") == "user")


def _tool_results(body: dict) -> list[str]:
    return [m.get("content") or "" for m in body["messages"] if m.get("role") == "tool"]


# ---------------------------------------------------------------------------- end to end over HTTP

def test_loop1_end_to_end_scripted_critic_over_http_then_resume(tmp_path, monkeypatch):
    key_env = "AUTOMEM_LOOP1_TEST_KEY_" + uuid.uuid4().hex[:8].upper()
    secret = "sk-loop1-" + uuid.uuid4().hex
    monkeypatch.setenv(key_env, secret)
    start = MemoryStructure(_doc(1))  # crippled: the teacher never gets to commit an action
    restored = _doc(4, start.to_dict())
    invalid = _doc(0, restored)  # budgets.plan_turns must be 1..100
    worse = _doc(1, restored)
    neutral = _doc(4, restored, gameplay_turns=3)  # two-model only: no effect on this single-model run
    replies = [
        # r1a1: browse the baseline's run, then restore the PLAN budget -> better -> accepted (v1).
        [{"name": "run_summary", "arguments": {}}],
        format_proposal(restored, "Restore budgets.plan_turns to 4: every PLAN ends after its lookup."),
        # r2a1: an invalid field, fed back once; the second answer has no document -> invalid, no eval.
        "Here it is:\n```yaml\n" + yaml.safe_dump(invalid, sort_keys=False) + "```\nRationale:\nfewer turns",
        "Sorry, I would rather explain in words than write a document.",
        # r2a2: cripple the budget again -> worse -> rejected; its continuation browses the failed run
        # and proposes a change with no effect -> equal, which the strict rule rejects.
        format_proposal(worse, "Cut budgets.plan_turns to 1 to act sooner."),
        [{"name": "run_summary", "arguments": {}}],
        format_proposal(neutral, "Give the gameplay phase a third turn."),
    ]
    cfg = Loop1Config(revisions=2, fresh_attempts=2, continuation_retries=1, invalid_feedback_rounds=1)
    workdir = str(tmp_path / "work")
    ev = _CountingEval()
    logs: list[str] = []
    with ScriptedCriticServer(replies) as srv:
        critic = LLMCritic(CriticClient(srv.base_url, "scripted", api_key_env=key_env, timeout_s=60, max_retries=0),
                           repair_rounds=0, max_turns=4)
        res = run_loop1(critic=critic, start=start, evaluate=ev, workdir=workdir, cfg=cfg, log=logs.append)
        requests = list(srv.requests)
        assert srv.served == len(replies)
        assert set(srv.auth_headers) == {f"Bearer {secret}"}  # the key was sent ...

    rows = {r["id"]: r for r in res.archive}
    assert [r["id"] for r in res.archive] == ["v0", "r1a1", "r2a1", "r2a2", "r2a2c1"]
    assert [r["status"] for r in res.archive] == ["accepted", "accepted", "invalid", "rejected", "rejected"]
    base, good, bad, worse_row, cont = (rows[i] for i in ("v0", "r1a1", "r2a1", "r2a2", "r2a2c1"))
    assert len(ev.calls) == 4  # baseline, r1a1, r2a2, r2a2c1: the invalid reply is never evaluated

    # Better: accepted as v1, the new best.
    assert good["metric"]["average_progress"] > base["metric"]["average_progress"]
    assert good["version"] == 1 and good["kind"] == "fresh" and good["parent_version"] == 0
    assert any("budgets.plan_turns" in ln for ln in good["diff"])
    assert set(good["metric"]["per_seed"]) == {"1", "2"}
    assert good["usage"]["prompt_tokens"] > 0 and good["rationale"].startswith("Restore")
    assert res.best_version == 1 and res.best.budgets["plan_turns"] == 4 and res.best.doc["parent"] == start.label
    assert res.best_metric == good["metric"]
    # Its session browsed the baseline's run folder.
    summary_seen = json.loads(_tool_results(requests[1])[0])
    assert summary_seen["run"]["structure"] == start.label
    assert summary_seen["average_progress"] == base["metric"]["average_progress"]

    # Invalid: the error went back to the critic once, then the attempt was archived without an eval.
    assert bad["feedback_rounds"] == 1 and "budgets.plan_turns" in bad["invalid_errors"][0]
    assert "budgets.plan_turns" in _user_text(requests[3]) and "NOT evaluated" in _user_text(requests[3])
    assert "no ```yaml block" in bad["error"] and bad["metric"] is None and bad["run_dir"] is None

    # Worse: rejected, and the continuation was told why and browsed the failed run.
    assert worse_row["metric"]["average_progress"] < good["metric"]["average_progress"]
    assert worse_row["best_metric_before"]["average_progress"] == good["metric"]["average_progress"]
    assert worse_row["version"] is None and "<=" in worse_row["decision_reason"]
    assert worse_row["diff"] == ["~ budgets.plan_turns: 4 -> 1"]  # the loop's own version/parent are left out
    fb = _user_text(requests[5])
    assert "Candidate r2a2" in fb and "seed 1:" in fb and "Cut budgets.plan_turns" in fb
    assert "budgets.plan_turns: 4 -> 1" in fb
    failed_summary = json.loads(_tool_results(requests[6])[0])
    assert failed_summary["run"]["structure"] == "crafter-tiny-v0@v2"  # the failed candidate's run
    assert cont["kind"] == "continuation" and cont["based_on"] == "r2a2" and cont["attempt"] == 2
    # Equal is not better under the strict rule.
    assert cont["metric"]["average_progress"] == good["metric"]["average_progress"]
    assert "<=" in cont["decision_reason"]
    assert [h["accepted"] for h in res.history] == ["r1a1", None]

    # Workdir layout.
    sdir = tmp_path / "work" / "structures"
    assert MemoryStructure.load(sdir / "v1.yaml") == res.best and not (sdir / "v2.yaml").exists()
    assert MemoryStructure.load(sdir / "v0.yaml") == start
    for name in ("structure.yaml", "reply.txt", "transcript.json", "rationale.md", "proposal.json",
                 "eval/summary.json"):
        assert (sdir / "candidates" / "r1a1" / name).is_file(), name
    assert (sdir / "candidates" / "r2a1" / "reply.txt").read_text().startswith("Sorry")
    assert len(json.loads((sdir / "candidates" / "r2a1" / "transcript.json").read_text())) == 2
    assert not (sdir / "candidates" / "r2a1" / "eval").exists()
    assert (sdir / "candidates" / "r2a2c1" / "feedback.md").read_text().startswith("Candidate r2a2")
    best = json.loads((sdir / "best.json").read_text())
    assert best["version"] == 1 and best["id"] == "r1a1" and best["metric"] == good["metric"]
    assert len((sdir / "archive.jsonl").read_text().splitlines()) == 5

    # ... and never written anywhere.
    assert _files_containing(tmp_path, secret) == []
    assert not any(secret in line for line in logs)

    # Resume: the same call replays the archive: no critic request, no evaluation, the same result.
    ev2 = _CountingEval()
    with ScriptedCriticServer([]) as srv2:
        critic2 = LLMCritic(CriticClient(srv2.base_url, "scripted", api_key_env=key_env, max_retries=0),
                            repair_rounds=0)
        res2 = run_loop1(critic=critic2, start=start, evaluate=ev2, workdir=workdir, cfg=cfg, log=logs.append)
        assert srv2.requests == []
    assert ev2.calls == []
    assert res2.archive == res.archive and res2.history == res.history
    assert res2.best == res.best and res2.best_version == 1 and res2.best_metric == res.best_metric


def test_heuristic_critic_one_revision_end_to_end(tmp_path):
    """The offline critic reads the crippled run's traces, raises the PLAN budget, and it is kept."""
    start = MemoryStructure(_doc(1))
    ev = _CountingEval()
    res = run_loop1(critic=HeuristicCritic(seed=0), start=start, evaluate=ev, workdir=str(tmp_path / "w"),
                    cfg=Loop1Config(revisions=1, fresh_attempts=1, continuation_retries=1), log=lambda m: None)
    row = res.archive[1]
    assert row["id"] == "r1a1" and row["status"] == "accepted" and row["edits"] == ["plan_budget"]
    assert "[edit: plan_budget]" in row["rationale"]
    assert res.best.budgets["plan_turns"] > 1 and res.best_version == 1
    assert res.best_metric["average_progress"] > res.archive[0]["metric"]["average_progress"]
    assert len(ev.calls) == 2


# ---------------------------------------------------------------------------- fast, synthetic evaluations

class _ListCritic:
    """A Critic that returns prepared replies (text, or an exception to raise) and records its calls."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[dict] = []

    def propose(self, structure, tools, feedback=None, attempt=None):
        self.calls.append({"structure": structure, "tools": tools, "feedback": feedback, "attempt": attempt})
        item = self.replies.pop(0)
        if isinstance(item, BaseException):
            raise item
        return ProposalReply(text=item, rationale="", transcript=[{"role": "assistant", "content": item}],
                             usage={"calls": 1, "prompt_tokens": 10, "completion_tokens": 5})

    def judge(self, candidates):
        return []


def _synthetic_eval(progress_by_turns, interrupt_once=None):
    """evaluate() whose result depends on budgets.plan_turns (no rollouts); per-seed results included."""
    calls = []

    def evaluate(structure, run_dir):
        calls.append(run_dir)
        if interrupt_once is not None and interrupt_once in run_dir and calls.count(run_dir) == 1:
            raise KeyboardInterrupt  # a killed process: nothing is archived
        p = progress_by_turns[structure.budgets["plan_turns"]]
        return {"average_progress": 100 * p, "standard_error": 0.0, "episodes": 2,
                "per_seed": {"1": p, "2": p}}

    evaluate.calls = calls
    return evaluate


def test_critic_error_is_archived_and_the_loop_goes_on(tmp_path):
    start = MemoryStructure(_doc(1))
    critic = _ListCritic([RuntimeError("endpoint down"), format_proposal(_doc(3, start.to_dict()), "more turns")])
    ev = _synthetic_eval({1: 0.0, 3: 0.2})
    res = run_loop1(critic=critic, start=start, evaluate=ev, workdir=str(tmp_path),
                    cfg=Loop1Config(revisions=1, fresh_attempts=2), log=lambda m: None)
    assert [(r["id"], r["status"]) for r in res.archive] == [("v0", "accepted"), ("r1a1", "error"),
                                                             ("r1a2", "accepted")]
    assert "endpoint down" in res.archive[1]["error"]
    assert [c["attempt"] for c in critic.calls] == [0, 1]
    assert res.best_version == 1 and res.best.version == 1 and res.best.doc["parent"] == start.label


def test_interrupted_evaluation_resumes_without_a_new_critic_call(tmp_path):
    start = MemoryStructure(_doc(1))
    proposal = format_proposal(_doc(3, start.to_dict()), "more turns")
    ev = _synthetic_eval({1: 0.0, 3: 0.2}, interrupt_once="r1a1")
    critic = _ListCritic([proposal])
    cfg = Loop1Config(revisions=1, fresh_attempts=1)
    with pytest.raises(KeyboardInterrupt):
        run_loop1(critic=critic, start=start, evaluate=ev, workdir=str(tmp_path), cfg=cfg, log=lambda m: None)
    critic2 = _ListCritic([])
    res = run_loop1(critic=critic2, start=start, evaluate=ev, workdir=str(tmp_path), cfg=cfg, log=lambda m: None)
    assert critic2.calls == []
    assert [r["status"] for r in res.archive] == ["accepted", "accepted"]
    assert ev.calls[1] == ev.calls[2] and ev.calls[2].endswith(os.path.join("r1a1", "eval"))  # same run dir
    # A different start in the same workdir is refused rather than mixed in.
    with pytest.raises(ValueError, match="different start structure"):
        run_loop1(critic=critic2, start=MemoryStructure(_doc(2)), evaluate=ev, workdir=str(tmp_path), cfg=cfg,
                  log=lambda m: None)


def test_unchanged_and_wrong_env_proposals_are_invalid_and_continuations_see_the_failure(tmp_path):
    start = MemoryStructure(_doc(2))
    same = start.to_dict()
    same["notes"] = "reworded notes only"
    other_env = MemoryStructure.default("minihack").to_dict()
    worse = _doc(1, start.to_dict())
    critic = _ListCritic([format_proposal(same, "x"), format_proposal(other_env, "y"),
                          format_proposal(worse, "fewer turns [edit: plan_budget]"),
                          format_proposal(_doc(3, start.to_dict()), "more turns")])
    ev = _synthetic_eval({1: 0.0, 2: 0.1, 3: 0.2})
    res = run_loop1(critic=critic, start=start, evaluate=ev, workdir=str(tmp_path),
                    cfg=Loop1Config(revisions=1, fresh_attempts=2), log=lambda m: None)
    assert [(r["id"], r["status"]) for r in res.archive] == [
        ("v0", "accepted"), ("r1a1", "invalid"), ("r1a2", "rejected"), ("r1a2c1", "accepted")]
    assert "no change" in res.archive[1]["invalid_errors"][0] and "env" in res.archive[1]["error"]
    cont_call = critic.calls[3]
    assert cont_call["structure"] == start  # continuations revise the current best ...
    assert cont_call["tools"].run_dir == res.archive[2]["run_dir"]  # ... looking at the failed run
    assert "[edit: plan_budget]" in cont_call["feedback"] and "10.0% -> 0.0%" in cont_call["feedback"]


def test_workdir_on_gcs(gcs_emulator):
    start = MemoryStructure(_doc(1))
    critic = _ListCritic([format_proposal(_doc(3, start.to_dict()), "more turns")])
    workdir = f"{gcs_emulator}/loop1-{uuid.uuid4().hex[:6]}"
    res = run_loop1(critic=critic, start=start, evaluate=_synthetic_eval({1: 0.0, 3: 0.2}), workdir=workdir,
                    cfg=Loop1Config(revisions=1, fresh_attempts=1), log=lambda m: None)
    from automem_jax import storage
    rows = [json.loads(x) for x in storage.read_text(f"{workdir}/structures/archive.jsonl").splitlines()]
    assert [r["status"] for r in rows] == ["accepted", "accepted"] and res.best_version == 1
    assert MemoryStructure.from_text(storage.read_text(f"{workdir}/structures/v1.yaml")) == res.best
    assert json.loads(storage.read_text(f"{workdir}/structures/best.json"))["version"] == 1
    res2 = run_loop1(critic=_ListCritic([]), start=start, evaluate=_synthetic_eval({}), workdir=workdir,
                     cfg=Loop1Config(revisions=1, fresh_attempts=1), log=lambda m: None)
    assert res2.archive == res.archive


# ---------------------------------------------------------------------------- acceptance rules

def _m(per_seed: dict) -> dict:
    vals = list(per_seed.values())
    return {"average_progress": 100 * sum(vals) / len(vals), "standard_error": 0.0, "per_seed": per_seed}


def test_strict_rule():
    cfg = Loop1Config()
    best = _m({"1": 0.2, "2": 0.2})
    assert decide(best, _m({"1": 0.25, "2": 0.2}), cfg).accept
    assert not decide(best, _m({"1": 0.2, "2": 0.2}), cfg).accept  # equal is not better
    assert not decide(best, _m({"1": 0.1, "2": 0.2}), cfg).accept
    assert not decide(best, _m({"1": 0.22, "2": 0.2}), Loop1Config(min_improvement=2.0)).accept  # +1 point < 2


def test_bootstrap_rule_is_paired_seeded_and_deterministic():
    cfg = Loop1Config(accept="bootstrap", bootstrap_samples=4000, bootstrap_seed=7)
    seeds = [str(s) for s in range(10)]
    best = _m({s: 0.2 for s in seeds})
    steady = _m({s: 0.25 for s in seeds})  # +5 points on every seed
    d = decide(best, steady, cfg)
    assert d.accept and d.stats["p_improve"] == 1.0 and d.stats["paired_seeds"] == 10
    # One lucky seed lifts the mean, the other nine lose a little: the mean is higher, the evidence weak.
    lucky = _m({s: (0.9 if s == "0" else 0.15) for s in seeds})
    assert lucky["average_progress"] > best["average_progress"]
    assert decide(best, lucky, Loop1Config()).accept  # strict takes it ...
    d1, d2 = decide(best, lucky, cfg), decide(best, lucky, cfg)
    assert not d1.accept and d1.stats["p_improve"] < 0.9  # ... the bootstrap does not
    assert d1.stats == d2.stats and d1.reason == d2.reason
    # Ties never pass; no paired seeds falls back to comparing the means.
    assert not decide(best, best, cfg).accept
    fallback = decide({"average_progress": 10.0}, _m({"1": 0.3}), cfg)
    assert fallback.accept and fallback.stats["rule"] == "strict-fallback"


def test_paired_bootstrap_values():
    assert paired_bootstrap([1.0, 2.0, 3.0]) == 1.0
    assert paired_bootstrap([-1.0, -2.0]) == 0.0
    assert paired_bootstrap([]) == 0.0
    p = paired_bootstrap([5.0, -1.0, -1.0, -1.0], samples=2000, seed=1)
    assert 0.2 < p < 0.8 and p == paired_bootstrap([5.0, -1.0, -1.0, -1.0], samples=2000, seed=1)


def test_config_and_metric_errors_name_the_field():
    with pytest.raises(ValueError, match="accept"):
        Loop1Config(accept="vibes").validate()
    with pytest.raises(ValueError, match="fresh_attempts"):
        Loop1Config(fresh_attempts=0).validate()
    with pytest.raises(ValueError, match="average_progress"):
        metric_of({"episodes": 2}, None)


def test_continuation_feedback_lists_metrics_seeds_diff_and_rationale():
    best = MemoryStructure(_doc(4))
    failed = {"id": "r3a1", "metric": _m({"1": 0.0, "2": 0.1}), "decision_reason": "5.00% <= 20.00% (strict)",
              "diff": ["~ budgets.plan_turns: 4 -> 1"], "rationale": "act sooner [edit: plan_budget]"}
    text = continuation_feedback(best, _m({"1": 0.2, "2": 0.2}), failed)
    for part in ("r3a1", "20.00%", "5.00%", "seed 1: 20.0% -> 0.0% (-20.0)", "budgets.plan_turns: 4 -> 1",
                 "[edit: plan_budget]"):
        assert part in text, part
