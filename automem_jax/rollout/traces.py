"""Trace files, per-episode results and the run summary.

Layout under a run folder (local or gs://):

    traces/<env>/<task>/ep_<k>.jsonl   one line per env step, flushed as written
    traces/<env>/<task>/ep_<k>.json    the finished episode (its presence marks the episode done)
    (readers walk this with ``iter_episodes``; nothing else lists the folders)
    summary.json                       progression mean ± standard error per env/task, tokens, hygiene,
                                       run health

A trace line is `StepRecord.to_dict()` (see automem_jax.agent.memory_agent) plus `reward`, `done`,
`progression`, `info` and `episode`. Lines are ASCII JSON (`ensure_ascii`) because model text may
hold lone surrogates that UTF-8 cannot encode.

Run health (``health`` in an episode result, per env/task and overall in summary.json) counts the
steps a run lost to failures rather than to the policy; see ``HealthCounter`` for the definitions
and ``health_warnings`` for the lines a caller logs when a rate is high.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from automem_jax import storage

WRITE_OPS = ("APPEND", "WRITE", "UPSERT_MAP")


def env_task(env_name: str) -> tuple[str, str]:
    """('minihack', 'Corridor-R3') for 'minihack:Corridor-R3'; single-task envs name their task."""
    if ":" in env_name:
        env, task = env_name.split(":", 1)
        return env, task
    return env_name, {"craftax": "Craftax-Classic", "crafter": "crafter",
                      "nethack": "NetHackChallenge-v0"}.get(env_name, env_name)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=True, default=str)


def dumps_pretty(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=True, default=str) + "\n"


class HygieneCounter:
    """Memory hygiene of one episode, updated step by step from trace lines."""

    def __init__(self):
        self.steps = 0
        self.ops = 0
        self.writes = 0
        self.redundant_writes = 0
        self.searches = 0
        self.empty_searches = 0
        self.context_tokens = 0
        self.invalid_actions = 0
        self._files: dict[str, str] = {}

    def update(self, line: dict) -> None:
        self.steps += 1
        self.invalid_actions += int(not line.get("action_valid", True))
        self.context_tokens += int(line.get("tokens_in", 0))
        files = dict(self._files)
        for phase in ("log", "plan"):
            for turn in (line.get(phase) or {}).get("turns", []):
                for op in turn.get("ops", []):
                    name, args = op.get("op", ""), op.get("args", [])
                    if name in ("DONE", "ACTION"):
                        continue
                    self.ops += 1
                    if name == "SEARCH":
                        self.searches += 1
                        text = op.get("text", "")
                        self.empty_searches += int(text.startswith(("[No lines matching", "[FILE IS EMPTY")))
                    elif name in WRITE_OPS and len(args) >= 1:
                        self.writes += 1
                        fname, payload = args[0], (args[1] if len(args) > 1 else "")
                        before = files.get(fname, "")
                        if name == "WRITE":
                            redundant = payload.strip() == before.strip() and bool(before.strip())
                        else:
                            redundant = bool(payload.strip()) and payload.strip() in before
                        self.redundant_writes += int(redundant and op.get("ok", True))
                        if op.get("ok", True):
                            files[fname] = payload if name == "WRITE" else before + "\n" + payload
        self._files = dict(line.get("memory_snapshot") or files)

    def as_dict(self) -> dict:
        n = max(self.steps, 1)
        return {
            "ops": self.ops, "ops_per_step": self.ops / n,
            "writes": self.writes, "redundant_writes": self.redundant_writes,
            "redundant_write_rate": self.redundant_writes / max(self.writes, 1),
            "searches": self.searches, "empty_searches": self.empty_searches,
            "empty_search_rate": self.empty_searches / max(self.searches, 1),
            "context_tokens_per_step": self.context_tokens / n,
            "invalid_actions": self.invalid_actions, "invalid_action_rate": self.invalid_actions / n,
        }


# Error texts meaning the prompt did not fit the model's context. The first alternative is this
# project's engine ("prompt has N tokens; this engine holds at most M", also relayed by its server
# as an HTTP 400); the others are the usual OpenAI / vLLM / SGLang wordings ("maximum context
# length", "context_length_exceeded", "maximum model length", "Input prompt ... is too long").
_OVERFLOW_RE = re.compile(
    r"engine holds at most \d+"
    r"|context[ _-]?(length|window)"
    r"|max(imum)?[ _-]?model[ _-]?len"
    r"|\b(prompt|input)\b[^.;]{0,80}\btoo long",
    re.IGNORECASE)

HEALTH_COUNTS = ("steps", "model_turns", "model_errors", "fallback_actions", "context_overflows")
HEALTH_THRESHOLD = 0.05  # a rate above this gets a warning (and a flag in the report)
MAX_ERROR_EXAMPLES = 3
_EXAMPLE_CHARS = 200


def is_context_overflow(error: str | None) -> bool:
    """Whether a Completion's ``error`` says the prompt was too long for the model's context."""
    return bool(error) and _OVERFLOW_RE.search(error) is not None


class HealthCounter:
    """Failures of one episode, updated step by step from trace lines.

    - steps: env steps (trace lines).
    - model_turns: model calls answered, i.e. TurnRecords of LOG and PLAN (both models in a
      two-model run), failed ones included.
    - model_errors: turns whose Completion came back with ``error`` set (the agent ends the phase
      there; a PhaseRecord end_reason "error", or a failed two-model consultation).
    - fallback_actions: steps whose PLAN committed no action (``plan.fallback``), so the env ran the
      structure's fallback action instead of the model's.
    - context_overflows: model errors whose text says the prompt did not fit the context
      (``is_context_overflow``); a subset of model_errors.

    Nothing trims a prompt to fit the context (EpisodeHistory's window bounds what context blocks
    look at, and memory pruning is a structure rule; both run whatever the context size), so no
    trim counts as an overflow. A reply the engine cut short because prompt + reply reached max_len
    is not in the traces (a Completion has no finish_reason), so it is not counted either.
    """

    def __init__(self):
        self.steps = 0
        self.model_turns = 0
        self.model_errors = 0
        self.fallback_actions = 0
        self.context_overflows = 0
        self.error_examples: list[str] = []

    def update(self, line: dict) -> None:
        self.steps += 1
        self.fallback_actions += int(bool((line.get("plan") or {}).get("fallback")))
        for phase in ("log", "plan"):
            for turn in (line.get(phase) or {}).get("turns", []):
                self.model_turns += 1
                error = turn.get("error")
                if error is None:
                    continue
                self.model_errors += 1
                self.context_overflows += int(is_context_overflow(error))
                _add_example(self.error_examples, error)

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in HEALTH_COUNTS}, "error_examples": list(self.error_examples)}


def _add_example(examples: list[str], error) -> None:
    text = str(error)[:_EXAMPLE_CHARS]
    if len(examples) < MAX_ERROR_EXAMPLES and text not in examples:
        examples.append(text)


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None  # None, not 0: no turns or steps recorded says nothing


def health_stats(counts: Mapping, *, episodes: int = 0, episodes_without_health: int = 0,
                 error_examples: Sequence[str] = ()) -> dict:
    """The ``health`` entry of a summary from pooled counts (keys HEALTH_COUNTS).

    Rates: model_error_rate = model_errors / model_turns, context_overflow_rate =
    context_overflows / model_turns, fallback_rate = fallback_actions / steps; None when the
    denominator is 0. ``episodes_without_health`` counts episode files written before health was
    recorded: they are left out of every count and rate.
    """
    c = {k: int(counts.get(k, 0) or 0) for k in HEALTH_COUNTS}
    return {
        "episodes": episodes, "episodes_without_health": episodes_without_health,
        "steps": c["steps"], "model_turns": c["model_turns"],
        "model_errors": c["model_errors"], "model_error_rate": _rate(c["model_errors"], c["model_turns"]),
        "fallback_actions": c["fallback_actions"], "fallback_rate": _rate(c["fallback_actions"], c["steps"]),
        "context_overflows": c["context_overflows"],
        "context_overflow_rate": _rate(c["context_overflows"], c["model_turns"]),
        "error_examples": list(error_examples)[:MAX_ERROR_EXAMPLES],
    }


def _pooled_health(eps: Sequence[dict]) -> dict:
    counts = dict.fromkeys(HEALTH_COUNTS, 0)
    examples: list[str] = []
    recorded = 0
    for e in eps:
        h = e.get("health")
        if not isinstance(h, Mapping):  # an episode file from before health was recorded
            continue
        recorded += 1
        for k in HEALTH_COUNTS:
            counts[k] += int(h.get(k, 0) or 0)
        for x in h.get("error_examples") or []:
            _add_example(examples, x)
    return health_stats(counts, episodes=recorded, episodes_without_health=len(eps) - recorded,
                        error_examples=examples)


# (rate key, count key, denominator key, what the rate measures, what it likely means)
_WARNINGS = (
    ("context_overflow_rate", "context_overflows", "model_turns", "context overflows in {rate} of model turns",
     "prompts did not fit the engine's context; inference.max_len is likely too small (or memory files / "
     "context blocks have grown too long)"),
    ("model_error_rate", "model_errors", "model_turns", "model errors in {rate} of model turns",
     "requests failed or were refused, ending those LOG/PLAN phases early; check the model server"),
    ("fallback_rate", "fallback_actions", "steps", "fallback actions on {rate} of steps",
     "the model committed no action (none within the PLAN budget, or its turn failed), so the structure's "
     "fallback action was played; progression understates the policy"),
)


def health_warnings(summary: Mapping, threshold: float = HEALTH_THRESHOLD, *, label: str = "") -> list[str]:
    """One line per env/task and rate above ``threshold`` in a summary from ``summarize``: where, the
    rate, the count and what it likely means. ``label`` (e.g. the evaluation's folder) starts each
    line. Summaries or episodes without health counts give no lines."""
    scopes = []
    for env, tasks in sorted((summary.get("environments") or {}).items()):
        if not isinstance(tasks, Mapping):
            continue
        for task, t in sorted(tasks.items()):
            if isinstance(t, Mapping) and isinstance(t.get("health"), Mapping):
                scopes.append((f"{env}/{task}", t["health"]))
    if not scopes and isinstance(summary.get("health"), Mapping):
        scopes.append(("all tasks", summary["health"]))
    lines = []
    for scope, h in scopes:
        for rate_key, count_key, denom_key, what, meaning in _WARNINGS:
            rate = h.get(rate_key)
            if not isinstance(rate, (int, float)) or rate <= threshold:
                continue
            counts, example = f"{h.get(count_key, '?')} of {h.get(denom_key, '?')}", ""
            if count_key == "model_errors":
                if h.get("context_overflows"):
                    counts += f", {h['context_overflows']} of them context overflows"
                if h.get("error_examples"):
                    example = f"; e.g. {h['error_examples'][0]!r}"
            text = f"{scope}: {what.format(rate=f'{100 * rate:.1f}%')} ({counts}): {meaning}{example}"
            lines.append(f"{label}: {text}" if label else text)
    return lines


class EpisodeTrace:
    """Writes one episode's JSONL (flushed every step) and, at the end, its JSON result."""

    def __init__(self, folder: str, index: int, meta: dict, *, writer: bool = True):
        self.folder = folder
        self.index = index
        self.meta = dict(meta)
        self.writer = writer
        self.remote = storage.is_gcs(folder)
        # gs:// cannot append: stage the JSONL locally and upload it with the finished episode.
        # A non-writer host (multi-host SPMD plays the same episodes everywhere) stages and drops.
        self._staging = tempfile.mkdtemp(prefix="automem-trace-") if self.remote or not writer else None
        local_dir = self._staging or folder
        os.makedirs(local_dir, exist_ok=True)
        self.local_jsonl = os.path.join(local_dir, f"ep_{index}.jsonl")
        self._f = open(self.local_jsonl, "w", encoding="ascii")  # a restarted episode starts over
        self.hygiene = HygieneCounter()
        self.health = HealthCounter()
        self.steps = 0
        self.episode_return = 0.0
        self.tokens_in = 0
        self.tokens_out = 0
        self.actions: Counter = Counter()

    def write_step(self, line: dict) -> None:
        self._f.write(dumps(line) + "\n")
        self._f.flush()
        self.steps += 1
        self.episode_return += float(line.get("reward") or 0.0)
        self.tokens_in += int(line.get("tokens_in", 0))
        self.tokens_out += int(line.get("tokens_out", 0))
        self.actions[line.get("validated_action")] += 1
        self.hygiene.update(line)
        self.health.update(line)

    def finish(self, progression: float, end_reason: str, extra: dict | None = None) -> dict:
        self._f.close()
        if self.remote and self.writer:
            storage.upload_file(self.local_jsonl, storage.join(self.folder, f"ep_{self.index}.jsonl"))
        self._drop_staging()
        result = {
            **self.meta,
            "episode_idx": self.index,
            "num_steps": self.steps,
            "episode_return": self.episode_return,
            "progression": float(progression),
            "end_reason": end_reason,
            "input_tokens": self.tokens_in,
            "output_tokens": self.tokens_out,
            "action_frequency": dict(self.actions),
            "hygiene": self.hygiene.as_dict(),
            "health": self.health.as_dict(),
            **(extra or {}),
        }
        # Written last and atomically: its presence is what marks the episode finished.
        if self.writer:
            storage.write_text(episode_json_path(self.folder, self.index), dumps_pretty(result))
        return result

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._drop_staging()

    def _drop_staging(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def episode_json_path(folder: str, index: int) -> str:
    return storage.join(folder, f"ep_{index}.json")


def load_finished(folder: str, index: int) -> dict | None:
    path = episode_json_path(folder, index)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a torn write: the episode is run again


_EP_FILE = re.compile(r"^ep_(\d+)\.(jsonl|json)$")


@dataclass(frozen=True)
class EpisodeFiles:
    """One episode's files under ``traces/<env>/<task>/``: ``ep_<index>.jsonl`` (its steps, written
    as played) and ``ep_<index>.json`` (its result; present once the episode finished)."""
    env: str
    task: str
    index: int
    folder: str
    finished: bool
    has_steps: bool

    @property
    def steps_path(self) -> str:
        return storage.join(self.folder, f"ep_{self.index}.jsonl")

    @property
    def result_path(self) -> str:
        return episode_json_path(self.folder, self.index)

    def result(self) -> dict | None:
        """The finished episode's result, or None (unfinished, or a torn write)."""
        return load_finished(self.folder, self.index) if self.finished else None

    def steps(self) -> Iterator[dict]:
        """The trace lines, streamed. Reading stops at the first line that is not JSON: only a
        killed writer's last line can be torn."""
        try:
            with storage.local_file(self.steps_path) as path, \
                    open(path, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    if raw.strip():
                        try:
                            yield json.loads(raw)
                        except json.JSONDecodeError:
                            return
        except FileNotFoundError:
            return


def traces_root(run_dir: str) -> str:
    """``run_dir/traces``; or ``run_dir`` itself when it is a traces folder (has no traces/)."""
    root = storage.join(run_dir, "traces")
    return root if storage.listdir(root) else run_dir


def iter_episodes(run_dir: str, *, finished: bool = True) -> list[EpisodeFiles]:
    """Every episode under a run folder (or its traces folder), ordered by env, task and index.
    ``finished=True`` keeps the episodes whose result is written; False also lists running or cut
    episodes (those with steps only)."""
    root = traces_root(run_dir)
    out = []
    for env in storage.listdir(root):
        for task in storage.listdir(storage.join(root, env)):
            folder = storage.join(root, env, task)
            kinds: dict[int, set] = defaultdict(set)
            for name in storage.listdir(folder):
                m = _EP_FILE.match(name)
                if m:
                    kinds[int(m.group(1))].add(m.group(2))
            for k in sorted(kinds):
                done = "json" in kinds[k]
                if done or not finished:
                    out.append(EpisodeFiles(env, task, k, folder, done, "jsonl" in kinds[k]))
    return out


def finished_results(run_dir: str) -> list[dict]:
    """The results of every finished episode under a run folder, in ``iter_episodes`` order."""
    return [r for r in (ep.result() for ep in iter_episodes(run_dir)) if r is not None]


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = sum(xs) / n
    if n == 1:
        return m, 0.0
    # Population variance (divide by n), as upstream's summary: se = std(ddof=0) / sqrt(n).
    var = sum((x - m) ** 2 for x in xs) / n
    return m, math.sqrt(var / n)


def summarize(episodes: Iterable[dict]) -> dict:
    """Run summary: progression mean ± standard error per env and task, tokens, hygiene, and
    ``health`` (see ``health_stats``) per env/task and over all episodes."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    episodes = list(episodes)  # read twice: per group, then pooled for the overall health
    for ep in episodes:
        groups[(ep["env"], ep["task"])].append(ep)
    envs: dict = {}
    all_prog = []
    for (env, task), eps in sorted(groups.items()):
        prog = [e["progression"] for e in eps]
        all_prog += prog
        m, se = _mean_se(prog)
        steps = sum(e["num_steps"] for e in eps)
        hyg_keys = eps[0]["hygiene"].keys()
        # Hygiene rates are pooled over steps, not averaged over episodes.
        pooled = {k: sum(e["hygiene"][k] for e in eps) for k in hyg_keys
                  if k in ("ops", "writes", "redundant_writes", "searches", "empty_searches", "invalid_actions")}
        ctx = sum(e["hygiene"]["context_tokens_per_step"] * e["num_steps"] for e in eps)
        entry = {
            "episodes": len(eps),
            "progression": m, "progression_se": se,
            "progression_percentage": 100 * m, "standard_error": 100 * se,
            "steps": steps, "mean_steps": steps / len(eps),
            "input_tokens": sum(e["input_tokens"] for e in eps),
            "output_tokens": sum(e["output_tokens"] for e in eps),
            "invalid_action_rate": pooled["invalid_actions"] / max(steps, 1),
            "hygiene": {
                "redundant_writes": pooled["redundant_writes"],
                "redundant_write_rate": pooled["redundant_writes"] / max(pooled["writes"], 1),
                "empty_searches": pooled["empty_searches"],
                "empty_search_rate": pooled["empty_searches"] / max(pooled["searches"], 1),
                "ops_per_step": pooled["ops"] / max(steps, 1),
                "context_tokens_per_step": ctx / max(steps, 1),
            },
            "health": _pooled_health(eps),
            "end_reasons": dict(Counter(e["end_reason"] for e in eps)),
            "seeds": sorted(e["seed"] for e in eps),
        }
        envs.setdefault(env, {})[task] = entry
    m, se = _mean_se(all_prog)
    return {
        "episodes": len(all_prog),
        "average_progress": 100 * m, "standard_error": 100 * se,
        "input_tokens": sum(t["input_tokens"] for e in envs.values() for t in e.values()),
        "output_tokens": sum(t["output_tokens"] for e in envs.values() for t in e.values()),
        "health": _pooled_health(episodes),
        "environments": envs,
    }
