"""Managed replicas (inference.backend=server): real server processes (our automem_jax.llm.server)
started from the command template, requests spread over them, a replica killed with SIGKILL and
restarted, LoRA adapters loaded at run time and again after a restart, and the tiny main job's
baseline, Loop-2 training and two-model evaluation through two replicas, one of them killed
mid-evaluation."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from automem_jax.agent.types import ROLE_POLICY, ChatRequest
from automem_jax.llm.replicas import OWN_SERVER, ReplicaConfig, ReplicaSet, check_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _req(text: str, max_tokens: int = 8) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], phase="plan", model_role=ROLE_POLICY,
                       max_tokens=max_tokens)


def test_command_template_checks():
    check_command(OWN_SERVER)
    with pytest.raises(ValueError, match=r"\{port\}"):
        check_command("{python} -m automem_jax.llm.server --checkpoint {checkpoint}")
    with pytest.raises(ValueError, match=r"unknown placeholder.*\{gpus\}"):
        check_command("vllm serve {checkpoint} --port {port} -tp {gpus}")
    with pytest.raises(ValueError, match="empty"):
        check_command("  ")
    with pytest.raises(ValueError, match="replicas"):
        ReplicaConfig(replicas=0)
    with pytest.raises(ValueError, match="unknown field"):
        ReplicaConfig.from_any({"comand": "x"})


def test_config_error_before_anything_is_written(tmp_path):
    wd = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}",
                        "--config.inference.backend=server",
                        "--config.inference.server.command={python} -m automem_jax.llm.server --port {port}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert "inference.server" in r.stderr and "{checkpoint}" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not wd.exists()
    r = subprocess.run([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}",
                        "--config.inference.backend=vllm"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0 and "inference.backend" in r.stderr and not wd.exists()


def _adapter(tmp_path):
    """A real PEFT adapter over preset:tiny (seed 0) with random A and B, as Loop 2 writes it."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from automem_jax.models import hf, lora, qwen, qwen_presets
    model = qwen.init_model(qwen_presets.preset("tiny"), seed=0)
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets="ALL")
    lora.apply_lora(model, lcfg, seed=1)
    rng = np.random.RandomState(1)
    for _, v in nnx.to_flat_state(lora.lora_state(model)):  # fresh B is zero: make the adapter matter
        x = v.get_value()
        v.set_value(jnp.asarray(0.3 * rng.randn(*x.shape), x.dtype))
    out = str(tmp_path / "adapter")
    hf.save_peft_adapter(model, model.cfg, lcfg, out, base_model_name_or_path="preset:tiny")
    return out


@pytest.mark.slow
def test_replica_set_failover_restart_and_adapters(tmp_path):
    cfg = ReplicaConfig(replicas=2, base_port=0, health_timeout_s=300, request_timeout_s=120,
                        max_concurrency=8, log_dir=str(tmp_path / "logs"))
    rs = ReplicaSet(cfg, "preset:tiny", model="policy", max_len=256, max_batch=4, seed=0)
    with rs:
        assert len(rs.local_urls) == 2
        adapter = _adapter(tmp_path)
        rs.load_adapter("spec", adapter)
        base, spec = rs.client("policy", temperature=0.0), rs.client("spec", temperature=0.0)
        warm = base.generate([_req("hello"), _req("world")])
        assert all(c.error is None for c in warm), warm
        assert all(n >= 1 for n in rs.stats["served"]), rs.stats  # spread over both replicas
        s0 = spec.generate([_req("hello")])[0]
        assert s0.error is None and s0.model_id == "spec"
        assert s0.text != warm[0].text  # the adapter changes the answer

        # SIGKILL replica 0 while 12 requests are in flight: every request is answered.
        futs = [base.submit(_req(f"question {i}", max_tokens=24)) for i in range(12)]
        pid = int(open(os.path.join(cfg.log_dir, "host0_replica0.pid")).read())
        os.kill(pid, signal.SIGKILL)
        outs = [f.result(timeout=600) for f in futs]
        assert all(c.error is None for c in outs), [c.error for c in outs if c.error]
        deadline = time.time() + 300
        while rs.stats["restarts"] < 1 or not all(r.up for r in rs.local):
            assert time.time() < deadline, "replica 0 was not restarted"
            time.sleep(0.5)
        new_pid = int(open(os.path.join(cfg.log_dir, "host0_replica0.pid")).read())
        assert new_pid != pid
        # The restarted replica got its adapter back: the same greedy answer from either replica.
        again = [spec.generate([_req("hello")])[0] for _ in range(3)]
        assert all(c.error is None and c.text == s0.text for c in again), again
    assert all(r.proc is None for r in rs.local)
    for p in (pid, new_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)


