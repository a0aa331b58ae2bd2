"""The README's main command (`python -m launch.tpu_run`): config errors, and SMALL, the shrunk tiny
config the end-to-end tests share. Every stage end to end on one process with a gs:// workdir and
on two processes, killed in the middle of Loop 2 and resumed: tests/test_multihost_job.py."""

import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny config, smaller still: the same stages and code paths, fewer episodes and steps.
SMALL = [
    # Two short teacher episodes and a short fit: the student's skill is not under test (collect
    # plays the scripted teacher, so Loop 2 has turns to mine either way).
    "--config.bootstrap.seeds=100-101", "--config.bootstrap.max_steps=8",
    "--config.bootstrap.train.max_steps=12", "--config.bootstrap.train.batch_size=8",
    "--config.eval.seeds=42-43", "--config.env.max_steps=3", "--config.env.num_envs=2",
    "--config.inference.max_tokens=64", "--config.inference.max_batch=4",
    "--config.loop1.fresh_attempts=1", "--config.loop1.continuation_retries=0",
    "--config.collect.episodes=3", "--config.collect.max_steps=4",
    "--config.loop2.min_examples=1", "--config.loop2.train.max_steps=6", "--config.loop2.train.save_every=2",
    "--config.loop2.train.batch_size=4",
]


def _env(extra=None):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    env.update(extra or {})
    return env


def _run(*args, env=None, timeout=1200):
    return subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", *args], cwd=REPO,
                          env=_env(env), capture_output=True, text=True, timeout=timeout)


def test_config_errors_name_the_problem(tmp_path):
    wd = str(tmp_path / "run")
    r = _run(f"--workdir={wd}", "--config.loop1.revisionz=2")
    assert r.returncode != 0 and "revisionz" in r.stderr
    r = _run(f"--workdir={wd}", "--config.loop1.revisions=many")
    assert r.returncode != 0 and "loop1.revisions" in r.stderr and "many" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/no_such_config.py",
                        f"--workdir={wd}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no_such_config.py" in r.stderr
    r = _run(f"--workdir={wd}", "--stages=baseline,warp_drive")
    assert r.returncode != 0 and "unknown stage(s) ['warp_drive']" in r.stderr + r.stdout
    r = _run(f"--workdir={wd}", "--config.model.preset=qwen9")
    assert r.returncode != 0 and "known presets" in r.stderr + r.stdout
    r = _run(f"--workdir={wd}", "--config.env.name=pong")
    assert r.returncode != 0 and "env.name 'pong'" in r.stderr
    r = _run(f"--workdir={wd}", "--config.eval.seeds=42-x")
    assert r.returncode != 0 and "eval.seeds" in r.stderr
    r = _run(f"--workdir={wd}", "--config.loop2.train.mode=qlora")
    assert r.returncode != 0 and "loop2" in r.stderr and "qlora" in r.stderr
    r = _run(f"--workdir={wd}", "--config.critic.kind=openai")
    assert r.returncode != 0 and "critic" in r.stderr
    r = _run(f"--workdir={wd}", "--config.bootstrap.tokenizer_vocab=100")
    assert r.returncode != 0 and "bootstrap.tokenizer_vocab 100" in r.stderr
    assert not os.path.exists(wd)
