"""The runner's async schedule against a scripted client whose reply latencies are counted in
scheduler steps (no wall clock), a scripted batched env, and the real tiny engine."""

from __future__ import annotations

import os
import re
import zlib
from concurrent.futures import Future

import pytest

from automem_jax.agent.types import Completion
from automem_jax.envs.base import BatchedTextEnv, Obs, StepResult, resolve_action
from automem_jax.memory.structure import MemoryStructure
from automem_jax.rollout.runner import Runner

ACTIONS = ["Noop", "Move Left", "Move Right"]
SEED_RE = re.compile(r"seed=(\d+)")


class ScriptedBatch(BatchedTextEnv):
    """A deterministic game: the observation names the seed, the step and a position; an episode
    of seed s ends after length(s) steps (None: never). Logs every step_batch call with the
    client's virtual clock."""

    actions = ACTIONS
    default_action = "Noop"
    instruction = "A scripted test game: move left or right."

    def __init__(self, num_envs: int, clock=None, length=None):
        self.num_envs = num_envs
        self.clock = clock
        self.length = length
        self.state: list[dict | None] = [None] * num_envs
        self.calls: list[tuple[int, list[int]]] = []  # (virtual time, slots stepped)

    def _obs(self, i: int) -> Obs:
        st = self.state[i]
        return Obs(f"seed={st['seed']} t={st['t']} x={st['x']}", f"position {st['x']}")

    def reset_batch(self, seeds=None, indices=None):
        sd, idx = self._resolve_indices(seeds, indices)
        for s, i in zip(sd, idx):
            self.state[i] = {"seed": s, "t": 0, "x": 0}
        return [self._obs(i) for i in idx]

    def _step_slots(self, actions):
        self.calls.append((self.clock.clock if self.clock else 0, sorted(actions)))
        out = {}
        for i, a in actions.items():
            a, info = resolve_action(a, set(self.actions), self.default_action)
            st = self.state[i]
            st["t"] += 1
            st["x"] += {"Move Left": -1, "Move Right": 1}.get(a, 0)
            end = self.length is not None and st["t"] >= self.length(st["seed"])
            out[i] = StepResult(self._obs(i), float(st["x"] > 0), end, False, info)
        return out

    def progression(self, index: int) -> float:
        return min(1.0, abs(self.state[index]["x"]) / 5)


def reply(r) -> str:
    """A function of the request alone."""
    turn = (len(r.messages) - 1) // 2
    h = zlib.crc32(r.messages[-1]["content"].encode())
    if r.phase == "log":
        return f"<|APPEND|>actions_log.txt|note {h % 7}<|END|>" if turn == 0 else "<|DONE|>"
    return "<|SEARCH|>actions_log.txt|note<|END|>" if turn == 0 else f"<|ACTION|>{ACTIONS[h % 3]}<|END|>"


class StepClient:
    """submit/drive with a virtual clock: a request from the episode of seed s is answered
    latency(s) steps after it was submitted; `drive` advances the clock one step at a time until
    one of the pending futures is done. `generate` (tick mode) answers a batch after the longest
    latency in it. Replies come from `reply(request)`."""

    def __init__(self, latency, fail=None):
        self.latency = latency
        self.fail = fail or (lambda r: False)
        self.clock = 0
        self.inflight: list[tuple[int, Future, object]] = []
        self.submitted: list[str] = []
        self.drive_calls = 0

    def _latency(self, r) -> int:
        m = SEED_RE.search(" ".join(m["content"] for m in r.messages))
        return self.latency(int(m.group(1)) if m else -1)

    def _answer(self, r) -> Completion:
        return Completion(reply(r), tokens_in=len(r.messages[-1]["content"]) // 4, tokens_out=5, model_id="scripted")

    def generate(self, requests):
        self.clock += max(self._latency(r) for r in requests)
        return [self._answer(r) for r in requests]

    def submit(self, r) -> Future:
        f: Future = Future()
        self.submitted.append(r.messages[-1]["content"])
        self.inflight.append((self.clock + self._latency(r), f, r))
        return f

    def drive(self, pending, timeout=None):
        self.drive_calls += 1
        while not any(f.done() for f in pending):
            self.clock += 1
            for item in [x for x in self.inflight if x[0] <= self.clock]:
                self.inflight.remove(item)
                _, f, r = item
                if self.fail(r):
                    f.set_exception(RuntimeError("back end fell over"))
                else:
                    f.set_result(self._answer(r))


@pytest.fixture
def scripted_env(monkeypatch):
    """`make` builds ScriptedBatch; yields the list of envs built."""
    import automem_jax.envs as envs
    built = []

    def make(name, num_envs=None, **kw):
        assert name == "scripted"
        built.append(ScriptedBatch(num_envs, **kw))
        return built[-1]

    monkeypatch.setattr(envs, "make", make)
    return built


STRUCTURE = MemoryStructure.default("crafter")


def _run(tmp, client, mode, seeds, *, num_envs, max_steps, length=None, clock=True):
    runner = Runner(client, STRUCTURE, str(tmp), "scripted", num_envs=num_envs, max_steps=max_steps, progress=False,
                    mode=mode, env_kwargs={"clock": client if clock else None, "length": length})
    return runner, runner.run(seeds)


def _traces(run_dir) -> dict[str, str]:
    d = os.path.join(run_dir, "traces", "scripted", "scripted")
    return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d))}


