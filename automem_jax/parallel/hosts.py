"""Multi-host coordination: one host talks to the outside and writes the workdir, all agree.

Every host runs the same command. Anything whose answer could differ between hosts (a critic or
judge reply, which units a resumed run has finished, which checkpoint step is newest) is computed
on process 0 and handed to the others with `primary(fn, tag)`, so every host feeds identical
inputs to the SPMD programs. The hand-off goes through the coordinator's key-value store (the one
`jax.distributed.initialize` starts), not a device collective: a critic call or an evaluation can
keep the other hosts waiting for minutes or hours, which device collectives time out on, and the
store carries text as it is. One process: every function is a plain call.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import pickle
from typing import Any, Callable

log = logging.getLogger("automem_jax")

_calls = itertools.count()  # the same sequence on every host: the hosts run the same code path
_solo = 0  # > 0 while process 0 runs a primary() body alone: nested hand-offs are plain calls
WAIT_LOG_S = 600  # a waiting host logs once per this many seconds


class HostsDiverged(RuntimeError):
    """Two hosts reached different hand-offs: a bug (some code path ran on one host only)."""


class PrimaryFailed(RuntimeError):
    """What process 0 raised, on a host whose copy of the exception could not be rebuilt."""


def count() -> int:
    import sys
    jax = sys.modules.get("jax")
    return 1 if jax is None else jax.process_count()


def index() -> int:
    import sys
    jax = sys.modules.get("jax")
    return 0 if jax is None else jax.process_index()


def is_primary() -> bool:
    return index() == 0


def kv_client():
    """The coordinator's key-value store (started by jax.distributed.initialize)."""
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-host coordination needs jax.distributed.initialize() (mesh.multi_host)")
    return client


def kv_wait(key: str, what: str = "") -> str:
    """The value of `key`, waiting without a deadline (process 0 may work for hours). If process 0
    dies the coordinator goes with it and the get raises, so a dead primary never hangs a host."""
    kv = kv_client()
    while True:
        try:
            return kv.blocking_key_value_get(key, WAIT_LOG_S * 1000)
        except Exception as e:  # noqa: BLE001 - the coordinator's timeout error has no public type
            if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                raise
            log.info("process %d: waiting for process 0 (%s)", index(), what or key)


def barrier(tag: str, timeout_s: float = 24 * 3600) -> None:
    """Every host reaches `tag` before any goes on (what process 0 wrote before it is visible)."""
    if count() > 1:
        if _solo:
            raise HostsDiverged(f"barrier {tag!r} inside a primary() body: the other hosts are not there")
        kv_client().wait_at_barrier(tag.replace(" ", "_"), int(timeout_s * 1000))


def _exception_payload(e: BaseException) -> dict:
    out = {"error": f"{type(e).__name__}: {e}"}
    try:
        blob = pickle.dumps(e)
        pickle.loads(blob)  # an exception whose __init__ takes other arguments cannot come back
        out["exception"] = base64.b64encode(blob).decode("ascii")
    except Exception:  # noqa: BLE001 - the text is enough then
        pass
    return out


def primary(fn: Callable[[], Any], tag: str) -> Any:
    """fn() run on process 0; every host returns the same JSON value (process 0 included, so
    tuples become lists everywhere). If fn raises on process 0, every host raises it."""
    global _solo
    if count() == 1 or _solo:
        return fn()
    n = next(_calls)
    key = f"automem/primary/{n}"
    if is_primary():
        _solo += 1
        try:
            value = json.loads(json.dumps(fn(), default=str))
        except BaseException as e:
            _solo -= 1
            kv_client().key_value_set(key, json.dumps({"tag": tag, **_exception_payload(e)}))
            raise
        _solo -= 1
        kv_client().key_value_set(key, json.dumps({"tag": tag, "value": value}))
        return value
    got = json.loads(kv_wait(key, tag))
    if got["tag"] != tag:
        raise HostsDiverged(f"hand-off {n}: process 0 was at {got['tag']!r}, process {index()} at {tag!r}")
    if "error" in got:
        if "exception" in got:
            raise pickle.loads(base64.b64decode(got["exception"]))
        raise PrimaryFailed(f"process 0 failed at {tag!r}: {got['error']}")
    return got["value"]
