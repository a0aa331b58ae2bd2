"""Runs N episodes at once: env slots x MemoryAgent coroutines over one LLM client.

Two schedules (``mode``):

- ``async`` (the default for a client with ``submit``/``drive``): each agent's next request is
  submitted as soon as its previous completion arrives, so a long reply stalls only its own agent.
  One loop iteration: ``client.drive(in-flight futures)`` (progress until one is done) -> the done
  futures, in slot order -> those agents advance (submitting their next requests) -> every slot
  whose agent committed an action steps in ONE batched env call -> finished episodes are written and
  their slots restarted. Given the completions, the order of submissions is fixed (slot order, no
  wall clock), so with an engine stepped by `drive` every host of a multi-host run submits the same
  requests in the same order.
- ``tick`` (the default for a client with only ``generate``): each tick gathers the pending
  request of every live agent into one ``client.generate`` call (at most ``max_requests_per_call``
  per call), sends each agent its Completion, and steps every slot that committed an action.

Slots whose episode ends take the next seed at once. The traces depend only on the completions,
not on the schedule: a client whose replies are a function of the request gives the same traces in
both modes.

Resume: an episode is finished when its `ep_<k>.json` exists; a re-run skips those and starts any
half-written episode over (its JSONL is rewritten), so no episode is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from automem_jax import storage
from automem_jax.agent.memory_agent import MemoryAgent
from automem_jax.agent.types import Completion
from automem_jax.envs.base import with_invalid_notice
from automem_jax.llm.client import completion_of, safe_submit, submit_via_generate
from automem_jax.memory.structure import MemoryStructure
from automem_jax.rollout.traces import EpisodeTrace, dumps_pretty, env_task, load_finished, summarize

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Live:
    episode: int
    seed: int
    agent: MemoryAgent
    trace: EpisodeTrace
    obs: Any
    gen: Any = None
    request: Any = None  # the next request, not yet sent
    future: Any = None  # async mode: the request in flight
    action: str | None = None
    record: Any = None
    steps: int = 0


@dataclasses.dataclass
class RunStats:
    mode: str = ""  # "async" or "tick"
    ticks: int = 0  # loop iterations
    generate_calls: int = 0  # tick: client.generate calls; async: client.drive calls
    requests: int = 0  # requests sent to the client
    agent_steps: int = 0
    env_steps: int = 0  # slot steps
    env_calls: int = 0  # batched env calls (step_batch)
    max_in_flight: int = 0  # most requests at the client at once (tick: the largest generate call)
    wall_s: float = 0.0
    generate_s: float = 0.0  # time in generate / drive
    env_s: float = 0.0


MODES = ("async", "tick")


def supports_submit(client) -> bool:
    return callable(getattr(client, "submit", None)) and callable(getattr(client, "drive", None))


class Runner:
    """Drives MemoryAgents over a batched TextEnv with any Client (see the module docstring).

    mode: "async", "tick", or None (async when the client has `submit` and `drive` and no
    `max_requests_per_call` is given). Async with a client that only has `generate` sends each
    request alone, answered at once.
    max_requests_per_call: tick mode only, a cap on one `generate` call (1 = unbatched baseline).
    feedback_on_invalid_action: after a step whose action was invalid, put a notice naming the
    action the env ran before the next observation's long-term block (BALROG's evaluator switch of
    that name). None: take it from env_kwargs["feedback_on_invalid_action"] (the env config's key),
    else off.
    """

    def __init__(self, client, structure: MemoryStructure, run_dir: str, env_name: str, *, num_envs: int = 8,
                 max_steps: int = 1000, two_model: bool = False, env_kwargs: dict | None = None,
                 progress: bool = True, max_requests_per_call: int | None = None,
                 writer: bool | None = None, mode: str | None = None,
                 feedback_on_invalid_action: bool | None = None):
        structure.validate()
        if num_envs < 1 or max_steps < 1:
            raise ValueError(f"num_envs and max_steps must be >= 1, got {num_envs}, {max_steps}")
        if mode is None:  # a cap on requests per generate call asks for the tick schedule
            mode = "async" if supports_submit(client) and not max_requests_per_call else "tick"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "async" and max_requests_per_call:
            raise ValueError("max_requests_per_call caps one generate call of mode='tick'; "
                             "mode='async' submits requests one at a time")
        self.mode = mode
        # Async with a generate-only client: each request alone, answered at once (nothing to drive).
        self._submit_to = safe_submit if supports_submit(client) else submit_via_generate
        self.client = client
        self.structure = structure
        self.run_dir = run_dir
        self.env_name = env_name
        self.env, self.task = env_task(env_name)
        self.num_envs = num_envs
        self.max_steps = max_steps
        self.two_model = two_model
        self.env_kwargs = dict(env_kwargs or {})
        # A harness switch, not an env keyword: taken out before the env is built.
        from_env = bool(self.env_kwargs.pop("feedback_on_invalid_action", False))
        self.feedback_on_invalid_action = (from_env if feedback_on_invalid_action is None
                                           else bool(feedback_on_invalid_action))
        self.progress = progress
        # 1 = one request at a time (the unbatched baseline of bench/generate.py).
        self.max_requests_per_call = max_requests_per_call
        self.trace_dir = storage.join(run_dir, "traces", self.env, self.task)
        self.stats = RunStats(mode=mode)
        self.episodes: list[dict] = []
        # Multi-host: every host plays the same episodes (the engine's calls are SPMD) and only the
        # first writes the shared run folder.
        self.writer = storage.primary_host() if writer is None else bool(writer)

    def run(self, seeds: Sequence[int]) -> dict:
        """Plays one episode per seed (episode k uses seeds[k]); returns and writes summary.json."""
        seeds = [int(s) for s in seeds]
        from automem_jax.parallel import hosts
        # Which episodes are finished, as process 0 reads it: every host resumes the same ones.
        found = hosts.primary(lambda: [load_finished(self.trace_dir, k) for k in range(len(seeds))],
                              f"finished episodes {self.trace_dir}")
        done = dict(enumerate(found))
        for k, ep in done.items():
            if ep is not None and ep.get("seed") != seeds[k]:
                raise ValueError(f"{self.trace_dir}/ep_{k}.json was played with seed {ep.get('seed')}, "
                                 f"but this run's seed list has {seeds[k]} there; use a fresh run folder")
        todo = deque(k for k in range(len(seeds)) if done[k] is None)
        if len(todo) < len(seeds):
            log.info("%s: %d of %d episodes already finished, resuming", self.trace_dir, len(seeds) - len(todo),
                     len(seeds))
        if todo:
            self._play(todo, seeds, done)
        # Every host holds every finished episode (played or loaded), so callers can summarize
        # without reading back files that only process 0 writes.
        self.episodes = [ep for ep in done.values() if ep is not None]
        summary = summarize(self.episodes)
        summary["run"] = {"env": self.env_name, "seeds": seeds, "max_steps": self.max_steps,
                          "structure": self.structure.label, "two_model": self.two_model,
                          **dataclasses.asdict(self.stats)}
        engine = getattr(self.client, "engine", None)
        if hasattr(engine, "stats"):  # a local engine: report its compiles and token counts too
            summary["run"]["engine"] = engine.stats.as_dict()
        if self.writer:
            storage.write_text(storage.join(self.run_dir, "summary.json"), dumps_pretty(summary))
        return summary

    # ---- the loop ------------------------------------------------------------------------------
    def _play(self, todo: deque, seeds: list[int], done: dict) -> None:
        from automem_jax.envs import make
        n = min(self.num_envs, len(todo))
        env = make(self.env_name, num_envs=n, **self.env_kwargs)
        bar = _progress(len(todo), self.progress, f"{self.env}/{self.task}")
        t_start = time.perf_counter()
        live: dict[int, _Live] = {}
        try:
            first = [todo.popleft() for _ in range(n)]
            obs = env.reset_batch([seeds[k] for k in first], list(range(n)))
            for slot, (k, o) in enumerate(zip(first, obs)):
                live[slot] = self._start(env, k, seeds[k], o)
            if self.mode == "async":
                self._play_async(env, live, todo, seeds, done, bar)
            else:
                while live:
                    self._tick(env, live, todo, seeds, done, bar)
        finally:
            for lv in live.values():
                if lv.future is not None:
                    lv.future.cancel()  # an aborted run leaves no request behind in the engine
                lv.trace.abort()
            env.close()
            bar.close()
            self.stats.wall_s += time.perf_counter() - t_start

    def _start(self, env, k: int, seed: int, obs) -> _Live:
        agent = MemoryAgent.for_env(self.structure, env, two_model=self.two_model)
        meta = {"env": self.env, "task": self.task, "env_name": self.env_name, "seed": seed,
                "structure": self.structure.label, "two_model": self.two_model}
        return _Live(k, seed, agent, EpisodeTrace(self.trace_dir, k, meta, writer=self.writer), obs)

    def _advance(self, lv: _Live, completion: Completion | None) -> None:
        try:
            lv.request = next(lv.gen) if completion is None else lv.gen.send(completion)
        except StopIteration as stop:
            lv.action, lv.record = stop.value
            lv.request, lv.gen = None, None

    # ---- tick mode -------------------------------------------------------------------------------
    def _tick(self, env, live: dict[int, _Live], todo: deque, seeds: list[int], done: dict, bar) -> None:
        self.stats.ticks += 1
        for lv in live.values():
            if lv.gen is None and lv.action is None:
                lv.gen = lv.agent.act(lv.obs)
                self._advance(lv, None)
        waiting = [lv for lv in live.values() if lv.request is not None]
        limit = self.max_requests_per_call or len(waiting) or 1
        for i in range(0, len(waiting), limit):
            chunk = waiting[i:i + limit]
            t = time.perf_counter()
            completions = self.client.generate([lv.request for lv in chunk])
            self.stats.generate_s += time.perf_counter() - t
            self.stats.generate_calls += 1
            self.stats.requests += len(chunk)
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(chunk))
            if len(completions) != len(chunk):
                raise RuntimeError(f"client returned {len(completions)} completions for {len(chunk)} requests")
            for lv, c in zip(chunk, completions):
                self._advance(lv, c)
        self._step_envs(env, live, todo, seeds, done, bar)

    # ---- async mode ------------------------------------------------------------------------------
    def _play_async(self, env, live: dict[int, _Live], todo: deque, seeds: list[int], done: dict, bar) -> None:
        for slot in sorted(live):
            self._begin(live[slot])
        while live:
            self.stats.ticks += 1
            pending = [(slot, live[slot].future) for slot in sorted(live) if live[slot].future is not None]
            if pending:
                self.stats.max_in_flight = max(self.stats.max_in_flight, len(pending))
            if pending and not any(f.done() for _, f in pending):
                t = time.perf_counter()
                self.client.drive([f for _, f in pending])
                self.stats.generate_s += time.perf_counter() - t
                self.stats.generate_calls += 1
            for slot, fut in pending:  # slot order: the next submissions do not depend on timing
                if fut.done():
                    lv = live[slot]
                    lv.future = None
                    self._advance(lv, completion_of(fut))
                    self._submit(lv)
            if not pending and not any(lv.action is not None for lv in live.values()):
                raise RuntimeError("runner: no request in flight and no action to take")  # a bug, never a hang
            for slot in self._step_envs(env, live, todo, seeds, done, bar):
                self._begin(live[slot])

    def _begin(self, lv: _Live) -> None:
        """Starts the agent's next env step and submits its first request."""
        lv.gen = lv.agent.act(lv.obs)
        self._advance(lv, None)
        self._submit(lv)

    def _submit(self, lv: _Live) -> None:
        if lv.request is None:
            return
        request, lv.request = lv.request, None
        lv.future = self._submit_to(self.client, request)
        self.stats.requests += 1

    # ---- env steps (both modes) --------------------------------------------------------------------
    def _step_envs(self, env, live: dict[int, _Live], todo: deque, seeds: list[int], done: dict, bar) -> list[int]:
        """Steps every slot whose agent committed an action in one batched env call, writes the
        trace lines, finishes ended episodes and restarts their slots. Returns the slots (in order)
        whose agents now face a new observation."""
        ready = {slot: live[slot] for slot in sorted(live) if live[slot].action is not None}
        if not ready:
            return []
        t = time.perf_counter()
        results = env.step_batch({slot: lv.action for slot, lv in ready.items()})
        self.stats.env_s += time.perf_counter() - t
        self.stats.env_calls += 1
        self.stats.env_steps += len(ready)
        self.stats.agent_steps += len(ready)
        restart_slots, restart_eps = [], []
        for slot, lv in ready.items():
            res = results[slot]
            lv.steps += 1
            progression = env.progression(slot)
            line = lv.record.to_dict()
            line.update(episode=lv.episode, seed=lv.seed, reward=float(res.reward), done=bool(res.done),
                        progression=progression, info=_jsonable(res.info))
            lv.trace.write_step(line)
            obs = res.obs
            if self.feedback_on_invalid_action and not lv.record.action_valid:
                obs = with_invalid_notice(obs, lv.record.validated_action)
            lv.obs, lv.action, lv.record = obs, None, None
            end = None
            if res.info.get("crashed"):
                end = "crashed"
            elif res.terminated:
                end = "terminated"
            elif res.truncated:
                end = "truncated"
            elif lv.steps >= self.max_steps:
                end = "max_steps"
            if end is None:
                continue
            done[lv.episode] = lv.trace.finish(progression, end)
            bar.update(1)
            del live[slot]
            if todo:
                k = todo.popleft()
                restart_slots.append(slot)
                restart_eps.append(k)
        if restart_slots:
            obs = env.reset_batch([seeds[k] for k in restart_eps], restart_slots)
            for slot, k, o in zip(restart_slots, restart_eps, obs):
                live[slot] = self._start(env, k, seeds[k], o)
        return [slot for slot in ready if slot in live]


def _jsonable(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif hasattr(v, "item") and getattr(v, "size", 2) == 1:
            out[k] = v.item()
        else:
            out[k] = str(v)
    return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True, disable=not enabled)


def main(argv=None) -> int:
    """python -m automem_jax.rollout.runner --env craftax --seeds 42-49 --run_dir runs/eval --checkpoint preset:tiny"""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m automem_jax.rollout.runner",
                                 description="Play episodes with MemoryAgents and write traces + summary.json.")
    ap.add_argument("--env", default="craftax", help="craftax | crafter | nethack | minihack:<task>")
    ap.add_argument("--seeds", default="42-51", help="'42-51' or '1,5,9'")
    ap.add_argument("--run_dir", required=True, help="local or gs:// folder; re-running resumes")
    ap.add_argument("--structure", default=None, help="structure YAML/JSON (default: the env's default)")
    ap.add_argument("--checkpoint", default="preset:tiny", help="preset:<name>, pkg:<name>, a Hugging Face folder or a .gguf file")
    ap.add_argument("--base_url", default=None, help="use an OpenAI-compatible server instead of a local engine")
    ap.add_argument("--model", default=None, help="model name for --base_url")
    ap.add_argument("--api_key_env", default="OPENAI_API_KEY",
                    help="NAME of the environment variable holding the key for --base_url ('' for a server "
                         "without auth)")
    ap.add_argument("--num_envs", type=int, default=8)
    ap.add_argument("--max_steps", type=int, default=1000)
    ap.add_argument("--max_tokens", type=int, default=1024, help="cap on tokens per model turn")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max_batch", type=int, default=16, help="rows the engine decodes at once")
    ap.add_argument("--max_len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=MODES, default=None,
                    help="async: each agent's next request goes out as soon as its reply arrives (default); "
                         "tick: one batched generate call per tick for every live agent")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        seeds = _parse_seeds(args.seeds)
        from automem_jax.memory.structure import MemoryStructure
        env_family = args.env.split(":", 1)[0]
        structure = (MemoryStructure.load(args.structure) if args.structure
                     else MemoryStructure.default("crafter" if env_family == "craftax" else env_family))
        from automem_jax.llm.client import EngineClient, OpenAIClient, load_engine
        if args.base_url:
            client = OpenAIClient(args.base_url, args.model or "default", api_key_env=args.api_key_env or None,
                                  max_tokens=args.max_tokens, temperature=args.temperature)
        else:
            engine = load_engine(args.checkpoint, max_batch=args.max_batch, max_len=args.max_len, seed=args.seed)
            client = EngineClient(engine, max_tokens=args.max_tokens, temperature=args.temperature)
        runner = Runner(client, structure, args.run_dir, args.env, num_envs=args.num_envs, max_steps=args.max_steps,
                        progress=not args.no_progress, mode=args.mode)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = runner.run(seeds)
    env, task = env_task(args.env)
    t = summary["environments"][env][task]
    print(f"{args.env}: {t['episodes']} episodes, progression {t['progression_percentage']:.2f}% "
          f"± {t['standard_error']:.2f}%  -> {storage.join(args.run_dir, 'summary.json')}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected numbers or ranges like 42-51") from None
    if not out:
        raise ValueError("--seeds is empty")
    return out


if __name__ == "__main__":
    import sys
    sys.exit(main())
