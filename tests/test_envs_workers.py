"""NLE worker pool: batched steps equal in-process episodes; a killed worker disturbs nobody else."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from automem_jax.envs import EpisodeOverError, make
from automem_jax.envs.nethack import NetHackTextEnv
from automem_jax.envs.workers import NLEWorkerPool

TASK = "minihack:Corridor-R3"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _reference(seeds):
    envs = [NetHackTextEnv(TASK.split(":")[1]) for _ in seeds]
    return envs, [e.reset(s) for e, s in zip(envs, seeds)]


def test_killed_worker_is_restarted_and_episodes_continue_exactly():
    seeds = [11, 12, 13, 14]
    rng = np.random.default_rng(0)
    with make(TASK, num_envs=4, num_workers=2) as pool:
        assert isinstance(pool, NLEWorkerPool) and pool.worker_of(2) == 0
        ref, ref_obs = _reference(seeds)
        assert [o.long_term for o in pool.reset_batch(seeds)] == [o.long_term for o in ref_obs]
        live = {0, 1, 2, 3}
        t = 0
        while live:
            slots = sorted(live)
            if t == 8:
                os.kill(pool.worker_pids()[1], signal.SIGINT)  # Ctrl-C at a worker: ignored
            if t == 10:
                old = pool.worker_pids()
                os.kill(old[0], signal.SIGKILL)  # worker 0 hosts slots 0 and 2
                assert not _wait_gone([old[0]], 5.0)
                slots = [s for s in slots if s != 2]  # slot 2 sits idle through the crash
            acts = {i: ref[i].actions[rng.integers(len(ref[i].actions))] for i in slots}
            out = pool.step_batch(acts)
            for i, a in acts.items():
                o, r, term, trunc, info = ref[i].step(a)
                got = out[i]
                assert got.obs.long_term == o.long_term and got.obs.short_term == o.short_term, (t, i)
                assert (got.reward, got.terminated, got.truncated) == (r, term, trunc)
                assert "crashed" not in got.info
                assert got.info.get("retried", 0) == (1 if t == 10 and i == 0 else 0)
                assert pool.progression(i) == ref[i].progression()
                if term or trunc:
                    live.discard(i)
            t += 1
        assert pool.restarts == 1 and pool.worker_pids()[0] != old[0] and pool.worker_pids()[1] == old[1]
        pids = pool.worker_pids()
    assert not _wait_gone(pids), "workers left behind after close()"


def test_crash_without_retries_marks_the_episode_crashed():
    with make(TASK, num_envs=4, num_workers=2, max_retries=0) as pool:
        ref, _ = _reference([1, 2, 3, 4])
        pool.reset_batch([1, 2, 3, 4])
        pool.step_batch(["east"] * 4)
        for e in ref:
            e.step("east")
        os.kill(pool.worker_pids()[1], signal.SIGKILL)  # hosts slots 1 and 3
        _wait_gone([pool.worker_pids()[1]], 5.0)
        out = pool.step_batch(["east", "south", "east", "north"])
        for i in (1, 3):
            assert out[i].truncated and not out[i].terminated and out[i].info["crashed"]
            assert "killed by SIGKILL" in out[i].info["error"] and out[i].info["seed"] == i + 1
        for i, a in ((0, "east"), (2, "east")):
            assert "crashed" not in out[i].info
            assert out[i].obs.long_term == ref[i].step(a)[0].long_term
        with pytest.raises(EpisodeOverError):
            pool.step_batch({1: "east"})
        (obs,) = pool.reset_batch([9], [1])
        assert obs.long_term == NetHackTextEnv("Corridor-R3").reset(9).long_term
        assert not pool.step_batch({1: "west"})[1].done


def test_no_worker_survives_ctrl_c_or_a_killed_parent(tmp_path):
    script = tmp_path / "run_pool.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from automem_jax.envs import make
        if __name__ == "__main__":
            pool = make("nethack", num_envs=2, num_workers=2)
            pool.reset_batch([1, 2])
            print(json.dumps(pool.worker_pids()), flush=True)
            while True:
                for r in pool.step_batch(["search", "search"]):
                    if r.done:
                        pool.reset_batch()
    """))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
        try:
            pids = json.loads(proc.stdout.readline())
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            time.sleep(0.3)
            proc.send_signal(sig)
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in proc.stderr.read()
        assert not _wait_gone(pids), f"workers left behind after {sig.name}"


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown MiniHack task"):
        make("minihack:NoSuchTask", num_envs=2)
    with pytest.raises(ValueError, match="num_workers"):
        NLEWorkerPool("Corridor-R3", num_envs=2, num_workers=0)
    serial = make(TASK, num_envs=2, num_workers=0)  # in-process batch, same interface
    assert len(serial.reset_batch([1, 2])) == 2
    assert serial.step_batch({0: "east"})[0].info["action"] == "east"
