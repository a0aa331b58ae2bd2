"""Trace browsing for the critic: a handful of read-only tools over one run folder.

A hosted critic calls these through OpenAI tool calling (`schemas()` + `call(name, arguments_json)`);
a model without tool calling gets `digest(token_budget)` pasted into its prompt instead; the offline
critic reads the same numbers through `episode_stats()` / `steps()`. Every tool answer is a string
of at most `max_reply_chars`: a bad argument, a missing episode or step is an ``error: ...`` string
the model can read and correct, never an exception (the session must survive a model's typo).

Run folder layout (local or gs://, via automem_jax.storage):
``traces/<env>/<task>/ep_<k>.jsonl`` (one line per step), ``ep_<k>.json`` (finished episode) and
``summary.json`` (walked by ``rollout.traces.iter_episodes``). Episodes are numbered 0..N-1 across all
env/task folders in sorted order, running ones included.
"""
from __future__ import annotations

import inspect
import json
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import yaml

from automem_jax import storage
from automem_jax.memory.structure import MemoryStructure
from automem_jax.rollout.traces import EpisodeFiles, HygieneCounter, iter_episodes, load_finished

CONTROL_OPS = ("DONE", "ACTION")
READ_OPS = ("READ", "SEARCH", "TAIL", "COUNT")
EMPTY_RESULT_PREFIXES = ("[No lines matching", "[FILE IS EMPTY", "[0 matches")
MAX_STEPS_PER_READ = 20
MAX_HITS = 100
STRING_CAP = 1200  # per string in read_steps; whole replies are capped by max_reply_chars
_CACHED_EPISODES = 4  # parsed episodes kept in memory (NetHack traces can be large)


