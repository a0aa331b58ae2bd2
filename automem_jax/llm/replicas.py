"""Managed serving replicas: existing OpenAI-compatible engines run beside our process.

At pod scale the rollouts are served by an established engine (vLLM on TPU via ``tpu-inference``,
vLLM on GPU, SGLang-JAX), started per host from a command template, as upstream AutoMem served
its policy with ``vllm serve`` between training phases. This module owns their life:

* ``ReplicaSet`` starts ``replicas`` servers on this host from ``ReplicaConfig.command`` (a
  template over ``{python} {checkpoint} {tokenizer} {port} {host} {model} {max_len} {max_batch}
  {seed} {tensor} {lora_rank} {index}``; ``{index}`` is the replica's number on this host, e.g. for
  ``env TPU_VISIBLE_CHIPS={index} ...`` or ``taskset -c {index} ...``; no shell runs it), waits
  until each answers ``GET /health``, and keeps them up: a monitor thread restarts a replica whose
  process exits (at most ``max_restarts`` times each) and loads its LoRA adapters again. ``stop()`` ends them (SIGTERM to the process group, then SIGKILL); a
  replica also gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so none is left orphaned.
* LoRA adapters go in at run time through vLLM's protocol (``POST /v1/load_lora_adapter`` with
  ``lora_name`` / ``lora_path``; vLLM needs ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); the adapter is then a model name beside the base.
* ``ReplicaClient`` is an ``AsyncClient`` for one served model name over every endpoint of the set
  (this host's replicas, plus other hosts' in a multi-host run): each request goes to the replica
  with the fewest requests in flight. A request whose replica failed (its process exited, or it no
  longer answers /health) is sent again to a live one, so a crashed replica costs time, never an
  episode; a request the replica refused on its merits (it is healthy) keeps its error.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import os
import shlex
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Collection, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from automem_jax import storage
from automem_jax.agent.types import ChatRequest, Completion

log = logging.getLogger(__name__)

PLACEHOLDERS = ("python", "checkpoint", "tokenizer", "port", "host", "model", "max_len", "max_batch", "seed",
                "tensor", "lora_rank", "index")
REQUIRED = ("checkpoint", "port")

# Our own server: the CPU stand-in and the replica the tests manage.
OWN_SERVER = ("{python} -m automem_jax.llm.server --checkpoint {checkpoint} --port {port} "
              "--host {host} --served_model_name {model} --max_len {max_len} --max_batch {max_batch} --seed {seed} "
              "--enable_lora")
# vLLM (TPU through tpu-inference, or GPU) in its own Python 3.12 environment; tensor parallel over
# the host's chips. Needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for runtime adapters.
VLLM = ("vllm serve {checkpoint} --host {host} --port {port} --served-model-name {model} "
        "--tensor-parallel-size {tensor} --max-model-len {max_len} --max-num-seqs {max_batch} --seed {seed} "
        "--enable-prefix-caching --enable-lora --max-lora-rank {lora_rank} --max-loras 2")


class ReplicaError(RuntimeError):
    """A replica could not be started or brought back (the message holds the end of its log)."""


def check_command(template: str) -> None:
    """Raises ValueError for an empty template, an unknown placeholder or a missing required one."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the command template is empty")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"the command template {template!r} is malformed: {e}") from None
    unknown = sorted(names - set(PLACEHOLDERS))
    if unknown:
        names = ", ".join("{" + u + "}" for u in unknown)
        raise ValueError(f"the command template has unknown placeholder(s) {names}; "
                         f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    missing = [r for r in REQUIRED if r not in names]
    if missing:
        raise ValueError(f"the command template must contain {', '.join('{' + m + '}' for m in missing)}")


@dataclasses.dataclass
class ReplicaConfig:
    command: str = OWN_SERVER
    replicas: int = 1  # servers per host (each on its own chips, e.g. tensor parallel within the host)
    host: str = "127.0.0.1"  # interface the replicas bind
    advertise: str = ""  # the address other hosts use; "" = host, or this machine's address for 0.0.0.0
    base_port: int = 8100  # replica i listens on base_port + i; 0 = any free port
    health_timeout_s: float = 900.0  # a 32B checkpoint takes minutes to load and compile
    request_timeout_s: float = 600.0
    api_key_env: str = ""  # the variable holding the key the replicas expect ("" = no auth)
    max_restarts: int = 3  # per replica
    max_concurrency: int = 64  # requests in flight per replica
    env: Mapping[str, str] | str = ""  # added to the replicas' environment: a mapping or "A=1,B=2"
    log_dir: str = ""  # "" = a folder under the system temp dir

    def __post_init__(self):
        check_command(self.command)
        for name in ("replicas", "max_concurrency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.base_port, int) or not (self.base_port == 0 or 1024 <= self.base_port <= 65535 - 64):
            raise ValueError(f"base_port must be 0 (any free port) or in 1024..65471, got {self.base_port!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        for name in ("health_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.env, str):
            pairs = [p.partition("=") for p in self.env.split(",") if p.strip()]
            if any(not sep or not k.strip() for k, sep, _ in pairs):
                raise ValueError(f"env must look like NAME=value,NAME2=value, got {self.env!r}")
            self.env = {k.strip(): v for k, _, v in pairs}
        if not isinstance(self.env, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.env.items()):
            raise ValueError(f"env must map variable names to strings, got {self.env!r}")

    @classmethod
    def from_any(cls, spec) -> "ReplicaConfig":
        if isinstance(spec, cls):
            return spec
        d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def advertised_host(self) -> str:
        if self.advertise:
            return self.advertise
        if self.host in ("0.0.0.0", "::", ""):
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return self.host


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return s.getsockname()[1]


# Exec'd in front of every replica command: the replica gets SIGTERM when the thread that started it
# ends (PR_SET_PDEATHSIG survives exec), so a killed job leaves no replica behind. A wrapper rather
# than preexec_fn, which would fork a multithreaded (JAX) process.
_GUARD = ("import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
          "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execvp(sys.argv[2], sys.argv[2:])")


def local_copy(path: str, cache: str) -> str:
    """A gs:// folder copied once to local disk (engines read local folders); local paths as they are."""
    if not storage.is_gcs(path):
        return path
    dst = os.path.join(cache, hashlib.sha1(path.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(dst, ".complete")):
        storage.copy_tree(path, dst)
        open(os.path.join(dst, ".complete"), "w").close()
    return dst


class _Replica:
    def __init__(self, index: int, port: int, advertise: str, log_path: str):
        self.index, self.port, self.log_path = index, port, log_path
        self.url = f"http://{advertise}:{port}"
        self.proc: subprocess.Popen | None = None
        self.up = False
        self.failed = False  # gave up after max_restarts
        self.restarts = 0
        self.in_flight = 0
        self.served = 0
        self.endpoint = None  # OpenAIEndpoint for /health and the adapter calls

    def spawn(self, argv: list[str], env: dict) -> None:
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), *argv],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        with open(self.log_path[:-len(".log")] + ".pid", "w") as f:  # for operators (and the tests)
            f.write(f"{self.proc.pid}\n")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self, timeout: float = 20.0) -> None:
        p, self.proc, self.up = self.proc, None, False
        if p is None or p.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


