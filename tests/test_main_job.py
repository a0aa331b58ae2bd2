"""The README's main command (`python -m launch.tpu_run`): every phase on a shrunk tiny config,
a kill in the middle of Loop 2 and a resume, a gs:// workdir on the emulator, and config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny config, smaller still: the same phases and code paths, fewer episodes and steps.
SMALL = [
    # Two short teacher episodes, many passes: the student learns the op grammar quickly.
    "--config.bootstrap.seeds=100-101", "--config.bootstrap.max_steps=8",
    "--config.bootstrap.train.max_steps=40", "--config.bootstrap.train.batch_size=8",
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


def _exists(wd, *parts):
    return os.path.exists(os.path.join(wd, *parts))


@pytest.mark.slow
def test_tiny_pipeline_survives_a_kill_in_loop2(tmp_path):
    wd = str(tmp_path / "run")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py",
                             f"--workdir={wd}", *SMALL], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    # Kill -9 once Loop 2's training has written its first checkpoint (steps 3-6 still to go).
    ckpt = os.path.join(wd, "loop2", "0", "train", "checkpoints", "2")
    deadline = time.time() + 1200
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    first = open(tmp_path / "first.log").read()
    assert os.path.exists(ckpt), first[-3000:]
    assert not _exists(wd, "phases", "loop2", "DONE")
    dataset_done = os.path.getmtime(os.path.join(wd, "datasets", "0", "DONE"))

    r = _run(f"--workdir={wd}", *SMALL)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = r.stdout + r.stderr
    for name in ("bootstrap", "baseline", "loop1", "collect"):
        assert f"phase {name}: already done" in out
    # Finished units inside Loop 2 were not redone: the dataset kept its marker, training resumed.
    assert os.path.getmtime(os.path.join(wd, "datasets", "0", "DONE")) == dataset_done
    train = json.load(open(os.path.join(wd, "loop2", "0", "train", "train_result.json")))
    assert train["resumed_from"] >= 2 and train["steps"] == 6
    log_rows = [json.loads(x) for x in open(os.path.join(wd, "loop2", "0", "train", "train_log.jsonl"))]
    assert [r["step"] for r in log_rows] == list(range(1, 7))

    # Artifacts of every phase.
    for phase in ("bootstrap", "baseline", "loop1", "collect", "loop2", "final_eval", "export", "report"):
        assert _exists(wd, "phases", phase, "DONE"), phase
    assert _exists(wd, "traces_collect", "traces", "craftax", "Craftax-Classic", "ep_0.jsonl")
    archive = [json.loads(x) for x in open(os.path.join(wd, "structures", "archive.jsonl"))]
    assert archive and all("status" in row for row in archive)
    assert _exists(wd, "datasets", "0", "selected.jsonl") and _exists(wd, "datasets", "0", "review_decisions.jsonl")
    ledger = [json.loads(x) for x in open(os.path.join(wd, "ledger.jsonl"))]
    assert len(ledger) == 1 and ledger[0]["n_examples"] >= 1
    assert _exists(wd, "eval", "final", "summary.json")
    report = open(os.path.join(wd, "report", "index.md")).read()
    assert "baseline" in report.lower() and "redundant" in report.lower()
    assert any(n.endswith(".png") for n in os.listdir(os.path.join(wd, "report")))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_model = AutoModelForCausalLM.from_pretrained(os.path.join(wd, "export", "hf"))
    # The bootstrap's domain tokenizer travels with the export and matches the model's vocabulary.
    tok = AutoTokenizer.from_pretrained(os.path.join(wd, "export", "hf"))
    assert len(tok) <= hf_model.config.vocab_size <= 4096 and hf_model.config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "<|READ|>strategy.txt<|END|>"}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()
    assert _exists(wd, "export", "peft", "adapter_config.json")

    again = _run(f"--workdir={wd}", *SMALL)
    assert again.returncode == 0 and again.stdout.count("already done") == 8


@pytest.mark.slow
def test_tiny_pipeline_on_gcs(gcs_emulator):
    from automem_jax import storage
    wd = f"{gcs_emulator}/runs/tiny"
    phases = "bootstrap,baseline,loop1,collect,loop2,final_eval,export,report"
    r = _run(f"--workdir={wd}", f"--phases={phases}", *SMALL,
             env={"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for phase in phases.split(","):
        assert storage.exists(storage.join(wd, "phases", phase, "DONE")), phase
    for path in ("config.json", "ledger.jsonl", "structures/archive.jsonl", "eval/final/summary.json",
                 "export/hf/config.json", "export/hf/model.safetensors", "report/index.md",
                 "datasets/0/selected.jsonl", "bootstrap/tokenizer/tokenizer.json", "export/hf/tokenizer.json"):
        assert storage.exists(storage.join(wd, path)), path
    assert storage.listdir(storage.join(wd, "loop2", "0", "train", "checkpoints"))


def test_config_errors_name_the_problem(tmp_path):
    wd = str(tmp_path / "run")
    r = _run(f"--workdir={wd}", "--config.loop1.revisionz=2")
    assert r.returncode != 0 and "revisionz" in r.stderr
    r = _run(f"--workdir={wd}", "--config.loop1.revisions=many")
    assert r.returncode != 0 and "loop1.revisions" in r.stderr and "many" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/no_such_config.py",
                        f"--workdir={wd}"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no_such_config.py" in r.stderr
    r = _run(f"--workdir={wd}", "--phases=baseline,warp_drive")
    assert r.returncode != 0 and "unknown phase(s) ['warp_drive']" in r.stderr + r.stdout
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
