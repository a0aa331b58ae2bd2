"""The runner on Craftax with the tiny model: complete traces, a summary, and a clean resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from automem_jax.rollout.traces import HygieneCounter, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = list(range(42, 50))
STEPS = 8  # per episode: two waves of four slots, each long enough to be killed in


def _cmd(run_dir, mode):
    return [sys.executable, "-m", "automem_jax.rollout.runner", "--env", "craftax", "--seeds", "42-49",
            "--run_dir", run_dir, "--num_envs", "4", "--max_steps", str(STEPS), "--max_tokens", "8",
            "--max_batch", "8", "--max_len", "2048", "--no_progress", "--mode", mode]


def _finished(trace_dir):
    return sorted(f for f in os.listdir(trace_dir) if f.endswith(".json")) if os.path.isdir(trace_dir) else []


@pytest.mark.slow
# The default mode only: resuming is the Runner's, not the schedule's (test_runner_async checks that
# both schedules give the same traces), and each run here costs minutes of engine compiles.
@pytest.mark.parametrize("mode", ["async"])
def test_craftax_run_killed_halfway_resumes_without_loss_or_duplicates(tmp_path, mode):
    run_dir = str(tmp_path / "run")
    trace_dir = os.path.join(run_dir, "traces", "craftax", "Craftax-Classic")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(_cmd(run_dir, mode), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 500
    # 4 slots, 8 episodes: kill once the first wave has finished but before the second has.
    def _second_wave_started():
        done = _finished(trace_dir)
        return len(done) >= 4 and any(f.endswith(".jsonl") and f[:-1] not in done for f in os.listdir(trace_dir))

    while time.time() < deadline and not _second_wave_started() and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _finished(trace_dir)
    assert 4 <= len(first) < 8
    partial = [f for f in os.listdir(trace_dir) if f.endswith(".jsonl") and f[:-1] not in first]
    assert partial, "the second wave had started writing its traces"
    before = {f: open(os.path.join(trace_dir, f)).read() for f in first}

    r = subprocess.run(_cmd(run_dir, mode), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already finished, resuming" in r.stderr
    done = _finished(trace_dir)
    assert done == [f"ep_{k}.json" for k in range(8)]
    for f in first:  # finished episodes were not replayed
        assert open(os.path.join(trace_dir, f)).read() == before[f]
    for k, seed in enumerate(SEEDS):
        ep = json.load(open(os.path.join(trace_dir, f"ep_{k}.json")))
        lines = [json.loads(ln) for ln in open(os.path.join(trace_dir, f"ep_{k}.jsonl"))]
        assert ep["seed"] == seed and ep["episode_idx"] == k
        assert len(lines) == ep["num_steps"] == STEPS and ep["end_reason"] == "max_steps"
        assert [ln["step"] for ln in lines] == list(range(STEPS))  # no duplicated or missing step
        for ln in lines:
            assert ln["seed"] == seed and ln["episode"] == k
            assert ln["validated_action"] in ln["info"]["action"] or ln["info"]["action"] == ln["validated_action"]
            assert ln["obs_long_term"] and "memory_snapshot" in ln and 0.0 <= ln["progression"] <= 1.0
            assert ln["plan"]["turns"] and ln["plan"]["turns"][0]["model_role"] == "policy"
            assert (ln["step"] == 0) == (ln["log"]["end_reason"] == "skipped")
            assert ln["tokens_in"] > 0
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    t = summary["environments"]["craftax"]["Craftax-Classic"]
    assert t["episodes"] == 8 and t["seeds"] == SEEDS and t["steps"] == 8 * STEPS
    assert 0.0 <= t["progression"] <= 1.0 and t["progression_se"] >= 0.0
    assert t["hygiene"]["context_tokens_per_step"] > 500
    assert summary["input_tokens"] > 0 and summary["output_tokens"] > 0
    assert summary["run"]["engine"]["compiles"] >= 2  # how many shapes the resumed run compiled
    assert summary["run"]["mode"] == mode and summary["run"]["requests"] > 0


def test_summary_mean_and_standard_error():
    eps = [{"env": "minihack", "task": "Corridor-R3", "seed": s, "progression": p, "num_steps": 10,
            "input_tokens": 5, "output_tokens": 1, "end_reason": "terminated",
            "hygiene": HygieneCounter().as_dict()} for s, p in zip(range(4), [1.0, 0.0, 1.0, 1.0])]
    s = summarize(eps)
    t = s["environments"]["minihack"]["Corridor-R3"]
    # Population sd (ddof=0) as upstream: sqrt(0.75 / 4) = sqrt(3) / 4, over sqrt(4).
    assert t["progression"] == 0.75 and abs(t["progression_se"] - 3 ** 0.5 / 8) < 1e-12
    assert s["average_progress"] == 75.0 and abs(s["standard_error"] - 100 * 3 ** 0.5 / 8) < 1e-9
    one = summarize(eps[:1])
    assert one["standard_error"] == 0.0 and one["environments"]["minihack"]["Corridor-R3"]["progression_se"] == 0.0


def test_hygiene_counts_redundant_writes_and_empty_searches():
    h = HygieneCounter()
    op = lambda name, *args, text="", ok=True: {"op": name, "args": list(args), "text": text, "ok": ok}  # noqa: E731
    h.update({"action_valid": True, "tokens_in": 100, "memory_snapshot": {"notes.txt": "tree at north"},
              "log": {"turns": [{"ops": [op("APPEND", "notes.txt", "tree at north"),
                                         op("SEARCH", "notes.txt", "wood", text="[No lines matching 'wood']"),
                                         op("DONE")]}]}, "plan": {"turns": []}})
    h.update({"action_valid": False, "tokens_in": 50, "memory_snapshot": {"notes.txt": "tree at north"},
              "log": {"turns": [{"ops": [op("WRITE", "notes.txt", "tree at north"),
                                         op("APPEND", "notes.txt", "tree at north")]}]},
              "plan": {"turns": [{"ops": [op("SEARCH", "notes.txt", "tree", text="tree at north")]}]}})
    d = h.as_dict()
    assert d["writes"] == 3 and d["redundant_writes"] == 2
    assert d["searches"] == 2 and d["empty_searches"] == 1
    assert d["ops_per_step"] == 2.5 and d["context_tokens_per_step"] == 75 and d["invalid_action_rate"] == 0.5


def test_runner_cli_rejects_bad_seeds(tmp_path):
    r = subprocess.run([sys.executable, "-m", "automem_jax.rollout.runner", "--seeds", "a-b", "--run_dir",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--seeds" in r.stderr


@pytest.mark.parametrize("mode", ["tick", "async"])
def test_non_writer_host_plays_the_same_episodes_and_writes_nothing(tmp_path, mode):
    """Multi-host: every host plays (SPMD engine calls) but only process 0 writes the run folder."""
    from automem_jax.loops.teacher import TeacherClient
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.rollout.runner import Runner

    structure = MemoryStructure.default("crafter_tiny")
    runs = {}
    for writer in (True, False):
        run_dir = tmp_path / ("host0" if writer else "host1")
        runner = Runner(TeacherClient(seed=3), structure, str(run_dir), "craftax", num_envs=2, max_steps=3,
                        progress=False, writer=writer, mode=mode)
        runs[writer] = runner.run([7, 8])
    assert runs[True]["average_progress"] == runs[False]["average_progress"]
    assert runs[True]["episodes"] == runs[False]["episodes"] == 2
    assert sorted(os.listdir(tmp_path / "host0" / "traces" / "craftax" / "Craftax-Classic")) == [
        "ep_0.json", "ep_0.jsonl", "ep_1.json", "ep_1.jsonl"]
    assert not (tmp_path / "host1").exists() or not any((tmp_path / "host1").rglob("*.json*"))


def test_gcs_trace_staging_is_removed(gcs_emulator):
    import tempfile

    from automem_jax import storage
    from automem_jax.rollout.traces import EpisodeTrace

    before = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("automem-trace-")}
    folder = f"{gcs_emulator}/staging-test/traces/craftax/Craftax-Classic"
    done = EpisodeTrace(folder, 0, {"seed": 1})
    done.write_step({"step": 0, "reward": 1.0})
    done.finish(0.0, "max_steps")
    EpisodeTrace(folder, 1, {"seed": 2}).abort()
    after = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("automem-trace-")}
    assert after == before
    assert storage.exists(storage.join(folder, "ep_0.jsonl")) and storage.exists(storage.join(folder, "ep_0.json"))
    assert not storage.exists(storage.join(folder, "ep_1.json"))


class _FeedbackClient:
    """PLAN of step 0 answers an invalid action, step 1 a valid one, step 2 no action at all (the
    structure's fallback), later steps the valid one; LOG turns answer without ops. Keeps every
    request's first message."""

    def __init__(self, valid):
        self.valid, self.plans, self.prompts = valid, 0, []

    def generate(self, requests):
        from automem_jax.agent.types import Completion
        out = []
        for r in requests:
            self.prompts.append((r.phase, self.plans, r.messages[0]["content"]))
            if r.phase == "log":
                out.append(Completion("Nothing to record."))
                continue
            step, self.plans = self.plans, self.plans + 1
            text = {0: "<|ACTION|>fly away<|END|>", 2: "I do not know."}.get(step, f"<|ACTION|>{self.valid}<|END|>")
            out.append(Completion(text))
        return out


# env name, extra env keywords, a valid action, structure, fallback, whether the fallback is a valid action
FEEDBACK_ENVS = {
    "crafter": ("crafter", {}, "Do", "crafter", "noop", False),
    "nethack": ("nethack", {"num_workers": 0}, "wait", "nethack", "search", True),
}


@pytest.mark.parametrize("which", sorted(FEEDBACK_ENVS))
def test_feedback_on_invalid_action(tmp_path, which):
    from automem_jax.envs.base import invalid_action_notice
    from automem_jax.memory.structure import MemoryStructure
    from automem_jax.rollout.runner import Runner

    name, kw, valid, structure, fallback, fallback_valid = FEEDBACK_ENVS[which]
    client = _FeedbackClient(valid)
    runner = Runner(client, MemoryStructure.default(structure), str(tmp_path / "on"), name, num_envs=1,
                    max_steps=4, progress=False, mode="tick",
                    env_kwargs={**kw, "feedback_on_invalid_action": True})
    summary = runner.run([42])
    env, task = runner.env, runner.task
    lines = [json.loads(ln) for ln in open(tmp_path / "on" / "traces" / env / task / "ep_0.jsonl")]
    default = lines[0]["validated_action"]
    assert default == {"crafter": "Noop", "nethack": "esc"}[which]
    assert [ln["action_valid"] for ln in lines] == [False, True, fallback_valid, True]
    assert lines[2]["raw_action"] == fallback and lines[2]["plan"]["fallback"]
    notice = invalid_action_notice(default)
    assert notice.startswith("NOTE: your previous output was not a valid action") and default in notice
    # The observation after an invalid action opens with the notice; the others do not.
    assert lines[1]["obs_long_term"].startswith(notice)
    assert not lines[2]["obs_long_term"].startswith("NOTE:")
    assert lines[3]["obs_long_term"].startswith(notice) == (not fallback_valid)
    # It reaches both prompts of that step.
    step1 = [p for phase, plans, p in client.prompts if plans == 1]
    assert len(step1) == 2 and all(notice in p for p in step1)
    # Summaries count the invalid steps (upstream's Crafter fallback among them).
    t = summary["environments"][env][task]
    assert t["invalid_action_rate"] == (1 if fallback_valid else 2) / 4
    # Switched off (the Runner's own default), no notice.
    Runner(_FeedbackClient(valid), MemoryStructure.default(structure), str(tmp_path / "off"), name, num_envs=1,
           max_steps=2, progress=False, mode="tick", env_kwargs=kw).run([42])
    off = [json.loads(ln) for ln in open(tmp_path / "off" / "traces" / env / task / "ep_0.jsonl")]
    assert not off[0]["action_valid"] and not off[1]["obs_long_term"].startswith("NOTE:")
