"""The README's main command on 2 processes x 2 CPU devices, as on a 2-host pod.

Both processes run `python -m launch.tpu_run` with `jax.distributed` (coordinator on 127.0.0.1,
gloo collectives). The reference is the same config as one process over 4 CPU devices, with its
workdir on gs:// (the GCS emulator), so it is also the end-to-end run of every stage on GCS. A scripted
HTTP critic answers Loop 1's proposal and Loop 2's judge batches for both runs, and counts them.
The 2-process run loses process 1 (SIGKILL) in the middle of Loop 2's training; both commands are
run again and must resume from the same checkpoint step and finish. Then: both exit 0; the
baseline summary, the Loop-1 archive and the ledger exist once and match the one-process run; the
critic was called once per proposal and once per judge batch, over both attempts together.
A write under the workdir from process 1 raises (storage.share), so finishing at all shows that
process 0 was the only writer. "Match" is exact for every field but wall-clock ones and floats,
which agree to 1e-5 relative: an all-reduce over gloo sums in another order than one process does
(in practice only the training loss differs, in its seventh digit). The one-process run's
artifacts are also checked as a user would use them (the exported model loads in transformers).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.critic_server import ScriptedCriticServer
from tests.test_main_job import REPO, SMALL

pytestmark = pytest.mark.slow

# The main job's reduced config with the critic over HTTP for Loop 1 and the Loop-2 judge.
ARGS = SMALL + ["--config.critic.kind=openai", "--config.critic.model=scripted", "--config.critic.use_tools=False",
                "--config.critic.max_retries=0", "--config.loop2.judge=critic"]
TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _critic_reply(body: dict) -> str:
    """A judge batch: accept every id. Anything else is a Loop-1 proposal: one more PLAN turn."""
    from automem_jax.critic import format_proposal
    from automem_jax.memory.structure import MemoryStructure
    text = "\n".join(m.get("content") or "" for m in body["messages"] if m.get("role") == "user")
    ids = [json.loads(m) for m in re.findall(r'### candidate id=("(?:[^"\\]|\\.)*")', text)]
    if ids:
        return json.dumps([{"id": i, "decision": "accept", "reason": "uses memory"} for i in ids])
    doc = MemoryStructure.default("crafter_tiny").to_dict()
    doc["budgets"]["plan_turns"] += 1
    return format_proposal(doc, "One more PLAN turn for a lookup before acting.")


def _kind(body: dict) -> str:
    text = "\n".join(m.get("content") or "" for m in body["messages"] if m.get("role") == "user")
    return "judge" if "### candidate id=" in text else "proposal"


def _env(devices: int, extra=None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra or {})
    return env


def _cmd(wd: str, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}", *ARGS,
            f"--config.critic.base_url={url}", *extra]


def _start_pair(wd: str, url: str, logs: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        out = open(logs[i], "a")
        procs.append(subprocess.Popen(
            _cmd(wd, url, "--config.mesh.multi_host=True", "--config.mesh.num_processes=2",
                 f"--config.mesh.process_id={i}"),
            cwd=REPO, env=_env(2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}), stdout=out,
            stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, timeout: float) -> list[int | None]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    return [p.poll() for p in procs]


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


_VOLATILE = ("time", "created", "updated", "seconds", "wall_s", "generate_s", "critic_seconds", "run",
             "runs", "resumed_from", "usage", "tokens_per_s")


def _stable(obj, wd: str, approx: bool = False):
    """obj without wall-clock fields, with the workdir's path replaced by <wd> (approx: floats too)."""
    if isinstance(obj, dict):
        return {k: _stable(v, wd, approx) for k, v in obj.items() if k not in _VOLATILE and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_stable(v, wd, approx) for v in obj]
    if isinstance(obj, str):
        return obj.replace(wd, "<wd>")
    if approx and isinstance(obj, float):
        return pytest.approx(obj, rel=1e-5, abs=1e-9)
    return obj


def _jsonl(path: str) -> list[dict]:
    from automem_jax import storage
    return [json.loads(x) for x in storage.read_text(path).splitlines() if x.strip()]


def _json(path: str):
    from automem_jax import storage
    return json.loads(storage.read_text(path))