def test_default_mode_follows_the_client(tmp_path):
    from automem_jax.loops.teacher import TeacherClient
    assert Runner(StepClient(lambda s: 1), STRUCTURE, str(tmp_path), "craftax").mode == "async"
    assert Runner(TeacherClient(), STRUCTURE, str(tmp_path), "craftax").mode == "tick"
    with pytest.raises(ValueError, match="mode must be one of async, tick"):
        Runner(TeacherClient(), STRUCTURE, str(tmp_path), "craftax", mode="lockstep")
    # A cap on requests per generate call is a tick-mode knob.
    assert Runner(StepClient(lambda s: 1), STRUCTURE, str(tmp_path), "craftax", max_requests_per_call=1).mode == "tick"
    with pytest.raises(ValueError, match="max_requests_per_call"):
        Runner(StepClient(lambda s: 1), STRUCTURE, str(tmp_path), "craftax", mode="async", max_requests_per_call=2)


def test_async_agent_with_short_replies_runs_ahead_of_a_long_reply(tmp_path, scripted_env):
    """Seed 10 answers in 12 steps, seed 11 in 1. Async: the fast episode plays all its 6 env steps
    while the slow agent waits for its first replies. Tick: every tick waits for the slowest reply,
    so the two agents move in lockstep."""
    latency = {10: 12, 11: 1}.get
    steps_of, fast_done_at = {}, {}
    for mode in ("async", "tick"):
        client = StepClient(latency)
        runner, summary = _run(tmp_path / mode, client, mode, [10, 11], num_envs=2, max_steps=6)
        env = scripted_env[-1]
        first_slow = next(i for i, (_, slots) in enumerate(env.calls) if 0 in slots)
        steps_of[mode] = sum(1 in slots for _, slots in env.calls[:first_slow + 1])
        fast_done_at[mode] = [t for t, slots in env.calls if 1 in slots][-1]
        assert summary["environments"]["scripted"]["scripted"]["steps"] == 12
        assert runner.stats.mode == mode and runner.stats.agent_steps == 12
        if mode == "async":
            # Drive calls, not one generate per tick; the fast agent's steps went out alone.
            assert runner.stats.generate_calls == client.drive_calls > 0
            assert all(slots == [1] for _, slots in env.calls[:6])
        else:
            assert all(slots == [0, 1] for _, slots in env.calls)
    assert steps_of["async"] == 6 and steps_of["tick"] == 1
    # Virtual time at the fast episode's last step: 2 PLAN turns, then 4 turns per step, 1 step
    # each (async), against 12 per turn while the slow agent holds every tick.
    assert fast_done_at["async"] == 2 + 5 * 4
    assert fast_done_at["tick"] == 12 * (2 + 5 * 4)


