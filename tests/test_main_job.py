"""The README's main command on the tiny config: runs, resumes, and rejects bad flags clearly."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_tiny_main_job_runs_and_resumes(tmp_path):
    wd = str(tmp_path / "run")
    r = _run(f"--workdir={wd}", "--config.smoke.max_new_tokens=5", "--config.rollout.episodes=2",
             "--config.rollout.num_envs=2", "--config.rollout.max_steps=2", "--config.rollout.max_tokens=4")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(open(os.path.join(wd, "phases", "model_smoke", "result.json")).read())
    assert res["parameters"] == 19_841_792 and res["prompt_tokens"] > 0
    # Greedy through the engine: 5 tokens, or fewer if the random model emitted EOS.
    assert len(res["generated"]) == 5 if res["finish_reason"] == "length" else res["finish_reason"] == "stop"
    assert os.path.exists(os.path.join(wd, "export", "hf", "model.safetensors"))
    cfg = json.loads(open(os.path.join(wd, "config.json")).read())
    assert cfg["smoke"]["max_new_tokens"] == 5
    summary = json.loads(open(os.path.join(wd, "rollout_smoke", "summary.json")).read())
    assert summary["environments"]["craftax"]["Craftax-Classic"]["episodes"] == 2
    roll = json.loads(open(os.path.join(wd, "phases", "rollout_smoke", "result.json")).read())
    assert roll["engine"]["compiles"] >= 2 and roll["runner"]["agent_steps"] == 4
    again = _run(f"--workdir={wd}")
    assert again.returncode == 0 and again.stdout.count("already done") == 2


def test_bad_flags_are_explained(tmp_path):
    r = _run(f"--workdir={tmp_path}", "--phases=model_smoke,warp_drive")
    assert r.returncode != 0 and "unknown phase(s) ['warp_drive']" in r.stderr + r.stdout
    r = _run(f"--workdir={tmp_path}", "--config.model.presett=tiny")
    assert r.returncode != 0 and "presett" in r.stderr
    r = _run(f"--workdir={tmp_path}", "--config.model.preset=qwen9")
    assert r.returncode != 0 and "known presets" in r.stderr + r.stdout
    r = _run(f"--workdir={tmp_path}", "--config.rollout.env=pong")
    assert r.returncode != 0 and "rollout.env 'pong'" in r.stderr
    assert not os.path.exists(os.path.join(tmp_path, "phases"))
