"""Run health in summary.json: model errors, fallback actions and context overflows, counted from
episodes the real Runner plays (real MemoryAgent, EpisodeTrace, summarize) against a scripted client
that fails on chosen steps, and the warnings drawn from them."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest

from automem_jax.agent.types import Completion
from automem_jax.envs.base import BatchedTextEnv, Obs, StepResult, resolve_action
from automem_jax.memory.structure import MemoryStructure
from automem_jax.rollout.runner import Runner
from automem_jax.rollout.traces import HEALTH_COUNTS, health_warnings, is_context_overflow, summarize

SEED_RE = re.compile(r"seed=(\d+)")
STEPS = 10
CONNECTION_ERROR = "connection error talking to http://model:8000/v1/chat/completions: connection refused"


class Game(BatchedTextEnv):
    """Episodes that never end on their own (the runner stops them at max_steps)."""

    actions = ["Noop", "Move"]
    default_action = "Noop"
    instruction = "A test game: Noop or Move."

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        self.state: list[dict | None] = [None] * num_envs

    def _obs(self, i: int) -> Obs:
        return Obs(f"seed={self.state[i]['seed']} t={self.state[i]['t']}", "nothing to see")

    def reset_batch(self, seeds=None, indices=None):
        sd, idx = self._resolve_indices(seeds, indices)
        for s, i in zip(sd, idx):
            self.state[i] = {"seed": s, "t": 0}
        return [self._obs(i) for i in idx]

    def _step_slots(self, actions):
        out = {}
        for i, a in actions.items():
            _, info = resolve_action(a, set(self.actions), self.default_action)
            self.state[i]["t"] += 1
            out[i] = StepResult(self._obs(i), 0.0, False, False, info)
        return out

    def progression(self, index: int) -> float:
        return 0.0


class ScriptedClient:
    """Fails where told: failures[(seed, phase, step)] is "error", "overflow" or (PLAN) "no_action".
    Otherwise LOG answers without ops and PLAN commits Noop, so every phase takes one turn and the
    n-th PLAN request of an episode is its step n."""

    def __init__(self, failures: dict, overflow_error: str):
        self.failures = failures
        self.overflow_error = overflow_error
        self.plans = Counter()

    def generate(self, requests):
        return [self._answer(r) for r in requests]

    def _answer(self, r) -> Completion:
        seed = int(SEED_RE.search(" ".join(m["content"] for m in r.messages)).group(1))
        step = self.plans[seed]  # LOG of step n comes after the n PLANs of steps 0..n-1
        if r.phase == "plan":
            self.plans[seed] += 1
        kind = self.failures.get((seed, r.phase, step))
        if kind == "error":
            return Completion("", error=CONNECTION_ERROR)
        if kind == "overflow":
            return Completion("", error=self.overflow_error)
        if r.phase == "log":
            return Completion("Nothing new happened.", 20, 3)
        if kind == "no_action":
            return Completion("I am not sure what to do.", 20, 6)
        return Completion("<|ACTION|>Noop<|END|>", 20, 4)


# Task A: seed 1 has two failed PLANs, one overflowing PLAN and one PLAN without an action;
# seed 2 has a failed LOG (the PLAN that follows still acts) and an overflowing PLAN. Task B is clean.
FAILURES = {(1, "plan", 2): "error", (1, "plan", 5): "error", (1, "plan", 7): "overflow",
            (1, "plan", 3): "no_action", (2, "log", 4): "error", (2, "plan", 1): "overflow"}
TURNS_PER_EPISODE = STEPS + (STEPS - 1)  # one PLAN turn per step, one LOG turn per step after the first
EXPECTED_A = {"steps": 2 * STEPS, "model_turns": 2 * TURNS_PER_EPISODE, "model_errors": 5,
              "fallback_actions": 5, "context_overflows": 2}
EXPECTED_B = {"steps": STEPS, "model_turns": TURNS_PER_EPISODE, "model_errors": 0, "fallback_actions": 0,
              "context_overflows": 0}


@pytest.fixture(scope="module")
def engine_overflow_error() -> str:
    """What this project's engine answers to a prompt longer than its context."""
    from automem_jax.llm.engine import Engine
    from automem_jax.llm.sampling import SamplingParams
    from automem_jax.models import qwen, qwen_presets
    # The length check comes before any compute, so shape-only weights will do (no init cost).
    model = qwen.abstract_model(qwen_presets.preset("tiny", vocab_size=256, num_layers=1))
    out = Engine(model, None, max_batch=1, max_len=16).generate_ids([[1] * 40], [SamplingParams(max_tokens=4)])[0]
    assert out.finish_reason == "error" and out.error
    return out.error


@pytest.fixture
def game(monkeypatch):
    import automem_jax.envs as envs
    monkeypatch.setattr(envs, "make", lambda name, num_envs=None, **kw: Game(num_envs))


def _play(run_dir, overflow_error) -> list[dict]:
    """Episodes of tasks game:A (seeds 1, 2) and game:B (seed 3), as the runner wrote them."""
    client = ScriptedClient(FAILURES, overflow_error)
    episodes = []
    for name, seeds in (("game:A", [1, 2]), ("game:B", [3])):
        runner = Runner(client, MemoryStructure.default("crafter"), str(run_dir), name, num_envs=2,
                        max_steps=STEPS, progress=False, mode="tick")
        runner.run(seeds)
        episodes += runner.episodes
    return episodes


def _rates(c: dict) -> dict:
    return {"model_error_rate": c["model_errors"] / c["model_turns"],
            "fallback_rate": c["fallback_actions"] / c["steps"],
            "context_overflow_rate": c["context_overflows"] / c["model_turns"]}