def test_two_process_main_job_matches_one_process_and_survives_losing_a_host(tmp_path, gcs_emulator):
    from automem_jax import storage
    ref, wd = f"{gcs_emulator}/runs/one", str(tmp_path / "two")
    logs = [str(tmp_path / "p0.log"), str(tmp_path / "p1.log")]
    with ScriptedCriticServer([_critic_reply] * 200) as srv:
        # The reference: one process owning all 4 devices, its workdir on the GCS emulator.
        r = subprocess.run(_cmd(ref, srv.base_url), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                           env=_env(4, {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}))
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        ref_calls = [_kind(b) for b in srv.requests]
        del srv.requests[:]

        # Two processes; process 1 dies once Loop 2's training wrote its first checkpoint.
        procs = _start_pair(wd, srv.base_url, logs)
        ckpt = os.path.join(wd, "loop2", "0", "train", "checkpoints", "2")
        deadline = time.time() + TIMEOUT_S
        while not os.path.exists(ckpt) and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        # Process 0 loses its peer in a collective or at the coordinator and stops; give it a while.
        codes = _wait_all(procs, 240)
        _kill_all(procs)
        first = open(logs[0]).read()
        assert os.path.exists(ckpt), first[-4000:]
        assert codes[0] != 0, "process 0 finished although process 1 was killed"
        assert not os.path.exists(os.path.join(wd, "stages", "loop2", "DONE"))
        dataset_done = os.path.getmtime(os.path.join(wd, "datasets", "0", "DONE"))
        marks = [len(open(p).read()) for p in logs]

        procs = _start_pair(wd, srv.base_url, logs)
        codes = _wait_all(procs, TIMEOUT_S)
        _kill_all(procs)
        again = [open(p).read()[m:] for p, m in zip(logs, marks)]
        assert codes == [0, 0], "\n".join(a[-3000:] for a in again)
        two_calls = [_kind(b) for b in srv.requests]

    for out in again:
        for name in ("bootstrap", "baseline", "loop1", "collect"):
            assert f"stage {name}: already done" in out
    # Both hosts resumed Loop 2's training from the same step (process 0 chose it for both).
    resumed = [re.findall(r"resumed from step (\d+)", a) for a in again]
    assert resumed[0] and resumed[0] == resumed[1], resumed
    assert int(resumed[0][0]) >= 2
    assert os.path.getmtime(os.path.join(wd, "datasets", "0", "DONE")) == dataset_done
    rows = _jsonl(os.path.join(wd, "loop2", "0", "train", "train_log.jsonl"))
    assert [x["step"] for x in rows] == list(range(1, 7))

    # The critic: one proposal (Loop 1's single attempt), judge batches as in the one-process run,
    # none repeated by the second attempt (its units were finished).
    assert ref_calls.count("proposal") == 1 and two_calls == ref_calls, (ref_calls, two_calls)

    # Written once, by process 0, and the same as one process over the same 4 devices.
    for path in (("eval", "baseline", "summary.json"),):
        a, b = (_json(storage.join(d, *path)) for d in (ref, wd))
        assert _stable(b, wd) == _stable(a, ref, approx=True), path
    for path in (("structures", "archive.jsonl"), ("ledger.jsonl",)):
        a, b = (_jsonl(storage.join(d, *path)) for d in (ref, wd))
        assert len(b) == len(a) and _stable(b, wd) == _stable(a, ref, approx=True), path
    for stage in ("bootstrap", "baseline", "loop1", "collect", "loop2", "final_eval", "export", "report"):
        assert os.path.exists(os.path.join(wd, "stages", stage, "DONE")), stage
    assert not [n for _, _, files in os.walk(wd) for n in files if n.startswith(".tmp-")]
    _check_artifacts(ref, str(tmp_path / "export"))


def _check_artifacts(wd: str, local: str) -> None:
    """What a user takes from a finished run (here on gs://): traces, archive, datasets, ledger,
    checkpoints, report and the export, which loads in transformers."""
    from automem_jax import storage

    def exists(*parts):
        return storage.exists(storage.join(wd, *parts))
    for stage in ("bootstrap", "baseline", "loop1", "collect", "loop2", "final_eval", "export", "report"):
        assert exists("stages", stage, "DONE"), stage
    for path in ("config.json", "bootstrap/tokenizer/tokenizer.json", "traces_collect/traces/craftax/Craftax-Classic/"
                 "ep_0.jsonl", "datasets/0/selected.jsonl", "datasets/0/review_decisions.jsonl",
                 "export/hf/config.json", "export/hf/model.safetensors", "export/hf/tokenizer.json",
                 "export/peft/adapter_config.json"):
        assert exists(*path.split("/")), path
    assert storage.listdir(storage.join(wd, "loop2", "0", "train", "checkpoints"))
    archive = _jsonl(storage.join(wd, "structures", "archive.jsonl"))
    assert archive and all("status" in row for row in archive)
    ledger = _jsonl(storage.join(wd, "ledger.jsonl"))
    assert len(ledger) == 1 and ledger[0]["n_examples"] >= 1
    assert ledger[0]["decision"]["by"] == "initial" and "recipe" in ledger[0]["decision"]
    summary = _json(storage.join(wd, "eval", "final", "summary.json"))
    assert {"model_error_rate", "fallback_rate", "context_overflow_rate"} <= set(summary["health"])
    report = storage.read_text(storage.join(wd, "report", "index.md"))
    assert "baseline" in report.lower() and "redundant" in report.lower() and "fallback" in report.lower()
    assert "## Held-out seeds" in report and "| held-out | held out: reported only | 50-51 |" in report
    assert any(n.endswith(".png") for n in storage.listdir(storage.join(wd, "report")))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.makedirs(local)
    for name in storage.listdir(storage.join(wd, "export", "hf")):
        storage.download_file(storage.join(wd, "export", "hf", name), os.path.join(local, name))
    hf_model = AutoModelForCausalLM.from_pretrained(local)
    # The bootstrap's domain tokenizer travels with the export and matches the model's vocabulary.
    tok = AutoTokenizer.from_pretrained(local)
    assert len(tok) <= hf_model.config.vocab_size <= 4096 and hf_model.config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "<|READ|>strategy.txt<|END|>"}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()