class ReplicaSet:
    """This host's replicas of one model (see the module docstring). `remote` lists other hosts'
    endpoints (``http://host:port``), which requests also use but which their own host keeps up."""

    _live: "weakref.WeakSet[ReplicaSet]" = weakref.WeakSet()

    def __init__(self, cfg: ReplicaConfig, checkpoint: str, *, model: str = "policy", tokenizer: str = "",
                 max_len: int = 2048, max_batch: int = 16, seed: int = 0, tensor: int = 1, lora_rank: int = 64,
                 host_index: int = 0):
        self.cfg = cfg
        self.model = model
        self.log_dir = cfg.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "automem_jax_replicas")
        cache = os.path.join(self.log_dir, "cache")
        ckpt = local_copy(checkpoint, cache) if checkpoint and not checkpoint.startswith(("preset:", "pkg:")) \
            else checkpoint
        self.fields = dict(python=sys.executable, checkpoint=ckpt, tokenizer=tokenizer or ckpt, host=cfg.host,
                           model=model, max_len=max_len, max_batch=max_batch, seed=seed, tensor=tensor,
                           lora_rank=lora_rank)
        # vLLM refuses /v1/load_lora_adapter without it; other servers ignore it.
        self.env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **dict(cfg.env)}
        self.adapters: dict[str, str] = {}  # name -> local folder, loaded again after a restart
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise ValueError(f"environment variable {cfg.api_key_env} (api_key_env) is not set or empty")
        adv = cfg.advertised_host()
        ports = [cfg.base_port + i if cfg.base_port else _free_port(cfg.host) for i in range(cfg.replicas)]
        self.local = [_Replica(i, p, adv, os.path.join(self.log_dir, f"host{host_index}_replica{i}.log"))
                      for i, p in enumerate(ports)]
        self.remote: list[_Replica] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._monitor: threading.Thread | None = None
        self.started = False

    # -- endpoints --
    @property
    def endpoints(self) -> list[_Replica]:
        return self.local + self.remote

    @property
    def local_urls(self) -> list[str]:
        return [r.url for r in self.local]

    def add_remote(self, urls) -> None:
        """Other hosts' replicas (``http://host:port``): requests use them too; their hosts keep them up."""
        with self._cond:
            for url in urls:
                r = _Replica(len(self.endpoints), 0, "", "")
                r.url, r.up = url.rstrip("/"), True
                self.remote.append(r)
            self._cond.notify_all()

    def _argv(self, r: _Replica) -> list[str]:
        return shlex.split(self.cfg.command.format(**{**self.fields, "port": r.port, "index": r.index}))

    # -- life --
    def start(self) -> "ReplicaSet":
        """Starts every local replica and waits until all answer /health (ReplicaError otherwise,
        with the failing replica's log)."""
        if self.started:
            return self
        ReplicaSet._live.add(self)
        self.started = True
        # Spawned from this thread: PR_SET_PDEATHSIG fires when the spawning thread ends.
        for r in self.local:
            log.info("replica %d: starting %s (log %s)", r.index, shlex.join(self._argv(r)), r.log_path)
            r.spawn(self._argv(r), self.env)
        deadline = time.monotonic() + self.cfg.health_timeout_s
        try:
            for r in self.local:
                self._wait_healthy(r, deadline)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="replica-monitor", daemon=True)
        self._monitor.start()
        return self

    def _wait_healthy(self, r: _Replica, deadline: float, mark_up: bool = True) -> None:
        while True:
            if r.exited():
                raise ReplicaError(f"replica {r.index} ({r.url}) exited with code {r.proc.returncode} before it "
                                   f"was healthy; the end of {r.log_path}:\n{r.log_tail()}")
            if self._healthy(r, timeout=2.0):
                if mark_up:
                    self._mark_up(r)
                log.info("replica %d: healthy at %s", r.index, r.url)
                return
            if time.monotonic() > deadline:
                raise ReplicaError(f"replica {r.index} ({r.url}) did not answer /health within "
                                   f"{self.cfg.health_timeout_s:g}s; the end of {r.log_path}:\n{r.log_tail()}")
            time.sleep(0.25)

    def _endpoint(self, r: _Replica):
        from automem_jax.llm.openai_http import OpenAIEndpoint
        if r.endpoint is None:
            r.endpoint = OpenAIEndpoint(r.url + "/v1", self.model, api_key_env=self.cfg.api_key_env or None,
                                        timeout=self.cfg.health_timeout_s, max_retries=0)
        return r.endpoint

    def _healthy(self, r: _Replica, timeout: float = 5.0) -> bool:
        from automem_jax.llm.openai_http import EndpointError
        try:
            self._endpoint(r).get_json("/health", timeout=timeout, max_retries=0)
            return True
        except EndpointError:
            return False

    def _mark_up(self, r: _Replica) -> None:
        with self._cond:
            r.up = True
            self._cond.notify_all()

    def _watch(self) -> None:
        """Restarts local replicas whose process exited; marks endpoints up again once healthy."""
        while not self._stopping:
            for r in self.endpoints:
                if self._stopping:
                    return
                if r in self.local and r.exited() and not r.failed:
                    self._restart(r)
                elif not r.up and not r.failed and (r.proc is None or not r.exited()) and self._healthy(r, 2.0):
                    self._mark_up(r)
            time.sleep(0.2)

    def _restart(self, r: _Replica) -> None:
        with self._cond:
            r.up = False
        code = r.proc.returncode if r.proc else None
        while not self._stopping:
            if r.restarts >= self.cfg.max_restarts:
                log.error("replica %d exited (code %s) and was restarted %d times already; giving up on it",
                          r.index, code, r.restarts)
                with self._cond:
                    r.failed = True
                    self._cond.notify_all()
                return
            r.restarts += 1
            log.warning("replica %d exited (code %s); restart %d of %d", r.index, code, r.restarts,
                        self.cfg.max_restarts)
            r.kill()
            r.spawn(self._argv(r), self.env)
            try:
                # Up only once its adapters are back: a request for one must not reach it before.
                self._wait_healthy(r, time.monotonic() + self.cfg.health_timeout_s, mark_up=False)
                for name, path in self.adapters.items():
                    self._post(r, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
                self._mark_up(r)
                return
            except (ReplicaError, RuntimeError) as e:
                log.error("replica %d: restart failed: %s", r.index, e)
                with self._cond:
                    r.up = False
                code = r.proc.returncode if r.proc else None

    def stop(self, timeout: float = 30.0) -> None:
        """Stops every local replica (requests still running on them fail)."""
        self._stopping = True
        with self._cond:
            for r in self.endpoints:
                r.up = False
            self._cond.notify_all()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout)
        for r in self.local:
            r.kill(timeout)
        ReplicaSet._live.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- adapters --
    def _post(self, r: _Replica, path: str, body: dict) -> dict:
        from automem_jax.llm.openai_http import EndpointError
        try:
            return self._endpoint(r).post_json(path, body, max_retries=0)
        except EndpointError as e:
            raise RuntimeError(f"replica {r.index}: {e}") from None

    def load_adapter(self, name: str, path: str) -> None:
        """Loads a LoRA adapter (a PEFT folder, local or gs://) on every local replica under `name`."""
        if name in self.adapters:
            return
        folder = local_copy(path, os.path.join(self.log_dir, "cache"))
        self.adapters[name] = folder  # a replica restarting now loads it when it is back
        try:
            for r in self.local:
                if r.up:
                    self._post(r, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder})
        except RuntimeError:
            del self.adapters[name]
            raise
        log.info("adapter %s (%s) loaded on %d replica(s)", name, path, len(self.local))

    def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            for r in self.local:
                self._post(r, "/v1/unload_lora_adapter", {"lora_name": name})

    # -- request routing (ReplicaClient) --
    def acquire(self, exclude: Collection[int] = ()) -> _Replica:
        """The live endpoint with the fewest requests in flight (waits while none is up)."""
        deadline = time.monotonic() + self.cfg.health_timeout_s
        with self._cond:
            while True:
                live = [r for r in self.endpoints if r.up and r.index not in exclude]
                if not live:  # a retry may go back to the one it left once that is up again
                    live = [r for r in self.endpoints if r.up]
                if live:
                    r = min(live, key=lambda r: (r.in_flight, r.index))
                    r.in_flight += 1
                    return r
                if self._stopping or all(r.failed for r in self.endpoints):
                    raise ReplicaError("no replica is serving" + (" (stopped)" if self._stopping else
                                                                 "; every replica failed past max_restarts"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplicaError(f"no replica came back within {self.cfg.health_timeout_s:g}s")
                self._cond.wait(min(left, 1.0))

    def release(self, r: _Replica, ok: bool) -> None:
        with self._cond:
            r.in_flight -= 1
            r.served += int(ok)

    def check(self, r: _Replica) -> bool:
        """After a failed request: is the replica still serving? If not it is marked down (the
        monitor restarts a local one, or marks a remote one up when it answers again)."""
        if (r.proc is not None and r.exited()) or not self._healthy(r, 5.0):
            with self._cond:
                r.up = False
            return False
        return True

    def client(self, model: str | None = None, **sampling) -> "ReplicaClient":
        return ReplicaClient(self, model or self.model, **sampling)

    @property
    def stats(self) -> dict:
        return {"replicas": len(self.endpoints), "local": len(self.local),
                "restarts": sum(r.restarts for r in self.local),
                "served": [r.served for r in self.endpoints], "adapters": sorted(self.adapters)}


@atexit.register
def _stop_all() -> None:
    for rs in list(ReplicaSet._live):
        rs.stop(5.0)


class ReplicaClient:
    """``AsyncClient`` for one model name over a ReplicaSet (see the module docstring)."""

    def __init__(self, rset: ReplicaSet, model: str, *, temperature: float | None = 1.0, top_p: float | None = None,
                 max_tokens: int | None = None, extra_body: Mapping[str, Any] | None = None,
                 max_failovers: int = 8):
        from automem_jax.llm.client import OpenAIClient
        self.rset, self.model = rset, model
        self.max_failovers = max_failovers
        cfg = rset.cfg
        # Failover happens here, across replicas; each client tries its replica once.
        self._clients = {r.index: OpenAIClient(r.url + "/v1", model, api_key_env=cfg.api_key_env or None,
                                               timeout=cfg.request_timeout_s, max_retries=0,
                                               max_concurrency=cfg.max_concurrency, temperature=temperature,
                                               top_p=top_p, max_tokens=max_tokens, extra_body=extra_body)
                         for r in rset.endpoints}
        self._pool = ThreadPoolExecutor(len(self._clients) * cfg.max_concurrency, thread_name_prefix="replica")

    @property
    def model_id(self) -> str:
        return self.model

    def __repr__(self) -> str:
        return f"ReplicaClient(model={self.model!r}, replicas={[r.url for r in self.rset.endpoints]})"

    def _one(self, request: ChatRequest) -> Completion:
        tried: list[int] = []
        last = None
        for _ in range(self.max_failovers + 1):
            try:
                r = self.rset.acquire(exclude=tried)
            except ReplicaError as e:
                return Completion(text="", error=f"replicas: {e}" + (f" (last error: {last})" if last else ""),
                                  model_id=self.model)
            ok = False
            try:
                c = self._clients[r.index].generate([request])[0]
                ok = c.error is None
            finally:
                self.rset.release(r, ok)
            if ok or self.rset.check(r):
                return c  # answered, or refused by a healthy replica on the request's merits
            last = c.error
            tried.append(r.index)
            log.warning("replica %d (%s) failed a request (%s); sending it to another", r.index, r.url, c.error)
        return Completion(text="", error=f"replicas: gave up after {self.max_failovers + 1} attempts: {last}",
                          model_id=self.model)

    def submit(self, request: ChatRequest) -> "Future[Completion]":
        return self._pool.submit(self._one, request)

    def drive(self, pending: Collection[Future], timeout: float | None = None) -> None:
        from automem_jax.llm.client import DRIVE_TIMEOUT_S
        pending = list(pending)
        if pending and not any(f.done() for f in pending):
            wait(pending, timeout=DRIVE_TIMEOUT_S if timeout is None else timeout, return_when=FIRST_COMPLETED)

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        from automem_jax.llm.client import completion_of
        futs = [self.submit(r) for r in requests]
        wait(futs)
        return [completion_of(f, self.model) for f in futs]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self._clients.values():
            c.close()