def clip(text: Any, n: int) -> str:
    """`text` cut to at most n characters, with a marker saying how much was cut."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= n:
        return s
    marker = f"...[truncated; {len(s)} chars in all]"
    if n <= len(marker):
        return s[:n]
    return s[:n - len(marker)] + marker


def _clip_tree(obj, n: int):
    if isinstance(obj, str):
        return clip(obj, n)
    if isinstance(obj, dict):
        return {k: _clip_tree(v, n) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clip_tree(v, n) for v in obj]
    return obj


def bound(text: str, limit: int, hint: str = "") -> str:
    """Cut a whole reply to `limit` characters at a line break, saying so (and how to see more)."""
    if len(text) <= limit:
        return text
    note = f"\n[reply truncated at {limit} chars{'; ' + hint if hint else ''}]"
    keep = max(0, limit - len(note))
    cut = text.rfind("\n", 0, keep)
    if cut < keep // 2:
        cut = keep
    return (text[:cut] + note)[:limit]


def obs_of(line: dict) -> str:
    parts = [line.get("obs_long_term") or "", line.get("obs_short_term") or ""]
    return "\n".join(p for p in parts if p) or "(no observation)"


def phase_ops(line: dict, phase: str) -> list[dict]:
    """The memory ops (not DONE/ACTION) a phase ran, in execution order."""
    out = []
    for turn in (line.get(phase) or {}).get("turns") or []:
        out += [op for op in turn.get("ops") or [] if op.get("op") not in CONTROL_OPS]
    return out


def is_empty_result(op: dict) -> bool:
    return str(op.get("text", "")).startswith(EMPTY_RESULT_PREFIXES)


@dataclass(frozen=True)
class _Episode:
    id: int  # the number the tools show: position across every env/task folder
    files: EpisodeFiles

    @property
    def env(self) -> str:
        return self.files.env

    @property
    def task(self) -> str:
        return self.files.task

    @property
    def index(self) -> int:
        return self.files.index

    @property
    def label(self) -> str:
        return f"{self.env}/{self.task}#{self.index}"


class TraceTools:
    """Read-only tools over the traces of one run folder (see the module docstring)."""

    TOOLS = ("list_episodes", "read_steps", "search_traces", "read_memory", "read_structure", "run_summary")

    def __init__(self, run_dir: str, structure: "MemoryStructure | dict | str | None" = None,
                 max_reply_chars: int = 8000):
        if not isinstance(max_reply_chars, int) or max_reply_chars < 200:
            raise ValueError(f"max_reply_chars must be an integer >= 200, got {max_reply_chars!r}")
        self.run_dir = str(run_dir).rstrip("/")
        self.max_reply_chars = max_reply_chars
        self._structure = structure
        self._episodes: list[_Episode] | None = None
        self._stats: dict[int, dict] = {}
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()

    def __repr__(self) -> str:
        return f"TraceTools({self.run_dir!r})"

    # ------------------------------------------------------------------ discovery and loading

    def episodes(self) -> list[_Episode]:
        if self._episodes is None:
            # Running and cut episodes too (steps only): a critic may browse a run in progress.
            found = iter_episodes(self.run_dir, finished=False)
            self._episodes = [_Episode(i, f) for i, f in enumerate(found)]
        return self._episodes

    def steps(self, episode: int) -> list[dict]:
        """All trace lines of an episode (parsed; a few episodes are cached)."""
        if episode in self._cache:
            self._cache.move_to_end(episode)
            return self._cache[episode]
        lines = list(self.episodes()[episode].files.steps())
        self._cache[episode] = lines
        while len(self._cache) > _CACHED_EPISODES:
            self._cache.popitem(last=False)
        return lines

    def episode_stats(self, episode: int | None = None):
        """Per-episode numbers (dict), or the list of them for every episode."""
        if episode is None:
            return [self.episode_stats(e.id) for e in self.episodes()]
        if episode not in self._stats:
            self._stats[episode] = self._compute_stats(self.episodes()[episode])
        return self._stats[episode]

    def _compute_stats(self, ep: _Episode) -> dict:
        result = load_finished(ep.files.folder, ep.index)  # read now: the episode may have finished since
        s: dict[str, Any] = {
            "id": ep.id, "env": ep.env, "task": ep.task, "index": ep.index, "steps": 0, "return": 0.0,
            "progression": 0.0, "end_reason": "unfinished", "seed": None, "invalid_actions": 0,
            "unchanged_steps": 0, "max_unchanged": 0, "max_zero_streak": 0, "max_action_run": 0,
            "reward_events": [], "writes": 0, "redundant_writes": 0, "searches": 0, "empty_searches": 0,
            "ops": 0, "failed_ops": 0, "turn_errors": 0, "plan_fallbacks": 0, "plan_budget_ends": 0,
            "log_budget_ends": 0, "log_no_ops": 0, "plan_no_lookup": 0, "repeat_reads": 0,
            "max_payload_chars": 0, "writes_per_file": {}, "final_files": {}, "first_step": None,
            "last_step": None, "tokens_in": 0, "tokens_out": 0,
        }
        writes_per_file: Counter = Counter()
        hygiene = HygieneCounter()  # the runner's own hygiene definitions, for unfinished episodes too
        zero, run, last_action = 0, 0, None
        last_line = None
        for line in ep.files.steps():
            last_line = line
            step = line.get("step", s["steps"])
            s["first_step"] = step if s["first_step"] is None else s["first_step"]
            s["last_step"] = step
            s["steps"] += 1
            s["seed"] = line.get("seed", s["seed"])
            r = float(line.get("reward") or 0.0)
            s["return"] += r
            s["progression"] = float(line.get("progression") or s["progression"])
            s["tokens_in"] += int(line.get("tokens_in") or 0)
            s["tokens_out"] += int(line.get("tokens_out") or 0)
            if r != 0:
                s["reward_events"].append((step, r))
                zero = 0
            else:
                zero += 1
                s["max_zero_streak"] = max(s["max_zero_streak"], zero)
            s["invalid_actions"] += int(not line.get("action_valid", True))
            unchanged = int(line.get("unchanged_count") or 0)
            s["unchanged_steps"] += int(unchanged > 0)
            s["max_unchanged"] = max(s["max_unchanged"], unchanged)
            action = line.get("validated_action")
            run = run + 1 if action == last_action else 1
            last_action = action
            s["max_action_run"] = max(s["max_action_run"], run)
            log, plan = line.get("log") or {}, line.get("plan") or {}
            s["plan_fallbacks"] += int(bool(plan.get("fallback")))
            s["plan_budget_ends"] += int(plan.get("end_reason") == "budget")
            s["log_budget_ends"] += int(log.get("end_reason") == "budget")
            s["log_no_ops"] += int(log.get("end_reason") == "no_ops")
            for phase in ("log", "plan"):
                turns = (line.get(phase) or {}).get("turns") or []
                s["turn_errors"] += sum(1 for t in turns if t.get("error"))
                read_seen: set[str] = set()
                for op in phase_ops(line, phase):
                    name, args = op.get("op", ""), op.get("args") or []
                    fname = args[0] if args else ""
                    s["failed_ops"] += int(not op.get("ok", True))
                    if name == "READ":
                        s["repeat_reads"] += int(fname in read_seen)
                        read_seen.add(fname)
                    elif name not in READ_OPS and name != "CREATE" and fname:
                        read_seen.discard(fname)
                        writes_per_file[fname] += 1
                        payload = str(args[-1]) if len(args) > 1 else ""
                        s["max_payload_chars"] = max(s["max_payload_chars"], len(payload))
                if phase == "plan" and not any(o.get("op") in READ_OPS for o in phase_ops(line, "plan")):
                    s["plan_no_lookup"] += 1
            hygiene.update(line)
        if last_line is not None:
            snap = last_line.get("memory_snapshot") or {}
            s["final_files"] = {k: {"lines": len(str(v).splitlines()), "bytes": len(str(v).encode("utf-8"))}
                                for k, v in snap.items()}
        s["writes_per_file"] = dict(writes_per_file)
        h = hygiene.as_dict()
        for k in ("redundant_writes", "empty_searches", "writes", "searches", "ops"):
            s[k] = int(h[k])
        if result is not None:
            s["seed"] = result.get("seed", s["seed"])
            s["end_reason"] = result.get("end_reason", s["end_reason"])
            s["progression"] = float(result.get("progression", s["progression"]))
            s["return"] = float(result.get("episode_return", s["return"]))
            hyg = result.get("hygiene") or {}
            # The runner's own hygiene counters are authoritative where present.
            for k in ("redundant_writes", "empty_searches", "writes", "searches", "invalid_actions", "ops"):
                if k in hyg:
                    s[k] = int(hyg[k])
        return s

    # ------------------------------------------------------------------ argument helpers

    def _episode(self, episode) -> tuple[_Episode | None, str]:
        eps = self.episodes()
        if not eps:
            return None, f"error: no episodes under {self.run_dir}/traces"
        if isinstance(episode, str):
            text = episode.strip().removeprefix("ep_").removeprefix("#")
            for e in eps:  # "env/task#k" or "task#k" labels from list_episodes
                if episode.strip() in (e.label, f"{e.task}#{e.index}"):
                    return e, ""
            try:
                episode = int(text)
            except ValueError:
                return None, (f"error: episode {episode!r} is not an episode id; use an integer "
                              f"0-{len(eps) - 1} from list_episodes")
        if isinstance(episode, bool) or not isinstance(episode, int):
            return None, f"error: episode must be an integer 0-{len(eps) - 1}, got {episode!r}"
        if not 0 <= episode < len(eps):
            return None, f"error: episode {episode} does not exist; episodes are 0-{len(eps) - 1} (see list_episodes)"
        return eps[episode], ""

    def _step_index(self, ep: _Episode, lines: list[dict], step, what: str = "step") -> tuple[int | None, str]:
        if not lines:
            return None, f"error: episode {ep.id} has no recorded steps yet"
        first, last = lines[0].get("step", 0), lines[-1].get("step", len(lines) - 1)
        try:
            step = int(step)
        except (TypeError, ValueError):
            return None, f"error: {what} must be an integer, got {step!r}"
        if step < 0:  # python-style: -1 is the last step
            step = last + 1 + step
        if not first <= step <= last:
            return None, f"error: episode {ep.id} has steps {first}-{last}; {what} {step} does not exist"
        return step - first, ""

    # ------------------------------------------------------------------ tools

    def list_episodes(self) -> str:
        """One line per episode: id, env/task#index, seed, steps, return, progression, end reason,
        invalid actions, unchanged observations, longest zero-reward streak, memory hygiene
        (writes, redundant writes, searches, empty searches, failed ops), PLAN fallbacks and the
        first reward events (step:reward)."""
        eps = self.episodes()
        if not eps:
            return f"error: no episodes under {self.run_dir}/traces"
        rows = [f"{len(eps)} episode(s). Columns: id env/task#index seed steps return progression end "
                f"invalid unchanged zero_streak writes redundant searches empty failed_ops plan_fallbacks rewards"]
        for s in self.episode_stats():
            ev = s["reward_events"]
            rew = " ".join(f"s{st}:{r:+g}" for st, r in ev[:10]) + (f" (+{len(ev) - 10} more)" if len(ev) > 10 else "")
            rows.append(
                f"{s['id']} {s['env']}/{s['task']}#{s['index']} seed={s['seed']} steps={s['steps']} "
                f"return={s['return']:g} progression={s['progression']:.3f} end={s['end_reason']} "
                f"invalid={s['invalid_actions']} unchanged={s['unchanged_steps']} zero_streak={s['max_zero_streak']} "
                f"writes={s['writes']} redundant={s['redundant_writes']} searches={s['searches']} "
                f"empty={s['empty_searches']} failed_ops={s['failed_ops']} plan_fallbacks={s['plan_fallbacks']} "
                f"rewards=[{rew or 'none'}]")
        return bound("\n".join(rows), self.max_reply_chars, "the remaining episodes are not listed")

    def read_steps(self, episode, start: int = 0, end: int | None = None, fields: list[str] | None = None) -> str:
        """Steps start..end (inclusive, at most 20) of an episode: observation, actions, reward,
        LOG and PLAN turns (response and op results). `fields` picks raw trace fields instead,
        e.g. ["memory_snapshot", "context_blocks"]."""
        ep, err = self._episode(episode)
        if err:
            return err
        lines = self.steps(ep.id)
        i, err = self._step_index(ep, lines, start, "start step")
        if err:
            return err
        if end is None:
            j = min(i + 4, len(lines) - 1)
        else:
            j, err = self._step_index(ep, lines, end, "end step")
            if err:
                return err
        if j < i:
            return f"error: end ({end}) is before start ({start})"
        note = ""
        if j - i + 1 > MAX_STEPS_PER_READ:
            j = i + MAX_STEPS_PER_READ - 1
            note = f"[only {MAX_STEPS_PER_READ} steps per call; continue with start={lines[j + 1].get('step')}]\n"
        if fields is not None:
            if isinstance(fields, str):
                fields = [fields]
            if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
                return f"error: fields must be a list of field names, got {fields!r}"
            allowed = sorted(set(lines[i]) | {"observation"})
            bad = [f for f in fields if f not in allowed]
            if bad:
                return f"error: unknown field(s) {bad}; trace fields are: {', '.join(allowed)}"
        per_string = max(200, min(STRING_CAP, self.max_reply_chars // max(1, 2 * (j - i + 1))))
        parts, used = [note] if note else [], len(note)
        for k in range(i, j + 1):
            line = lines[k]
            if fields is None:
                block = self._render_step(line, per_string)
            else:
                picked = {"step": line.get("step")}
                for f in fields:
                    picked[f] = obs_of(line) if f == "observation" else line.get(f)
                block = json.dumps(_clip_tree(picked, per_string), ensure_ascii=False, indent=1)
            if used + len(block) + 1 > self.max_reply_chars - 120 and parts:
                parts.append(f"[stopped before step {line.get('step')} to stay within "
                             f"{self.max_reply_chars} chars; call read_steps with start={line.get('step')}]")
                break
            parts.append(block)
            used += len(block) + 1
        return bound("\n".join(parts), self.max_reply_chars, "ask for fewer steps or fields")

    def _render_step(self, line: dict, cap: int) -> str:
        info = line.get("info") or {}
        out = [f"== episode {line.get('episode')} step {line.get('step')} ==",
               f"action: raw={json.dumps(line.get('raw_action'))} validated={json.dumps(line.get('validated_action'))}"
               f" valid={line.get('action_valid')} reward={line.get('reward')} done={line.get('done')} "
               f"progression={line.get('progression')} unchanged_count={line.get('unchanged_count')}"
               + (f" achievements={info['achievements']}" if info.get("achievements") else ""),
               "observation:", clip(obs_of(line), cap)]
        for phase in ("log", "plan"):
            rec = line.get(phase) or {}
            if rec.get("end_reason") == "skipped":
                out.append(f"{phase.upper()}: skipped")
                continue
            head = f"{phase.upper()}: end={rec.get('end_reason')}"
            if phase == "plan":
                head += f" final_action={json.dumps(rec.get('final_action'))} fallback={rec.get('fallback')}"
            out.append(head)
            for n, t in enumerate(rec.get("turns") or [], 1):
                out.append(f"  turn {n} ({t.get('model_role')}) response: {clip(t.get('response', ''), cap)}")
                if t.get("tool_results"):
                    out.append(f"  turn {n} results: {clip(t['tool_results'], cap)}")
                if t.get("error"):
                    out.append(f"  turn {n} error: {clip(t['error'], 300)}")
            if rec.get("notes"):
                out.append(f"  notes: {clip('; '.join(map(str, rec['notes'])), 300)}")
        return "\n".join(out)

    def search_traces(self, pattern: str, episode=None, field: str | None = None, max_hits: int = 20,
                      regex: bool = False) -> str:
        """Case-insensitive substring (or regex=true) search over observations, model responses and
        op results; field narrows to one of observation|response|tool_results|memory."""
        if not isinstance(pattern, str) or not pattern:
            return "error: pattern must be a non-empty string"
        fields = ("observation", "response", "tool_results", "memory")
        if field is not None and field not in fields:
            return f"error: field must be one of {', '.join(fields)} (or omitted), got {field!r}"
        try:
            max_hits = max(1, min(MAX_HITS, int(max_hits)))
        except (TypeError, ValueError):
            return f"error: max_hits must be an integer, got {max_hits!r}"
        try:
            rx = re.compile(pattern if regex else re.escape(pattern), re.IGNORECASE)
        except re.error as e:
            return f"error: invalid regular expression {pattern!r}: {e}"
        if episode is not None:
            ep, err = self._episode(episode)
            if err:
                return err
            targets = [ep]
        else:
            targets = self.episodes()
        hits, total = [], 0
        for ep in targets:
            for line in ep.files.steps():
                for where, text in self._searchable(line, field):
                    for m in rx.finditer(text):
                        total += 1
                        if len(hits) < max_hits:
                            a, b = max(0, m.start() - 80), min(len(text), m.end() + 80)
                            snippet = " ".join(text[a:b].split())
                            hits.append(f"ep {ep.id} step {line.get('step')} {where}: ...{snippet}...")
        if not hits:
            return f"no matches for {pattern!r}" + (f" in {field}" if field else "")
        head = f"{total} match(es) for {pattern!r}" + (f"; showing the first {len(hits)}" if total > len(hits) else "")
        return bound("\n".join([head] + hits), self.max_reply_chars, "narrow the search with episode= or field=")

    @staticmethod
    def _searchable(line: dict, field: str | None):
        if field in (None, "observation"):
            yield "observation", obs_of(line)
        for phase in ("log", "plan"):
            for n, t in enumerate((line.get(phase) or {}).get("turns") or [], 1):
                if field in (None, "response"):
                    yield f"{phase} turn {n} response", str(t.get("response") or "")
                if field in (None, "tool_results"):
                    yield f"{phase} turn {n} results", str(t.get("tool_results") or "")
        if field == "memory":
            for name, content in (line.get("memory_snapshot") or {}).items():
                yield f"memory {name}", str(content)

    def read_memory(self, episode, step: int | None = None) -> str:
        """The memory files as recorded in a step's trace line (default: the episode's last step)."""
        ep, err = self._episode(episode)
        if err:
            return err
        lines = self.steps(ep.id)
        i, err = self._step_index(ep, lines, -1 if step is None else step)
        if err:
            return err
        snap = lines[i].get("memory_snapshot") or {}
        if not snap:
            return f"episode {ep.id} step {lines[i].get('step')}: no memory files recorded"
        head = f"memory of episode {ep.id} at step {lines[i].get('step')} ({len(snap)} files)"
        per_file = max(200, (self.max_reply_chars - len(head) - 100 * len(snap)) // max(1, len(snap)))
        blocks = [head]
        for name, content in snap.items():
            content = str(content)
            size = f"{len(content.splitlines())} lines, {len(content.encode('utf-8'))} bytes"
            blocks.append(f"── {name} ({size}) ──\n" + (clip(content, per_file) if content.strip() else "(empty)"))
        return bound("\n".join(blocks), self.max_reply_chars, "search_traces with field='memory' finds lines")

    def structure(self) -> MemoryStructure | None:
        s = self._structure
        if s is None or isinstance(s, MemoryStructure):
            return s
        if isinstance(s, dict):
            return MemoryStructure(s)
        path = str(s)
        return MemoryStructure.from_text(storage.read_text(path), "json" if path.endswith(".json") else "yaml")

    def read_structure(self, section: str | None = None) -> str:
        """The current MemoryStructure document as YAML, or one top-level section of it
        (prompts, files, ops, limits, pruning, context, budgets, action)."""
        try:
            st = self.structure()
        except Exception as e:  # noqa: BLE001 - a broken file is reported to the model, not raised
            return f"error: the structure could not be read: {type(e).__name__}: {e}"
        if st is None:
            return "error: no memory structure was given to these tools"
        if section is None:
            text = st.to_yaml()
        else:
            doc = st.to_dict()
            if section not in doc:
                return f"error: unknown section {section!r}; sections are: {', '.join(doc)}"
            text = yaml.safe_dump({section: doc[section]}, sort_keys=False, allow_unicode=True, width=100)
        return bound(text, self.max_reply_chars, "read one section at a time with section=...")

    def run_summary(self) -> str:
        """The run's summary.json (progression mean and standard error per env/task, hygiene)."""
        try:
            text = storage.read_text(storage.join(self.run_dir, "summary.json"))
        except FileNotFoundError:
            return "error: this run has no summary.json (the run may not have finished)"
        try:
            text = json.dumps(json.loads(text), indent=1)
        except json.JSONDecodeError:
            pass
        return bound(text, self.max_reply_chars)

    # ------------------------------------------------------------------ tool-calling plumbing

    _PARAMS = {
        "list_episodes": {},
        "read_steps": {
            "episode": ({"type": "integer"}, "Episode id from list_episodes."),
            "start": ({"type": "integer"}, "First step (negative counts from the end)."),
            "end": ({"type": "integer"}, "Last step, inclusive (default start+4; at most 20 steps per call)."),
            "fields": ({"type": "array", "items": {"type": "string"}},
                       "Optional raw trace fields to show instead of the default view, e.g. memory_snapshot."),
        },
        "search_traces": {
            "pattern": ({"type": "string"}, "Text to look for (case-insensitive)."),
            "episode": ({"type": "integer"}, "Only this episode."),
            "field": ({"type": "string", "enum": ["observation", "response", "tool_results", "memory"]},
                      "Only this kind of text."),
            "max_hits": ({"type": "integer"}, "At most this many hits (default 20, max 100)."),
            "regex": ({"type": "boolean"}, "Treat pattern as a regular expression."),
        },
        "read_memory": {
            "episode": ({"type": "integer"}, "Episode id from list_episodes."),
            "step": ({"type": "integer"}, "Step (default: the last one)."),
        },
        "read_structure": {
            "section": ({"type": "string"}, "Optional top-level section, e.g. prompts or context."),
        },
        "run_summary": {},
    }

    def schemas(self) -> list[dict]:
        """The tools in OpenAI `tools` format."""
        out = []
        for name in self.TOOLS:
            fn = getattr(self, name)
            sig = inspect.signature(fn)
            props, required = {}, []
            for pname, (schema, desc) in self._PARAMS[name].items():
                props[pname] = {**schema, "description": desc}
                if sig.parameters[pname].default is inspect.Parameter.empty:
                    required.append(pname)
            doc = " ".join((fn.__doc__ or name).split())
            out.append({"type": "function", "function": {
                "name": name, "description": doc,
                "parameters": {"type": "object", "properties": props, "required": required},
            }})
        return out

    def call(self, name: str, arguments_json: str | dict | None = None) -> str:
        """Run one tool; any problem becomes an ``error: ...`` string for the model."""
        if name not in self.TOOLS:
            return f"error: unknown tool {name!r}; the tools are: {', '.join(self.TOOLS)}"
        if isinstance(arguments_json, dict):
            args = arguments_json
        else:
            text = (arguments_json or "").strip() or "{}"
            try:
                args = json.loads(text)
            except json.JSONDecodeError as e:
                return f"error: the arguments of {name} are not valid JSON ({e.msg} at char {e.pos}): {clip(text, 200)}"
        if not isinstance(args, dict):
            return f"error: the arguments of {name} must be a JSON object, got {clip(json.dumps(args), 200)}"
        allowed = self._PARAMS[name]
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            return (f"error: {name} has no argument(s) {', '.join(unknown)}; "
                    f"its arguments are: {', '.join(allowed) or 'none'}")
        sig = inspect.signature(getattr(self, name))
        missing = [p for p in allowed if sig.parameters[p].default is inspect.Parameter.empty and p not in args]
        if missing:
            return f"error: {name} needs the argument(s) {', '.join(missing)}"
        for p, v in list(args.items()):
            if allowed[p][0].get("type") == "integer" and v is not None and p != "episode":
                try:
                    args[p] = int(v)
                except (TypeError, ValueError):
                    return f"error: {name}: {p} must be an integer, got {clip(json.dumps(v), 100)}"
        try:
            reply = getattr(self, name)(**args)
        except Exception as e:  # noqa: BLE001 - tools must never end the critic's session
            reply = f"error: {name} failed: {type(e).__name__}: {clip(str(e), 300)}"
        return bound(reply, self.max_reply_chars)

    # ------------------------------------------------------------------ digest (no tool calling)

    def digest(self, token_budget: int = 6000) -> str:
        """Per-episode stats plus evenly sampled steps, within ~token_budget tokens (chars / 4)."""
        budget = max(400, int(token_budget) * 4)
        eps = self.episodes()
        if not eps:
            return clip(f"(no episodes under {self.run_dir}/traces)", budget)
        head = "TRACE DIGEST (episode stats, then sampled steps)\n"
        stats = bound(self.list_episodes(), int(budget * 0.4), "more episodes not listed")
        room = budget - len(head) - len(stats) - 40
        pairs = [(e.id, k) for e in eps for k in range(self.episode_stats(e.id)["steps"])]
        parts = [head + stats, "\nSAMPLED STEPS:"]
        if pairs and room > 200:
            n = max(1, min(len(pairs), room // 700))
            cap = room // n
            picks = [pairs[(2 * i + 1) * len(pairs) // (2 * n)] for i in range(n)]
            for ep_id, k in picks:
                lines = self.steps(ep_id)
                if k < len(lines):
                    parts.append(self._digest_step(ep_id, lines[k], cap - 1))
        return bound("\n".join(parts), budget)

    @staticmethod
    def _digest_step(ep_id: int, line: dict, cap: int) -> str:
        head = (f"-- ep {ep_id} step {line.get('step')}: action {json.dumps(line.get('validated_action'))}"
                f"{'' if line.get('action_valid', True) else ' (INVALID: ' + json.dumps(line.get('raw_action')) + ')'}"
                f" reward={line.get('reward')} unchanged={line.get('unchanged_count')}")
        body = [("obs", obs_of(line))]
        for phase in ("log", "plan"):
            for t in (line.get(phase) or {}).get("turns") or []:
                body.append((f"{phase} said", str(t.get("response") or "")))
                if t.get("tool_results"):
                    body.append((f"{phase} got", str(t["tool_results"])))
        each = max(60, (cap - len(head)) // max(1, len(body)) - 12)
        text = head + "".join(f"\n  {k}: {clip(' '.join(v.split()), each)}" for k, v in body)
        return clip(text, cap)