SMALL = [
    "--config.bootstrap.seeds=100-101", "--config.bootstrap.max_steps=8",
    "--config.bootstrap.train.max_steps=12", "--config.bootstrap.train.batch_size=8",
    "--config.eval.seeds=42-45", "--config.env.max_steps=3", "--config.env.num_envs=2",
    "--config.inference.max_tokens=48", "--config.inference.max_batch=4", "--config.inference.max_len=1536",
    "--config.collect.episodes=3", "--config.collect.max_steps=4",
    "--config.loop2.min_examples=1", "--config.loop2.train.max_steps=4", "--config.loop2.train.batch_size=4",
    "--stages=bootstrap,baseline,collect,loop2,final_eval",
    "--config.inference.backend=server", "--config.inference.server.replicas=2",
    "--config.inference.server.base_port=0", "--config.inference.server.health_timeout_s=600",
]


@pytest.mark.slow
def test_main_job_through_two_replicas_one_killed_mid_evaluation(tmp_path):
    wd, logs = str(tmp_path / "run"), str(tmp_path / "replica_logs")
    out = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}",
                             *SMALL, f"--config.inference.server.log_dir={logs}"], cwd=REPO,
                            env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), stdout=out,
                            stderr=subprocess.STDOUT)
    # Kill replica 0 once the two-model evaluation has written its first step.
    eval_dir = os.path.join(wd, "loop2", "0", "eval")
    deadline = time.time() + 1500
    killed = None
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(os.path.join(eval_dir, "traces", "*", "*", "ep_*.jsonl")):
            killed = int(open(os.path.join(logs, "host0_replica0.pid")).read())
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    try:
        proc.wait(timeout=max(60, deadline - time.time()))
    finally:
        proc.kill()
        out.close()
    text = open(tmp_path / "job.log").read()
    assert killed is not None, text[-4000:]
    assert proc.returncode == 0, text[-4000:]
    assert "restart 1 of" in text, text[-4000:]
    for stage in ("bootstrap", "baseline", "collect", "loop2", "final_eval"):
        assert os.path.exists(os.path.join(wd, "stages", stage, "DONE")), stage

    # Baseline and the two-model evaluation ran through the replicas: their traces name the served models.
    def episodes(run_dir):
        files = sorted(glob.glob(os.path.join(run_dir, "traces", "*", "*", "ep_*.json")))
        return [json.load(open(f)) for f in files], files

    base_eps, _ = episodes(os.path.join(wd, "eval", "baseline"))
    eval_eps, files = episodes(eval_dir)
    assert len(base_eps) == 4 and len(eval_eps) == 4
    # No episode lost or duplicated: one trace per seed, every one finished.
    assert sorted(os.path.basename(f) for f in files) == [f"ep_{i}.json" for i in range(4)]
    summary = json.load(open(os.path.join(eval_dir, "summary.json")))
    assert summary["episodes"] == 4
    steps = []
    for f in glob.glob(os.path.join(eval_dir, "traces", "*", "*", "ep_*.jsonl")):
        rows = [json.loads(x) for x in open(f) if x.strip()]
        steps.append([r.get("step") for r in rows if "step" in r])
    for s in steps:
        assert len(s) == len(set(s)), "a step was recorded twice"
    roles = {}
    for f in glob.glob(os.path.join(eval_dir, "traces", "*", "*", "ep_*.jsonl")):
        for line in open(f):
            row = json.loads(line)
            for phase in ("log", "plan"):
                for turn in (row.get(phase) or {}).get("turns", []):
                    assert not (turn.get("error") or "").startswith("replicas"), turn["error"]  # none gave up
                    roles.setdefault(turn["model_role"], set()).add(turn["model_id"])
    # Memory turns by the adapter, actions by the base model, both on the same replicas.
    assert {m[:11] for m in roles.get("memory", ())} == {"specialist-"}, roles
    assert roles.get("gameplay") == {"policy"}, roles
    # Every replica process is gone after the job.
    for pidfile in glob.glob(os.path.join(logs, "*.pid")):
        with pytest.raises(ProcessLookupError):
            os.kill(int(open(pidfile).read()), 0)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_hosts_each_start_a_replica_and_process_0_plays_over_both(tmp_path):
    """Two processes of the main job (jax.distributed on 127.0.0.1, gloo): each starts its own
    replica, process 0 plays the evaluations over both, Loop-2 training runs in a child process
    per host that forms its own 2-process group, and the adapter is loaded on both replicas."""
    wd, logs = str(tmp_path / "run"), str(tmp_path / "replica_logs")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
    args = ["--config.bootstrap.enabled=False", "--config.eval.seeds=42-43", "--config.env.max_steps=2",
            "--config.env.num_envs=2", "--config.inference.max_tokens=16", "--config.inference.max_batch=4",
            "--config.inference.max_len=2048", "--config.collect.episodes=2", "--config.collect.max_steps=3",
            "--config.loop2.min_examples=1", "--config.loop2.train.max_steps=2",
            "--config.loop2.train.batch_size=2", "--stages=baseline,collect,loop2",
            "--config.inference.backend=server", "--config.inference.server.base_port=0",
            f"--config.inference.server.log_dir={logs}", "--config.mesh.multi_host=True",
            "--config.mesh.num_processes=2"]
    procs, outs = [], []
    for i in range(2):
        outs.append(open(tmp_path / f"host{i}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py",
                                       f"--workdir={wd}", *args, f"--config.mesh.process_id={i}"], cwd=REPO,
                                      env=env, stdout=outs[i], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=1200)
    finally:
        for p, o in zip(procs, outs):
            p.kill()
            o.close()
    text = [open(tmp_path / f"host{i}.log").read() for i in range(2)]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"host {i}:\n" + text[i][-4000:]
    # Each host started its own replica; process 0 sent requests to both.
    assert os.path.exists(os.path.join(logs, "host0_replica0.log")) and os.path.exists(
        os.path.join(logs, "host1_replica0.log"))
    import re
    served = [json.loads(m) for m in re.findall(r"requests answered per replica (\[[^\]]*\])", text[0])]
    assert served and all(len(s) == 2 and min(s) > 0 for s in served), served
    assert "requests answered per replica" not in text[1]  # host 1 served, it did not play
    # Training ran in a child process on each host, the two children as one 2-process group.
    for t in text:
        assert re.search(r"loop2_train: process \d of 2", t), t[-3000:]
    rows = [json.loads(x) for x in open(os.path.join(wd, "ledger.jsonl"))]
    assert len(rows) == 1
    eval_dir = os.path.join(wd, "loop2", "0", "eval")
    files = sorted(glob.glob(os.path.join(eval_dir, "traces", "*", "*", "ep_*.json")))
    assert [os.path.basename(f) for f in files] == ["ep_0.json", "ep_1.json"]
    ids = set()
    for f in glob.glob(os.path.join(eval_dir, "traces", "*", "*", "ep_*.jsonl")):
        for line in open(f):
            row = json.loads(line)
            for phase in ("log", "plan"):
                ids |= {t["model_id"] for t in (row.get(phase) or {}).get("turns", [])}
    assert any(i.startswith("specialist-") for i in ids) and "policy" in ids, ids
