"""Per-episode memory: a flat set of text files and the ops the model runs on them.

Semantics and return strings follow upstream AutoMem's MemoryFileSystem (v0, plus nethack_v2's
keyed map update and auto-pruning). Differences, all on inputs upstream handled badly or not at
all: unsafe file names are refused instead of rewritten, size limits from the structure are
enforced, TAIL with N <= 0 is an error, and APPEND never glues a note onto an unterminated line.

Nothing the model writes can raise or reach outside the episode's memory: every problem becomes
an error string that the model sees as the op's result.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from automem_jax.memory import ops as ops_mod
from automem_jax.memory.ops import RULE, KeyedOp, OpCall, Parsed
from automem_jax.memory.schema import PHASES, Limits, PruneRule, name_problem, nbytes

DEFAULT_PHASE_OPS = {
    "log": ("READ", "SEARCH", "TAIL", "COUNT", "APPEND", "WRITE", "CREATE", "DONE"),
    "plan": ("READ", "SEARCH", "TAIL", "COUNT", "ACTION"),
}
_SHOWN_NAME_CHARS = 40


class StoreSpec(Protocol):
    """What ``MemoryStore.from_structure`` reads; a MemoryStructure is one."""

    @property
    def limits(self) -> Limits: ...

    @property
    def keyed_ops(self) -> Mapping[str, KeyedOp]: ...

    @property
    def op_order(self) -> str: ...

    @property
    def pruning(self) -> Collection[PruneRule]: ...

    def initial_files(self) -> Mapping[str, str]: ...

    def phase_ops(self, phase: str) -> Collection[str]: ...


@dataclass(frozen=True)
class OpResult:
    op: str
    args: tuple[str, ...]
    text: str  # the result string, e.g. "[Appended to notes.txt]"
    header: str = ""
    ok: bool = True

    @property
    def is_control(self) -> bool:
        return self.op in ops_mod.CONTROL_OPS

    @property
    def block(self) -> str:
        """How the result is shown to the model."""
        if not self.header:
            return self.text
        return f"{RULE} {self.header} {RULE}\n{self.text}"

    def to_dict(self) -> dict:
        return {"op": self.op, "args": list(self.args), "text": self.text, "ok": self.ok}


def _shown(name: str) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in name[:_SHOWN_NAME_CHARS])
    return clean + ("..." if len(name) > _SHOWN_NAME_CHARS else "")


def format_results(results: Collection[OpResult]) -> str:
    """The tool-result text of one turn: one block per memory op, separated by blank lines."""
    return "\n\n".join(r.block for r in results if not r.is_control)


def _lines(content: str) -> list[str]:
    return content.splitlines() if content.strip() else []


class MemoryStore:
    """The files of one episode, held in memory and optionally mirrored to a directory."""

    def __init__(self, initial_files: Mapping[str, str] | None = None, *,
                 limits: Limits | None = None,
                 phase_ops: Mapping[str, Collection[str]] | None = None,
                 keyed_ops: Mapping[str, KeyedOp] | None = None,
                 order: str = "type",
                 pruning: Collection[PruneRule] = (),
                 mirror_dir: str | os.PathLike | None = None):
        if order not in ops_mod.ORDERS:
            raise ValueError(f"order must be one of {ops_mod.ORDERS}, got {order!r}")
        self.limits = limits or Limits()
        self.keyed_ops = dict(keyed_ops or {})
        if phase_ops is None:
            phase_ops = {"log": DEFAULT_PHASE_OPS["log"] + tuple(self.keyed_ops),
                         "plan": DEFAULT_PHASE_OPS["plan"]}
        self.phase_ops = {p: tuple(v) for p, v in phase_ops.items()}
        self.order = order
        self.pruning = tuple(pruning)
        self._initial = {}
        for name, content in (initial_files or {}).items():
            why = name_problem(name, self.limits.max_name_chars)
            if why:
                raise ValueError(f"initial file name {name!r} is invalid: {why}")
            self._initial[name] = str(content)
        self.mirror_dir = Path(mirror_dir) if mirror_dir is not None else None
        self._mirrored: set[str] = set()
        self._files: dict[str, str] = {}
        self.reset()

    @classmethod
    def from_structure(cls, structure: StoreSpec,
                       mirror_dir: str | os.PathLike | None = None) -> "MemoryStore":
        return cls(structure.initial_files(), limits=structure.limits,
                   phase_ops={p: structure.phase_ops(p) for p in PHASES},
                   keyed_ops=structure.keyed_ops, order=structure.op_order,
                   pruning=structure.pruning, mirror_dir=mirror_dir)

    # ----------------------------------------------------------------- state

    @property
    def files(self) -> Mapping[str, str]:
        """name -> content, read-only and live."""
        return MappingProxyType(self._files)

    def snapshot(self) -> dict[str, str]:
        return dict(sorted(self._files.items()))

    def reset(self) -> None:
        """Back to the initial files; a mirror directory loses every file this store wrote."""
        if self.mirror_dir is not None:
            self.mirror_dir.mkdir(parents=True, exist_ok=True)
            for name in self._mirrored | set(self._files):
                (self.mirror_dir / name).unlink(missing_ok=True)
            self._mirrored.clear()
        self._files = {}
        for name, content in self._initial.items():
            self._put(name, content)

    def index(self) -> str:
        """The file index shown in every prompt (upstream's ``file_index``)."""
        if not self._files:
            return "  (no files yet)"
        return "\n".join(f"  - {name} ({len(_lines(content))} lines)"
                         for name, content in sorted(self._files.items()))

    def _put(self, name: str, content: str) -> None:
        # Disk first: if the mirror write fails, memory and mirror still agree.
        if self.mirror_dir is not None:
            tmp = self.mirror_dir / f".{name}.tmp"
            with open(tmp, "w", encoding="utf-8", errors="surrogatepass", newline="") as f:
                f.write(content)
            os.replace(tmp, self.mirror_dir / name)
            self._mirrored.add(name)
        self._files[name] = content

    # ----------------------------------------------------------------- parse / execute

    def ops_for(self, phase: str) -> tuple[str, ...]:
        if phase not in self.phase_ops:
            raise ValueError(f"phase must be one of {sorted(self.phase_ops)}, got {phase!r}")
        return self.phase_ops[phase]

    def parse(self, model_text: str, phase: str) -> Parsed:
        return ops_mod.parse(model_text, self.ops_for(phase), self.keyed_ops, order=self.order,
                             max_action_chars=self.limits.max_action_chars)

    def execute(self, model_text: str, phase: str) -> list[OpResult]:
        """Run every op in ``model_text`` allowed in ``phase``; results in execution order.

        Memory ops come first (grouped by type unless the structure asks for text order), then
        ``DONE`` and ``ACTION`` as control results with empty text.
        """
        parsed = self.parse(model_text, phase)
        results = self.run(parsed.calls)
        if parsed.done:
            results.append(OpResult("DONE", (), ""))
        if parsed.action is not None:
            results.append(OpResult("ACTION", (parsed.action,), ""))
        return results

    def run(self, calls: Collection[OpCall]) -> list[OpResult]:
        calls = list(calls)
        cap = self.limits.max_ops_per_turn
        results = [self.apply(c) for c in calls[:cap]]
        if len(calls) > cap:
            results.append(OpResult(
                "LIMIT", (), f"[ERROR: only the first {cap} commands of a reply are run; "
                f"{len(calls) - cap} more were ignored]", header="LIMIT", ok=False))
        return results

    def apply(self, call: OpCall) -> OpResult:
        header = ops_mod.header_for(call)
        try:
            text, ok = self._dispatch(call)
        except Exception as exc:  # a bug here must not end an episode; the model sees it
            text, ok = f"[ERROR: {call.op} failed: {type(exc).__name__}]", False
        return OpResult(call.op, tuple(call.args), text, header=header, ok=ok)

    def _dispatch(self, call: OpCall) -> tuple[str, bool]:
        op, a = call.op, call.args
        if op in self.keyed_ops:
            return self.upsert(self.keyed_ops[op], a[0], a[1])
        table = {
            "READ": lambda: self.read(a[0]),
            "SEARCH": lambda: self.search(a[0], a[1]),
            "TAIL": lambda: self.tail(a[0], int(a[1])),
            "COUNT": lambda: self.count(a[0], a[1]),
            "APPEND": lambda: self.append(a[0], a[1]),
            "WRITE": lambda: self.write(a[0], a[1]),
            "CREATE": lambda: self.create(a[0]),
        }
        if op not in table:
            return f"[ERROR: unknown command {op}]", False
        return table[op]()

    # ----------------------------------------------------------------- checks

    def _bad_name(self, name: str) -> str | None:
        why = name_problem(name, self.limits.max_name_chars)
        return f"[ERROR: invalid file name '{_shown(name)}': {why}]" if why else None

    def _missing(self, name: str) -> str | None:
        return None if name in self._files else f"[ERROR: file '{name}' does not exist]"

    def _bad_payload(self, *texts: str) -> str | None:
        size = sum(nbytes(t) for t in texts)
        cap = self.limits.max_payload_bytes
        if size > cap:
            return f"[ERROR: command text is {size} bytes; the limit is {cap} bytes]"
        return None

    def _bad_new_content(self, name: str, content: str) -> str | None:
        if name not in self._files and len(self._files) >= self.limits.max_files:
            return (f"[ERROR: cannot create '{name}': memory already holds "
                    f"{len(self._files)} files (limit {self.limits.max_files})]")
        n_lines, size = len(_lines(content)), nbytes(content)
        if n_lines > self.limits.max_file_lines:
            return (f"[ERROR: '{name}' would have {n_lines} lines (limit "
                    f"{self.limits.max_file_lines}); file unchanged. Summarize it with WRITE]")
        if size > self.limits.max_file_bytes:
            return (f"[ERROR: '{name}' would be {size} bytes (limit "
                    f"{self.limits.max_file_bytes}); file unchanged. Summarize it with WRITE]")
        return None

    # ----------------------------------------------------------------- ops (result, ok)

    def read(self, name: str) -> tuple[str, bool]:
        err = self._bad_name(name) or self._missing(name)
        if err:
            return err, False
        content = self._files[name]
        return (content, True) if content.strip() else ("[FILE IS EMPTY]", True)

    def _matches(self, name: str, keyword: str) -> list[str]:
        kw = keyword.lower()
        return [ln for ln in self._files[name].splitlines() if kw in ln.lower()]

    def search(self, name: str, keyword: str) -> tuple[str, bool]:
        err = self._bad_name(name) or self._bad_payload(keyword) or self._missing(name)
        if err:
            return err, False
        if not self._files[name].strip():
            return "[FILE IS EMPTY \u2014 no matches]", True
        found = self._matches(name, keyword)
        if not found:
            return f"[No lines matching '{keyword}']", True
        k = self.limits.max_search_results
        if len(found) > k:
            return (f"[Showing last {k} of {len(found)} matches for '{keyword}']\n"
                    + "\n".join(found[-k:])), True
        return "\n".join(found), True

    def tail(self, name: str, n: int) -> tuple[str, bool]:
        err = self._bad_name(name) or self._missing(name)
        if err:
            return err, False
        if n <= 0:
            return f"[ERROR: TAIL needs a positive number of lines, got {n}]", False
        content = self._files[name]
        if not content.strip():
            return "[FILE IS EMPTY]", True
        return "\n".join(content.splitlines()[-n:]), True

    def count(self, name: str, keyword: str) -> tuple[str, bool]:
        err = self._bad_name(name) or self._bad_payload(keyword) or self._missing(name)
        if err:
            return err, False
        if not self._files[name].strip():
            return f"[0 matches for '{keyword}' \u2014 file is empty]", True
        return f"[{len(self._matches(name, keyword))} line(s) matching '{keyword}']", True

    def append(self, name: str, text: str) -> tuple[str, bool]:
        err = self._bad_name(name) or self._bad_payload(text)
        if err:
            return err, False
        old = self._files.get(name, "")
        if old and not old.endswith("\n"):
            old += "\n"
        new = old + text.rstrip("\n") + "\n"
        err = self._bad_new_content(name, new)
        if err:
            return err, False
        self._put(name, new)
        return f"[Appended to {name}]", True

    def write(self, name: str, text: str) -> tuple[str, bool]:
        err = self._bad_name(name) or self._bad_payload(text)
        if err:
            return err, False
        new = text.rstrip("\n") + "\n" if text.strip() else ""
        err = self._bad_new_content(name, new)
        if err:
            return err, False
        self._put(name, new)
        return f"[Wrote to {name}]", True

    def create(self, name: str) -> tuple[str, bool]:
        err = self._bad_name(name)
        if err:
            return err, False
        if name in self._files:
            return f"[File '{name}' already exists]", True
        err = self._bad_new_content(name, "")
        if err:
            return err, False
        self._put(name, "")
        return f"[Created {name}]", True

    def upsert(self, spec: KeyedOp, key: str, value: str) -> tuple[str, bool]:
        err = self._bad_name(spec.file) or self._bad_payload(key, value)
        if err:
            return err, False
        # One line per key, or later updates could not find the whole entry again.
        value = " ".join(value.split())
        prefix = f"{key}:"
        kept = [ln for ln in self._files.get(spec.file, "").splitlines()
                if not ln.startswith(prefix)]
        new = "\n".join(kept + [f"{key}: {value}"]) + "\n"
        err = self._bad_new_content(spec.file, new)
        if err:
            return err, False
        self._put(spec.file, new)
        return spec.result.replace("{key}", key).replace("{file}", spec.file), True

    def prune(self) -> list[str]:
        """Apply the structure's pruning rules; returns one note per file pruned."""
        notes = []
        for rule in self.pruning:
            lines = self._files.get(rule.file, "").splitlines()
            if len(lines) <= rule.max_lines:
                continue
            dropped = len(lines) - rule.keep_lines
            marker = f"[... {dropped} older entries pruned at step boundary ...]"
            kept = lines[len(lines) - rule.keep_lines:] if rule.keep_lines > 0 else []
            self._put(rule.file, "\n".join([marker] + kept) + "\n")
            notes.append(f"{rule.file}: pruned {dropped} lines, kept {rule.keep_lines}")
        return notes
