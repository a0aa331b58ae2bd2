"""One process of tests/test_hosts.py: joins a 2-process jax.distributed group on 127.0.0.1 and
exercises automem_jax.parallel.hosts and storage.share, writing what it saw as JSON."""
import json
import os
import sys

import jax

pid, port, out, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from automem_jax import storage  # noqa: E402
from automem_jax.loops.loop2_data import NotEnoughExamples  # noqa: E402
from automem_jax.parallel import hosts  # noqa: E402

seen: dict = {}
calls = []


def mine():
    calls.append(pid)  # runs on process 0 only
    return {"who": jax.process_index(), "pair": (1, 2)}


seen["value"] = hosts.primary(mine, "value")
seen["calls"] = list(calls)
seen["nested"] = hosts.primary(lambda: hosts.primary(lambda: "inner", "inner") + "!", "outer")


def not_enough():
    raise NotEnoughExamples(0, 5, {"candidates": 3})


try:
    hosts.primary(not_enough, "not enough")
except NotEnoughExamples as e:
    seen["error"] = [type(e).__name__, e.selected, e.min_examples, e.stats]


class Odd(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from its args
        super().__init__(f"odd {a} {b}")


def odd():
    raise Odd(1, 2)


try:
    hosts.primary(odd, "odd")
except Exception as e:  # noqa: BLE001
    seen["odd"] = [type(e).__name__, str(e)]

storage.share(root)
try:
    storage.write_text(os.path.join(root, "sub", f"from{pid}.txt"), "x")
    seen["write"] = "ok"
except RuntimeError as e:
    seen["write"] = str(e)
storage.write_text(f"{out}.outside", "a host's own files are its own")
hosts.barrier("before divergence")
try:
    hosts.primary(lambda: 1, f"tag of process {pid}")
    seen["diverged"] = None
except hosts.HostsDiverged as e:
    seen["diverged"] = str(e)
with open(out, "w") as f:
    json.dump(seen, f)
