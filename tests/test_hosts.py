"""automem_jax.parallel.hosts on two real processes (jax.distributed on 127.0.0.1, gloo): process 0
runs a hand-off's body and every host gets its JSON value; nested hand-offs run plainly; process 0's
exception reaches the others (rebuilt when it can be, else PrimaryFailed); hosts that reach
different hand-offs are told so; and storage.share refuses workdir writes from process 1."""
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_primary_hand_offs_and_the_single_writer_on_two_processes(tmp_path):
    port, root = _free_port(), str(tmp_path / "workdir")
    # The worker runs as a script: put this checkout first, whatever copy is installed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "hosts_worker.py"), str(i), str(port),
                               outs[i], root], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    p0, p1 = (json.load(open(o)) for o in outs)

    assert p0["value"] == p1["value"] == {"who": 0, "pair": [1, 2]}  # process 0's value, as JSON everywhere
    assert p0["calls"] == [0] and p1["calls"] == []  # the body ran once, on process 0
    assert p0["nested"] == p1["nested"] == "inner!"
    assert p0["error"] == p1["error"] == ["NotEnoughExamples", 0, 5, {"candidates": 3}]
    assert p0["odd"] == ["Odd", "odd 1 2"]
    assert p1["odd"][0] == "PrimaryFailed" and "Odd: odd 1 2" in p1["odd"][1]
    assert p0["write"] == "ok" and "process 1 tried to write" in p1["write"]
    assert sorted(os.listdir(os.path.join(root, "sub"))) == ["from0.txt"]
    assert all(os.path.exists(o + ".outside") for o in outs)
    assert p0["diverged"] is None
    assert "process 0 was at 'tag of process 0', process 1 at 'tag of process 1'" in p1["diverged"]