def test_both_modes_write_identical_traces(tmp_path, scripted_env):
    """Replies are a function of the request, so the schedule must not show in the traces: five
    episodes of different lengths and latencies on 3 slots (restarts land on different slots in
    the two modes), byte-identical JSONL and episode JSON, same summary."""
    latency = lambda s: 1 + (s * 7) % 5  # noqa: E731
    length = lambda s: 2 + s % 4  # noqa: E731
    seeds = [3, 4, 5, 6, 7]
    out = {}
    for mode in ("tick", "async", "async2"):
        client = StepClient(latency)
        runner, summary = _run(tmp_path / mode, client, mode.rstrip("2"), seeds, num_envs=3, max_steps=4,
                               length=length)
        out[mode] = (_traces(tmp_path / mode), summary, client.submitted, scripted_env[-1].calls)
    assert len(out["tick"][0]) == 10
    assert out["async"][0] == out["tick"][0]
    strip = lambda s: {k: v for k, v in s.items() if k != "run"}  # noqa: E731
    assert strip(out["async"][1]) == strip(out["tick"][1])
    assert out["async"][1]["run"]["mode"] == "async" and out["tick"][1]["run"]["mode"] == "tick"
    # The async schedule itself is deterministic: same submissions in the same order, same env calls.
    assert out["async2"][2] == out["async"][2] and out["async2"][3] == out["async"][3]
    assert out["async2"][0] == out["async"][0]


def test_equal_latencies_keep_env_steps_batched(tmp_path, scripted_env):
    """Agents whose replies arrive in the same drive step commit together: one batched env call for
    all slots, as in tick mode."""
    client = StepClient(lambda s: 3)
    runner, _ = _run(tmp_path, client, "async", [1, 2, 3, 4], num_envs=4, max_steps=3)
    assert [slots for _, slots in scripted_env[-1].calls] == [[0, 1, 2, 3]] * 3
    assert runner.stats.env_calls == 3 and runner.stats.env_steps == 12 and runner.stats.max_in_flight == 4


def test_failed_requests_become_error_completions(tmp_path, scripted_env):
    """A future that raises (and a submit that raises) reaches the agent as an error Completion:
    the phase ends, the fallback action is taken, the run goes on."""

    class Raising(StepClient):
        def submit(self, r):
            if r.phase == "log":
                raise ConnectionError("submit exploded")
            return super().submit(r)

    client = Raising(lambda s: 1, fail=lambda r: (len(r.messages) - 1) // 2 == 1)
    runner, summary = _run(tmp_path, client, "async", [5, 6], num_envs=2, max_steps=3)
    assert summary["environments"]["scripted"]["scripted"]["steps"] == 6
    lines = [ln for text in _traces(tmp_path).values() for ln in text.splitlines() if ln.startswith("{\"")]
    import json
    steps = [json.loads(ln) for ln in lines if "\"plan\"" in ln]
    assert steps and all(s["plan"]["turns"][-1]["error"] for s in steps)
    assert any("submit exploded" in (t.get("error") or "") for s in steps for t in s["log"]["turns"])


def test_async_with_a_generate_only_client(tmp_path, scripted_env):
    """mode="async" with a client that only has `generate`: each request alone, answered at once."""

    class GenerateOnly:
        def __init__(self):
            self.batches = []

        def generate(self, requests):
            self.batches.append(len(requests))
            return [Completion(reply(r), 3, 2) for r in requests]

    c = GenerateOnly()
    runner, summary = _run(tmp_path, c, "async", [1, 2], num_envs=2, max_steps=2, clock=False)
    assert summary["episodes"] == 2 and set(c.batches) == {1}
    assert runner.stats.generate_calls == 0 and runner.stats.requests == len(c.batches)


# ---- the real tiny engine --------------------------------------------------------------------

@pytest.mark.slow
def test_engine_client_async_and_tick_agree_on_craftax(tmp_path):
    """EngineClient over the tiny engine, greedy, one sampling seed: the async schedule (drive steps
    the engine on this thread) writes the same Craftax traces as one generate call per tick."""
    from automem_jax.llm.client import EngineClient
    from automem_jax.llm.engine import Engine
    engine = Engine.from_preset("tiny", max_batch=8, max_len=2048, seed=0)
    client = EngineClient(engine, temperature=0, max_tokens=6, seed=1)
    structure = MemoryStructure.default("crafter_tiny")
    traces, stats = {}, {}
    for mode in ("async", "tick"):
        runner = Runner(client, structure, str(tmp_path / mode), "craftax", num_envs=3, max_steps=3,
                        progress=False, mode=mode)
        summary = runner.run([1, 2, 3, 4])
        assert summary["episodes"] == 4
        d = tmp_path / mode / "traces" / "craftax" / "Craftax-Classic"
        traces[mode] = {f.name: f.read_text() for f in sorted(d.iterdir())}
        stats[mode] = summary["run"]
    assert stats["async"]["mode"] == "async" and stats["async"]["generate_calls"] > 0
    assert not engine.has_work
    assert traces["async"] == traces["tick"]