def test_engine_refusal_and_server_wordings_count_as_context_overflows(engine_overflow_error):
    assert is_context_overflow(engine_overflow_error)
    relayed = f"HTTP 400 from http://h:8000/v1/chat/completions: the engine rejected this request: {engine_overflow_error}"
    assert is_context_overflow(relayed)
    for text in ("HTTP 400 from http://h/v1/chat/completions: This model's maximum context length is 4096 tokens. "
                 "However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).",
                 "HTTP 400 from http://h/v1: The decoder prompt (length 5000) is longer than the maximum model "
                 "length of 4096.",
                 "HTTP 400 from http://h/v1: Input prompt (5000 tokens) is too long and exceeds limit of 4096",
                 "HTTP 400 from https://api.openai.com/v1: context_length_exceeded"):
        assert is_context_overflow(text), text
    for text in (None, "", CONNECTION_ERROR, "timed out after 30s waiting for http://h/v1/chat/completions",
                 "engine: RuntimeError: boom", "max_tokens must be >= 1, got 0", "empty prompt",
                 "no completion was sent to the agent", "prompt has token ids outside the vocabulary [0, 256)"):
        assert not is_context_overflow(text), text


def test_summary_counts_model_errors_fallbacks_and_overflows(tmp_path, game, engine_overflow_error):
    episodes = _play(tmp_path / "run", engine_overflow_error)
    s = summarize(episodes)
    assert health_warnings(summarize([e for e in episodes if e["task"] == "B"])) == []
    a = s["environments"]["game"]["A"]["health"]
    b = s["environments"]["game"]["B"]["health"]
    assert {k: a[k] for k in HEALTH_COUNTS} == EXPECTED_A
    assert {k: b[k] for k in HEALTH_COUNTS} == EXPECTED_B
    assert {k: a[k] for k in _rates(EXPECTED_A)} == _rates(EXPECTED_A)
    assert (b["model_error_rate"], b["fallback_rate"], b["context_overflow_rate"]) == (0.0, 0.0, 0.0)
    assert (a["episodes"], a["episodes_without_health"]) == (2, 0)
    assert a["error_examples"] == [CONNECTION_ERROR, engine_overflow_error]  # distinct, in episode order
    total = {k: EXPECTED_A[k] + EXPECTED_B[k] for k in HEALTH_COUNTS}
    assert {k: s["health"][k] for k in HEALTH_COUNTS} == total
    assert {k: s["health"][k] for k in _rates(total)} == _rates(total)
    # The episode file carries the counts (summary.json is rebuilt from these on resume).
    ep = json.load(open(os.path.join(tmp_path, "run", "traces", "game", "A", "ep_0.json")))
    assert {k: ep["health"][k] for k in HEALTH_COUNTS} == {"steps": STEPS, "model_turns": TURNS_PER_EPISODE,
                                                           "model_errors": 3, "fallback_actions": 4,
                                                           "context_overflows": 1}
    # The runner's own summary.json (last written: task B) has them too.
    written = json.load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert written["health"]["steps"] == STEPS and written["health"]["model_errors"] == 0


def test_health_warnings_name_task_rate_count_and_cause(tmp_path, game, engine_overflow_error):
    s = summarize(_play(tmp_path / "run", engine_overflow_error))
    lines = health_warnings(s, label="eval/baseline")
    # Task A: errors 5/38 = 13.2%, overflows 2/38 = 5.3%, fallbacks 5/20 = 25%, all above 5%; B is clean.
    assert len(lines) == 3 and all(ln.startswith("eval/baseline: game/A: ") for ln in lines)
    overflow, errors, fallback = lines
    assert "context overflows in 5.3% of model turns (2 of 38)" in overflow and "inference.max_len" in overflow
    assert "model errors in 13.2% of model turns (5 of 38, 2 of them context overflows)" in errors
    assert f"e.g. {CONNECTION_ERROR!r}" in errors
    assert "fallback actions on 25.0% of steps (5 of 20)" in fallback and "fallback action" in fallback
    # A higher threshold keeps only the rates above it; none for a clean summary.
    high = health_warnings(s, 0.2)
    assert len(high) == 1 and high[0].startswith("game/A: fallback actions on 25.0% of steps")
    assert health_warnings(s, 0.25) == []  # "above", not "at"


def test_episode_files_without_health_are_left_out(tmp_path, game, engine_overflow_error):
    episodes = _play(tmp_path / "run", engine_overflow_error)
    old = [{k: v for k, v in e.items() if k != "health"} for e in episodes]
    # Seed 2 (task A) written before health was recorded: A counts seed 1 alone.
    mixed = [o if e["seed"] == 2 else e for e, o in zip(episodes, old)]
    a = summarize(mixed)["environments"]["game"]["A"]["health"]
    assert (a["episodes"], a["episodes_without_health"], a["steps"], a["model_errors"], a["context_overflows"],
            a["fallback_actions"]) == (1, 1, STEPS, 3, 1, 4)
    # Nothing recorded: no rates (not zero rates) and no warnings.
    s = summarize(old)
    assert s["environments"]["game"]["A"]["progression"] == 0.0
    for h in (s["health"], s["environments"]["game"]["A"]["health"]):
        assert h["steps"] == 0 and h["episodes"] == 0 and h["episodes_without_health"] > 0
        assert h["model_error_rate"] is h["fallback_rate"] is h["context_overflow_rate"] is None
    assert health_warnings(s) == []
