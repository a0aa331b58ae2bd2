"""NetHack / MiniHack episodes in worker processes, stepped in batches.

Slot ``i`` lives in worker ``i % num_workers``; one ``step_batch`` sends each worker all of its
slots' actions in one message and collects the replies together, so workers step in parallel.

Crashes. NLE episodes are functions of (seed, executed actions) (see ``nethack.py``), and the pool
records both for every slot. When a worker dies (or hangs past the timeout) it is killed and
restarted, and every episode it hosted is rebuilt by replaying its actions; the rebuilt state is
checked against the hash of the last state the worker reported. Episodes that were not being stepped
are thus untouched; an episode whose step was in flight is retried (its step re-sent) up to
``max_retries`` times, then reported crashed: ``truncated=True`` with ``info["crashed"] = True`` and the
reason, after which the slot needs a reset. Episodes on other workers are never involved.

Shutdown. Workers ignore SIGINT, so Ctrl-C reaches only the parent, whose ``close()`` (also run by a
finalizer and at interpreter exit) stops them; a worker whose parent vanished sees its pipe close
and exits. Workers are started with "spawn": the parent may have JAX threads, which fork would copy.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait

from .base import BatchedTextEnv, EpisodeOverError, Obs, StepResult, resolve_action


def _worker_main(conn, task: str, env_kwargs: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .nethack import NetHackTextEnv

    envs: dict[int, NetHackTextEnv] = {}

    def env(slot):
        if slot not in envs:
            envs[slot] = NetHackTextEnv(task, **env_kwargs)
        return envs[slot]

    def reset(slot, seed):
        e = env(slot)
        obs = e.reset(seed)
        return obs, e.seed, e.state_hash()

    def step(slot, action):
        e = env(slot)
        out = e.step(action)
        return out, e.state_hash(), e.progression()

    def restore(slot, seed, actions):
        e = env(slot)
        return e.replay(seed, actions), e.progression()

    handlers = {"reset": reset, "step": step, "restore": restore}
    try:
        while True:
            try:
                cmd, items = conn.recv()
            except (EOFError, OSError):
                break
            if cmd == "close":
                break
            replies = []
            for item in items:
                try:
                    replies.append(("ok", handlers[cmd](*item)))
                except Exception as e:  # one episode's failure must not take the others down
                    replies.append(("error", f"{type(e).__name__}: {e}"))
            conn.send(replies)
    finally:
        for e in envs.values():
            e.close()
        conn.close()


class _Worker:
    def __init__(self, ctx, task, env_kwargs):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, task, env_kwargs), daemon=True,
                                name="automem-nle-worker")
        self.proc.start()
        child.close()

    def stop(self, timeout: float = 2.0) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("close", None))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(1.0)
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        w.stop()


class WorkerCrashed(RuntimeError):
    """A worker died and could not be brought back (used for resets, which have no crash result)."""


class NLEWorkerPool(BatchedTextEnv):
    """``num_envs`` NetHack/MiniHack episodes of one task in ``num_workers`` processes.

    ``env_kwargs`` go to ``NetHackTextEnv`` in each worker. ``step_timeout_s`` bounds one batched
    step (a worker that overruns it is treated as dead); ``restore_timeout_s`` bounds a replay.
    """

    def __init__(self, task: str = "NetHackChallenge-v0", num_envs: int = 1, num_workers: int | None = None,
                 *, max_retries: int = 2, step_timeout_s: float = 60.0, restore_timeout_s: float = 600.0,
                 **env_kwargs):
        from .nethack import NetHackTextEnv

        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        num_workers = min(num_envs, os.cpu_count() or 1) if num_workers is None else num_workers
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        # Built here once so a bad task or keyword fails in the caller, with the env's own message.
        probe = NetHackTextEnv(task, **env_kwargs)
        self.task, self.actions = probe.task, probe.actions
        self.default_action, self.instruction = probe.default_action, probe.instruction
        self._valid = set(probe.actions)
        probe.close()
        self.num_envs, self.num_workers = num_envs, min(num_workers, num_envs)
        self.max_retries, self.step_timeout_s, self.restore_timeout_s = max_retries, step_timeout_s, restore_timeout_s
        self._env_kwargs = dict(env_kwargs)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self._seed: list[int | None] = [None] * num_envs
        self._history: list[list[str]] = [[] for _ in range(num_envs)]
        self._hash: list[int | None] = [None] * num_envs
        self._live = [False] * num_envs
        self._last: list[Obs | None] = [None] * num_envs
        self._prog = [0.0] * num_envs
        self._lost: dict[int, str] = {}
        self.restarts = 0
        for _ in range(self.num_workers):
            self._workers.append(_Worker(self._ctx, self.task, self._env_kwargs))

    # -- public --------------------------------------------------------------------------------------
    def worker_of(self, index: int) -> int:
        return index % self.num_workers

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def progression(self, index: int) -> float:
        self._check_index(index)
        return self._prog[index]

    def close(self) -> None:
        self._finalizer()

    def reset_batch(self, seeds: Sequence[int | None] | None = None,
                    indices: Sequence[int] | None = None) -> list[Obs]:
        self._check_open()
        sd, idx = self._resolve_indices(seeds, indices)
        for s in sd:
            if s is not None and (not isinstance(s, int) or s < 0):
                raise ValueError(f"seeds must be None or integers >= 0, got {s!r}")
        pending = dict(zip(idx, sd))
        out: dict[int, Obs] = {}
        tries = 0
        while pending:
            replies = self._roundtrip("reset", {i: (s,) for i, s in pending.items()}, self.step_timeout_s)
            failed = {}
            for i, (status, payload) in replies.items():
                if status == "ok":
                    obs, seed, h = payload
                    self._seed[i], self._hash[i], self._history[i] = seed, h, []
                    self._live[i], self._last[i], self._prog[i] = True, obs, 0.0
                    self._lost.pop(i, None)
                    out[i] = obs
                elif not payload.startswith("worker"):
                    raise RuntimeError(f"{self.task} slot {i} failed to reset: {payload}")
                else:
                    failed[i] = payload
            if failed:
                tries += 1
                if tries > self.max_retries:
                    raise WorkerCrashed(f"could not reset slots {sorted(failed)}: {failed}")
                pending = {i: pending[i] for i in failed}
            else:
                pending = {}
        return [out[i] for i in idx]

    # -- stepping ------------------------------------------------------------------------------------
    def _step_slots(self, actions: dict[int, str]) -> dict[int, StepResult]:
        self._check_open()
        results: dict[int, StepResult] = {}
        infos, pending = {}, {}
        for i, a in actions.items():
            if i in self._lost:
                results[i] = self._crashed(i, resolve_action(a, self._valid, self.default_action)[1],
                                           self._lost.pop(i), 0)
                continue
            if not self._live[i]:
                raise EpisodeOverError(f"{self.task} slot {i} has no running episode; reset it first")
            executed, infos[i] = resolve_action(a, self._valid, self.default_action)
            pending[i] = executed
        attempts = {i: 0 for i in pending}
        while pending:
            replies = self._roundtrip("step", {i: (a,) for i, a in pending.items()}, self.step_timeout_s)
            retry = {}
            for i, (status, payload) in replies.items():
                if status == "ok":
                    (obs, reward, terminated, truncated, info), h, prog = payload
                    self._history[i].append(pending[i])
                    self._hash[i], self._prog[i], self._last[i] = h, prog, obs
                    self._live[i] = not (terminated or truncated)
                    info.update(infos[i])
                    if attempts[i]:
                        info["retried"] = attempts[i]
                    results[i] = StepResult(obs, reward, terminated, truncated, info)
                    continue
                attempts[i] += 1
                if i in self._lost or attempts[i] > self.max_retries:
                    results[i] = self._crashed(i, infos[i], self._lost.pop(i, payload), attempts[i])
                    continue
                if not payload.startswith("worker"):
                    # The episode raised inside a healthy worker: rebuild just it before retrying.
                    self._restore(self.worker_of(i), [i])
                    if i in self._lost:
                        results[i] = self._crashed(i, infos[i], self._lost.pop(i), attempts[i])
                        continue
                retry[i] = pending[i]
            pending = retry
        return results

    def _crashed(self, i: int, info: dict, reason: str, attempts: int) -> StepResult:
        self._live[i] = False
        info = dict(info, crashed=True, error=reason, attempts=attempts, seed=self._seed[i],
                    step=len(self._history[i]))
        return StepResult(self._last[i], 0.0, False, True, info)

    # -- transport and recovery ----------------------------------------------------------------------
    def _roundtrip(self, cmd: str, items: dict[int, tuple], timeout: float) -> dict[int, tuple]:
        """Send per-slot requests to their workers at once; returns slot -> (status, payload).

        A dead or overdue worker is restarted (its other episodes rebuilt) and its slots come back as
        ("error", "worker ...").
        """
        by_worker: dict[int, list[int]] = {}
        for i in items:
            by_worker.setdefault(self.worker_of(i), []).append(i)
        out: dict[int, tuple] = {}
        waiting: dict = {}
        for w, slots in by_worker.items():
            try:
                self._workers[w].conn.send((cmd, [(i, *items[i]) for i in slots]))
                waiting[self._workers[w].conn] = w
            except (OSError, ValueError):
                out.update(self._recover(w, slots, self._death_reason(w)))
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                ready = wait(list(waiting), max(0.0, deadline - time.monotonic()))
                if not ready:
                    for conn, w in list(waiting.items()):
                        del waiting[conn]
                        out.update(self._recover(w, by_worker[w], f"worker timed out after {timeout:g} s"))
                    break
                for conn in ready:
                    w = waiting.pop(conn)
                    try:
                        replies = conn.recv()
                    except (EOFError, OSError):
                        out.update(self._recover(w, by_worker[w], self._death_reason(w)))
                        continue
                    out.update(zip(by_worker[w], replies))
        except BaseException:
            # Interrupted mid-exchange (e.g. Ctrl-C): replies in flight would desynchronise the pipes.
            self.close()
            raise
        return out

    def _death_reason(self, w: int) -> str:
        proc = self._workers[w].proc
        proc.join(0.5)
        code = proc.exitcode
        if code is not None and code < 0:
            return f"worker died (killed by {signal.Signals(-code).name})"
        return f"worker died (exit code {code})"

    def _recover(self, w: int, in_flight: list[int], reason: str) -> dict[int, tuple]:
        old = self._workers[w]
        old.stop(timeout=0.5)
        self.restarts += 1
        self._workers[w] = _Worker(self._ctx, self.task, self._env_kwargs)
        hosted = [i for i in range(self.num_envs) if self.worker_of(i) == w and self._live[i]]
        self._restore(w, hosted)
        return {i: ("error", f"{reason}; restarted") for i in in_flight}

    def _restore(self, w: int, slots: list[int], depth: int = 0) -> None:
        """Replay ``slots`` on worker ``w``; a slot that cannot be rebuilt exactly is marked lost."""
        slots = [i for i in slots if self._live[i] and i not in self._lost]
        if not slots:
            return
        conn = self._workers[w].conn
        try:
            conn.send(("restore", [(i, self._seed[i], list(self._history[i])) for i in slots]))
            if not conn.poll(self.restore_timeout_s):
                raise TimeoutError
            replies = conn.recv()
        except (OSError, EOFError, ValueError, TimeoutError):
            if depth >= self.max_retries:
                for i in slots:
                    self._lost[i] = "worker kept dying while its episodes were rebuilt"
                return
            self._workers[w].stop(timeout=0.5)
            self.restarts += 1
            self._workers[w] = _Worker(self._ctx, self.task, self._env_kwargs)
            return self._restore(w, slots, depth + 1)
        for i, (status, payload) in zip(slots, replies):
            if status != "ok":
                self._lost[i] = f"episode could not be rebuilt: {payload}"
            elif payload[0] != self._hash[i]:
                self._lost[i] = "episode could not be rebuilt: replay diverged"

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this NLEWorkerPool is closed")
