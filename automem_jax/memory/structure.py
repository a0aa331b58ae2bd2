"""MemoryStructure: the versioned document that shapes the memory skill.

Prompts (LOG/PLAN templates with named placeholders), initial files, the op vocabulary per phase
(including keyed-update ops such as UPSERT_MAP), limits and pruning rules, deterministic context
blocks with parameters, LOG/PLAN budgets and the fallback action. Loop 1 revises this document;
nothing in it is ever executed as code.

    python -m automem_jax.memory.structure show crafter
    python -m automem_jax.memory.structure diff A.yaml B.yaml
    python -m automem_jax.memory.structure validate A.yaml
    python -m automem_jax.memory.structure import-upstream ~/AutoMem --scaffold crafter_v5 \
        --out ~/crafter_v5.json      # text read from your own upstream checkout (upstream.py)
    python -m automem_jax.memory.structure check-upstream ~/crafter_v5.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import re
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import yaml

from automem_jax.memory import ops as ops_mod
from automem_jax.memory.ops import KeyedOp
from automem_jax.memory.store import Limits, PruneRule, name_problem, nbytes

SCHEMA_VERSION = 1
DEFAULTS_DIR = Path(__file__).with_name("defaults")
ENV_ALIASES = {"nle": "nethack", "craftax": "crafter", "craftax_classic": "crafter"}
PHASES = ("log", "plan")
ACTION_MATCH = ("exact", "case_insensitive")
MAX_BUDGET_TURNS = 100

# Placeholders each prompt may use; context-block names are also allowed in `log` and `plan`.
PROMPT_PLACEHOLDERS = {
    "log": {"action_description", "guidance", "observation", "file_index", "file_guide",
            "commands", "step", "prev_step", "context"},
    "plan": {"instruction", "guidance", "observation", "file_index", "file_guide", "commands",
             "step", "context"},
    "log_continue": {"results", "file_index", "action_description", "step", "prev_step"},
    "plan_continue": {"results", "file_index"},
    "handoff": set(),
    "handoff_with_results": {"results"},
    "action_taken": {"prev_step", "action"},
    "action_invalid": {"prev_step", "action", "raw_action"},
    "instruction": {"env_instruction", "actions"},
    "guidance": set(),
}
REQUIRED_PLACEHOLDERS = {
    "log": {"observation", "file_index", "commands", "action_description"},
    "plan": {"observation", "file_index", "commands", "instruction"},
    "log_continue": {"results"},
    "plan_continue": {"results"},
    "handoff_with_results": {"results"},
    "action_invalid": {"raw_action", "action"},
}
OPTIONAL_PROMPTS = {"instruction": None, "guidance": ""}
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

TOP_KEYS = ("schema_version", "name", "env", "version", "parent", "notes", "prompts", "files",
            "ops", "limits", "pruning", "context", "budgets", "action")
REQUIRED_TOP = ("schema_version", "name", "env", "version", "prompts", "files", "ops")
BUDGET_DEFAULTS = {"log_turns": 10, "plan_turns": 10, "gameplay_turns": 10, "max_tokens": 4096}
ACTION_DEFAULTS = {"fallback": "wait", "two_step_commands": [], "match": "exact"}
LIMIT_DEFAULTS = dataclasses.asdict(Limits())
OPS_DEFAULTS = {"order": "type", "vocabulary": {}, "keyed": []}
KEYED_DEFAULTS = {"key": "coord", "usage": "", "description": "",
                  "result": "[Updated {file} entry for {key}]"}


class StructureError(ValueError):
    """A structure failed validation; ``field`` names the first bad field."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        self.field = problems[0][0] if problems else ""
        super().__init__("invalid memory structure:\n" + "\n".join(
            f"  {f}: {why}" for f, why in problems))


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER_RE.findall(template))


def render(template: str, values: Mapping[str, object]) -> str:
    """Fill ``{name}`` placeholders; unknown braces are left alone.

    A line holding only a placeholder whose value is empty disappears together with one of the
    blank lines around it, so switched-off blocks leave no gaps in the prompt.
    """
    out: list[str] = []
    skip_blank = False
    for line in template.split("\n"):
        m = _PLACEHOLDER_RE.fullmatch(line.strip())
        if m and m.group(1) in values and not str(values[m.group(1)]).strip():
            skip_blank = not out or not out[-1].strip()
            continue
        if skip_blank and not line.strip():
            skip_blank = False
            continue
        skip_blank = False
        out.append(_PLACEHOLDER_RE.sub(
            lambda mm: str(values[mm.group(1)]) if mm.group(1) in values else mm.group(0), line))
    return "\n".join(out)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fill(section, defaults: Mapping) -> None:
    if isinstance(section, dict):
        for k, v in defaults.items():
            section.setdefault(k, copy.deepcopy(v))


def _normalise(doc) -> dict:
    """Fill optional fields with their defaults; never fails (validate() reports bad shapes)."""
    if not isinstance(doc, dict):
        return doc
    doc.setdefault("parent", None)
    doc.setdefault("notes", "")
    _fill(doc.get("prompts"), OPTIONAL_PROMPTS)
    files = doc.get("files")
    if isinstance(files, list):
        for f in files:
            _fill(f, {"description": "", "content": ""})
    _fill(doc.get("ops"), OPS_DEFAULTS)
    if isinstance(doc.get("ops"), dict) and isinstance(doc["ops"].get("keyed"), list):
        for k in doc["ops"]["keyed"]:
            _fill(k, KEYED_DEFAULTS)
    doc.setdefault("limits", {})
    _fill(doc["limits"], LIMIT_DEFAULTS)
    doc.setdefault("pruning", [])
    doc.setdefault("context", [])
    if isinstance(doc["context"], list):
        for c in doc["context"]:
            _fill(c, {"enabled": True, "params": {}})
            if isinstance(c, dict) and "phases" not in c:
                from automem_jax.agent.context import BLOCKS
                block = BLOCKS.get(c.get("name"))
                c["phases"] = list(block.phases) if block else list(PHASES)
    doc.setdefault("budgets", {})
    _fill(doc["budgets"], BUDGET_DEFAULTS)
    doc.setdefault("action", {})
    _fill(doc["action"], ACTION_DEFAULTS)
    return doc


class _Dumper(yaml.SafeDumper):
    pass


def _str_repr(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_repr)


class MemoryStructure:
    """A memory structure document (a plain nested dict) with typed accessors."""

    def __init__(self, doc: Mapping):
        self.doc = _normalise(copy.deepcopy(dict(doc)) if isinstance(doc, Mapping) else doc)

    # ----------------------------------------------------------------- io

    @classmethod
    def default(cls, env: str) -> "MemoryStructure":
        name = ENV_ALIASES.get(env, env)
        path = DEFAULTS_DIR / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in DEFAULTS_DIR.glob("*.yaml"))
            raise ValueError(f"no default memory structure for env {env!r}; known: {known}")
        return cls(_load_default(str(path)))

    @staticmethod
    def default_names() -> list[str]:
        return sorted(p.stem for p in DEFAULTS_DIR.glob("*.yaml"))

    @classmethod
    def from_text(cls, text: str, fmt: str = "yaml") -> "MemoryStructure":
        doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        if not isinstance(doc, dict):
            raise StructureError([("(root)", f"expected a mapping, got {type(doc).__name__}")])
        return cls(doc)

    @classmethod
    def load(cls, path: str | Path) -> "MemoryStructure":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            return cls.from_text(text, "json" if path.suffix == ".json" else "yaml")
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise StructureError([("(file)", f"{path} is not valid YAML/JSON: {exc}")]) from exc

    def to_yaml(self) -> str:
        header = (f"# automem_jax MemoryStructure {self.doc.get('name')} (env "
                  f"{self.doc.get('env')}, version {self.doc.get('version')}).\n"
                  "# Comments are ignored on load and not kept on save.\n")
        return header + yaml.dump(self.doc, Dumper=_Dumper, sort_keys=False,
                                  allow_unicode=True, width=100)

    def to_json(self) -> str:
        return json.dumps(self.doc, indent=2, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    def to_dict(self) -> dict:
        return copy.deepcopy(self.doc)

    def copy(self) -> "MemoryStructure":
        return MemoryStructure(self.doc)

    def __eq__(self, other) -> bool:
        return isinstance(other, MemoryStructure) and self.doc == other.doc

    def __repr__(self) -> str:
        return f"MemoryStructure({self.doc.get('name')!r}, env={self.doc.get('env')!r}, " \
               f"version={self.doc.get('version')!r})"

    # ----------------------------------------------------------------- accessors

    name = property(lambda self: self.doc["name"])
    env = property(lambda self: self.doc["env"])
    version = property(lambda self: self.doc["version"])
    prompts = property(lambda self: self.doc["prompts"])
    op_order = property(lambda self: self.doc["ops"]["order"])
    fallback_action = property(lambda self: self.doc["action"]["fallback"])
    two_step_commands = property(lambda self: tuple(self.doc["action"]["two_step_commands"]))
    action_match = property(lambda self: self.doc["action"]["match"])

    @property
    def label(self) -> str:
        return f"{self.name}@v{self.version}"

    def initial_files(self) -> dict[str, str]:
        return {f["name"]: f["content"] for f in self.doc["files"]}

    def file_descriptions(self) -> dict[str, str]:
        return {f["name"]: f["description"] for f in self.doc["files"]}

    def file_guide(self) -> str:
        """One line per initial file that has a description (the ``{file_guide}`` placeholder)."""
        return "\n".join(f"  - {f['name']}: {f['description']}" for f in self.doc["files"]
                         if f["description"].strip())

    def phase_ops(self, phase: str) -> tuple[str, ...]:
        return tuple(self.doc["ops"][phase])

    @property
    def keyed_ops(self) -> dict[str, KeyedOp]:
        return {k["name"]: KeyedOp(**{f: k[f] for f in ("name", "file", "key", "usage",
                                                         "description", "result")})
                for k in self.doc["ops"]["keyed"]}

    @property
    def limits(self) -> Limits:
        return Limits(**self.doc["limits"])

    @property
    def pruning(self) -> tuple[PruneRule, ...]:
        return tuple(PruneRule(r["file"], r["max_lines"], r["keep_lines"])
                     for r in self.doc["pruning"])

    @property
    def budgets(self) -> dict[str, int]:
        return dict(self.doc["budgets"])

    def context_blocks(self, phase: str) -> list[tuple[str, dict]]:
        """(name, params) of the blocks switched on for ``phase``, in document order."""
        return [(c["name"], dict(c["params"])) for c in self.doc["context"]
                if c["enabled"] and phase in c["phases"]]

    def commands_text(self, phase: str) -> str:
        """The op listing shown in a phase's prompt, built from the vocabulary."""
        vocab = self.doc["ops"]["vocabulary"]
        keyed = {k["name"]: k for k in self.doc["ops"]["keyed"]}
        rows = []
        for op in self.phase_ops(phase):
            entry = keyed.get(op) or vocab.get(op) or {}
            usage, desc = entry.get("usage", op), entry.get("description", "")
            rows.append(f"  {usage:<40} {desc}".rstrip())
        return "\n".join(rows)

    def instruction(self, env_instruction: str, actions: list[str] | tuple[str, ...] = ()) -> str:
        override = self.prompts.get("instruction")
        if override is None:
            return env_instruction
        return render(override, {"env_instruction": env_instruction,
                                 "actions": ", ".join(actions)})

    # ----------------------------------------------------------------- validation

    def validate(self) -> "MemoryStructure":
        """Raise StructureError naming every bad field; return self when the document is sound."""
        problems = self.problems()
        if problems:
            raise StructureError(problems)
        return self

    def problems(self) -> list[tuple[str, str]]:
        # Fill defaults first: callers may have edited self.doc since construction.
        self.doc = _normalise(self.doc)
        return _Validator(self.doc).run()


class _Validator:
    def __init__(self, doc):
        self.doc = doc
        self.out: list[tuple[str, str]] = []

    def bad(self, field: str, why: str) -> None:
        self.out.append((field, why))

    def run(self) -> list[tuple[str, str]]:
        d = self.doc
        if not isinstance(d, dict):
            self.bad("(root)", f"expected a mapping, got {type(d).__name__}")
            return self.out
        for k in d:
            if k not in TOP_KEYS:
                self.bad(str(k), f"unknown field (allowed: {', '.join(TOP_KEYS)})")
        for k in REQUIRED_TOP:
            if k not in d:
                self.bad(k, "required field is missing")
        if "schema_version" in d and d["schema_version"] != SCHEMA_VERSION:
            self.bad("schema_version", f"unsupported value {d['schema_version']!r} "
                                       f"(this code reads {SCHEMA_VERSION})")
        for k in ("name", "env"):
            if k in d and (not isinstance(d[k], str) or not d[k].strip()):
                self.bad(k, "expected a non-empty string")
        if "version" in d and not (_is_int(d["version"]) and d["version"] >= 0):
            self.bad("version", f"expected an integer >= 0, got {d['version']!r}")
        if d.get("parent") is not None and not isinstance(d["parent"], str):
            self.bad("parent", "expected a string or null")
        if not isinstance(d.get("notes", ""), str):
            self.bad("notes", "expected a string")
        limits_ok = self.limits(d.get("limits"))
        blocks = self.context(d.get("context"))
        self.prompts(d.get("prompts"), blocks)
        self.files(d.get("files"), d.get("limits") if limits_ok else None)
        self.ops(d.get("ops"))
        self.pruning(d.get("pruning"))
        self.budgets(d.get("budgets"))
        self.action(d.get("action"), d.get("limits") if limits_ok else None)
        return self.out

    def mapping(self, field: str, value) -> bool:
        if not isinstance(value, dict):
            self.bad(field, f"expected a mapping, got {type(value).__name__}")
            return False
        return True

    def str_list(self, field: str, value) -> bool:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            self.bad(field, "expected a list of strings")
            return False
        return True

    def limits(self, lim) -> bool:
        if lim is None or not self.mapping("limits", lim):
            return False
        ok = True
        for k, v in lim.items():
            if k not in LIMIT_DEFAULTS:
                self.bad(f"limits.{k}", f"unknown limit (allowed: {', '.join(LIMIT_DEFAULTS)})")
                ok = False
            elif not (_is_int(v) and v >= 1):
                self.bad(f"limits.{k}", f"expected a positive integer, got {v!r}")
                ok = False
        if ok and lim.get("max_action_chars", 2) < 2:
            self.bad("limits.max_action_chars", "must be at least 2")
            ok = False
        return ok

    def context(self, ctx) -> dict[str, set[str]]:
        """Validate context blocks; returns phase -> names of the blocks switched on there."""
        from automem_jax.agent.context import BLOCKS

        on: dict[str, set[str]] = {p: set() for p in PHASES}
        if ctx is None:
            return on
        if not isinstance(ctx, list):
            self.bad("context", "expected a list of blocks")
            return on
        seen = set()
        for i, c in enumerate(ctx):
            f = f"context[{i}]"
            if not self.mapping(f, c):
                continue
            name = c.get("name")
            if name not in BLOCKS:
                self.bad(f"{f}.name", f"unknown context block {name!r} "
                                      f"(known: {', '.join(sorted(BLOCKS))})")
                continue
            f = f"context[{name}]"
            for k in c:
                if k not in ("name", "enabled", "phases", "params"):
                    self.bad(f"{f}.{k}", "unknown field (allowed: name, enabled, phases, params)")
            if name in seen:
                self.bad(f, "block listed twice")
            seen.add(name)
            if not isinstance(c.get("enabled"), bool):
                self.bad(f"{f}.enabled", "expected true or false")
            phases = c.get("phases")
            if not self.str_list(f"{f}.phases", phases):
                phases = []
            elif not phases or any(p not in PHASES for p in phases):
                self.bad(f"{f}.phases", f"expected a non-empty subset of {list(PHASES)}")
                phases = []
            params = c.get("params")
            if self.mapping(f"{f}.params", params):
                defaults = BLOCKS[name].params
                for k, v in params.items():
                    if k not in defaults:
                        self.bad(f"{f}.params.{k}", f"unknown parameter (allowed: "
                                                    f"{', '.join(defaults) or 'none'})")
                    elif not _same_type(v, defaults[k]):
                        self.bad(f"{f}.params.{k}", f"expected {type(defaults[k]).__name__}, "
                                                    f"got {v!r}")
            if c.get("enabled") is True:
                for p in phases:
                    on[p].add(name)
        return on

    def prompts(self, pr, blocks: dict[str, set[str]]) -> None:
        if pr is None or not self.mapping("prompts", pr):
            return
        for k in pr:
            if k not in PROMPT_PLACEHOLDERS:
                self.bad(f"prompts.{k}", f"unknown prompt (allowed: "
                                         f"{', '.join(PROMPT_PLACEHOLDERS)})")
        from automem_jax.agent.context import BLOCKS

        for k, allowed in PROMPT_PLACEHOLDERS.items():
            f = f"prompts.{k}"
            if k not in pr:
                self.bad(f, "required prompt is missing")
                continue
            t = pr[k]
            if t is None and k == "instruction":
                continue
            if not isinstance(t, str):
                self.bad(f, f"expected a string, got {type(t).__name__}")
                continue
            used = placeholders(t)
            ok = allowed | (set(BLOCKS) if k in PHASES else set())
            for name in sorted(used - ok):
                self.bad(f, f"unknown placeholder {{{name}}} (allowed: "
                            f"{', '.join('{' + a + '}' for a in sorted(allowed))}"
                            f"{' and context block names' if k in PHASES else ''})")
            for name in sorted(REQUIRED_PLACEHOLDERS.get(k, set()) - used):
                self.bad(f, f"must contain the placeholder {{{name}}}")
            if k in PHASES:
                for name in sorted(used & set(BLOCKS) - blocks[k]):
                    self.bad(f, f"uses {{{name}}} but that block is not switched on for {k}")
                if "context" not in used:
                    for name in sorted(blocks[k] - used):
                        self.bad(f"context[{name}]", f"switched on for {k} but prompts.{k} has "
                                                     f"neither {{{name}}} nor {{context}}")

    def files(self, files, lim) -> None:
        if files is None:
            return
        if not isinstance(files, list):
            self.bad("files", "expected a list of files")
            return
        lim = lim or LIMIT_DEFAULTS
        seen = set()
        for i, f in enumerate(files):
            if not self.mapping(f"files[{i}]", f):
                continue
            name = f.get("name")
            if not isinstance(name, str):
                self.bad(f"files[{i}].name", "expected a string")
                continue
            fld = f"files[{name}]"
            why = name_problem(name, lim["max_name_chars"])
            if why:
                self.bad(f"{fld}.name", f"invalid file name: {why}")
            if name in seen:
                self.bad(fld, "file listed twice")
            seen.add(name)
            for k in f:
                if k not in ("name", "description", "content"):
                    self.bad(f"{fld}.{k}", "unknown field (allowed: name, description, content)")
            for k in ("description", "content"):
                if not isinstance(f.get(k), str):
                    self.bad(f"{fld}.{k}", "expected a string")
            content = f.get("content")
            if isinstance(content, str):
                n = len(content.splitlines()) if content.strip() else 0
                if n > lim["max_file_lines"]:
                    self.bad(f"{fld}.content", f"{n} lines exceed limits.max_file_lines "
                                               f"({lim['max_file_lines']})")
                if nbytes(content) > lim["max_file_bytes"]:
                    self.bad(f"{fld}.content", f"{nbytes(content)} bytes exceed "
                                               f"limits.max_file_bytes ({lim['max_file_bytes']})")
        if len(files) > lim["max_files"]:
            self.bad("files", f"{len(files)} files exceed limits.max_files ({lim['max_files']})")

    def ops(self, ops) -> None:
        if ops is None or not self.mapping("ops", ops):
            return
        for k in ops:
            if k not in ("order", "log", "plan", "vocabulary", "keyed"):
                self.bad(f"ops.{k}", "unknown field (allowed: order, log, plan, vocabulary, keyed)")
        if ops.get("order") not in ops_mod.ORDERS:
            self.bad("ops.order",
                     f"expected one of {list(ops_mod.ORDERS)}, got {ops.get('order')!r}")
        keyed_names = self.keyed(ops.get("keyed"))
        known = set(ops_mod.BUILTIN_OPS) | keyed_names
        writes = set(ops_mod.WRITE_OPS) | keyed_names
        vocab = ops.get("vocabulary")
        vocab_ok = self.mapping("ops.vocabulary", vocab)
        if vocab_ok:
            for op, entry in vocab.items():
                f = f"ops.vocabulary.{op}"
                if op not in ops_mod.BUILTIN_OPS:
                    self.bad(f, "not a built-in op (keyed ops are described under ops.keyed)")
                elif not self.mapping(f, entry):
                    continue
                elif set(entry) - {"usage", "description"}:
                    self.bad(f, "unknown field (allowed: usage, description)")
                elif not all(isinstance(entry.get(k), str) and entry.get(k).strip()
                             for k in ("usage", "description")):
                    self.bad(f, "needs non-empty 'usage' and 'description' strings")
        for phase in PHASES:
            f = f"ops.{phase}"
            if phase not in ops:
                self.bad(f, "required field is missing")
                continue
            lst = ops[phase]
            if not self.str_list(f, lst):
                continue
            for op in lst:
                if op not in known:
                    self.bad(f, f"unknown op {op!r} (known: {', '.join(sorted(known))})")
                elif vocab_ok and op in ops_mod.BUILTIN_OPS and op not in vocab:
                    self.bad(f"ops.vocabulary.{op}", f"op {op} is enabled in {phase} but has no "
                                                     "usage/description")
            if len(set(lst)) != len(lst):
                self.bad(f, "an op is listed twice")
            if phase == "plan":
                for op in lst:
                    if op in writes:
                        self.bad(f, f"{op} writes memory, but PLAN is read-only")
                if "DONE" in lst:
                    self.bad(f, "DONE ends LOG; PLAN ends with ACTION")
                if "ACTION" not in lst:
                    self.bad(f, "PLAN must offer ACTION, or no action could ever be committed")
            else:
                if "ACTION" in lst:
                    self.bad(f, "ACTION belongs to PLAN; LOG may not commit game actions")
                if "DONE" not in lst:
                    self.bad(f, "LOG must offer DONE so the model can end logging")

    def keyed(self, keyed) -> set[str]:
        names: set[str] = set()
        if keyed is None:
            return names
        if not isinstance(keyed, list):
            self.bad("ops.keyed", "expected a list of keyed-update ops")
            return names
        for i, k in enumerate(keyed):
            if not self.mapping(f"ops.keyed[{i}]", k):
                continue
            name = k.get("name")
            f = f"ops.keyed[{name if isinstance(name, str) else i}]"
            if not isinstance(name, str) or not ops_mod.OP_NAME_RE.fullmatch(name):
                self.bad(f"{f}.name", "expected an upper-case op name like UPSERT_MAP")
                continue
            if name in ops_mod.BUILTIN_OPS or name == "END":
                self.bad(f"{f}.name", f"{name} is a built-in op name")
                continue
            if name in names:
                self.bad(f, "keyed op defined twice")
            names.add(name)
            for fld in k:
                if fld not in ("name", *KEYED_DEFAULTS, "file"):
                    self.bad(f"{f}.{fld}", "unknown field")
            file = k.get("file")
            why = name_problem(file) if isinstance(file, str) else "expected a string"
            if why:
                self.bad(f"{f}.file", why)
            if k.get("key") not in ops_mod.KEY_KINDS:
                self.bad(f"{f}.key", f"expected one of {list(ops_mod.KEY_KINDS)}")
            for fld in ("usage", "description", "result"):
                if not isinstance(k.get(fld), str):
                    self.bad(f"{f}.{fld}", "expected a string")
            if isinstance(k.get("result"), str):
                extra = placeholders(k["result"]) - {"key", "file"}
                if extra:
                    self.bad(f"{f}.result", f"unknown placeholder(s) {sorted(extra)}; "
                                            "use {key} and {file}")
        return names

    def pruning(self, rules) -> None:
        if rules is None:
            return
        if not isinstance(rules, list):
            self.bad("pruning", "expected a list of rules")
            return
        for i, r in enumerate(rules):
            f = f"pruning[{i}]"
            if not self.mapping(f, r):
                continue
            if set(r) - {"file", "max_lines", "keep_lines"}:
                self.bad(f, "unknown field (allowed: file, max_lines, keep_lines)")
            file = r.get("file")
            why = name_problem(file) if isinstance(file, str) else "expected a string"
            if why:
                self.bad(f"{f}.file", why)
            mx, keep = r.get("max_lines"), r.get("keep_lines")
            if not (_is_int(mx) and mx >= 1):
                self.bad(f"{f}.max_lines", f"expected a positive integer, got {mx!r}")
            elif not (_is_int(keep) and 1 <= keep < mx):
                self.bad(f"{f}.keep_lines", f"expected an integer in [1, max_lines), got {keep!r}")

    def budgets(self, b) -> None:
        if b is None or not self.mapping("budgets", b):
            return
        for k, v in b.items():
            if k not in BUDGET_DEFAULTS:
                self.bad(f"budgets.{k}", f"unknown budget (allowed: {', '.join(BUDGET_DEFAULTS)})")
            elif k == "max_tokens":
                if not (_is_int(v) and 1 <= v <= 1_000_000):
                    self.bad(f"budgets.{k}", f"expected an integer in [1, 1000000], got {v!r}")
            elif not (_is_int(v) and 1 <= v <= MAX_BUDGET_TURNS):
                self.bad(f"budgets.{k}", f"expected an integer in [1, {MAX_BUDGET_TURNS}], "
                                         f"got {v!r}")

    def action(self, a, lim) -> None:
        if a is None or not self.mapping("action", a):
            return
        for k in a:
            if k not in ACTION_DEFAULTS:
                self.bad(f"action.{k}", f"unknown field (allowed: {', '.join(ACTION_DEFAULTS)})")
        fb = a.get("fallback")
        cap = (lim or LIMIT_DEFAULTS)["max_action_chars"]
        if not isinstance(fb, str) or not fb.strip():
            self.bad("action.fallback", "expected a non-empty action string")
        elif len(fb.strip()) >= cap:
            self.bad("action.fallback", f"longer than limits.max_action_chars ({cap})")
        self.str_list("action.two_step_commands", a.get("two_step_commands"))
        if a.get("match") not in ACTION_MATCH:
            self.bad("action.match",
                     f"expected one of {list(ACTION_MATCH)}, got {a.get('match')!r}")


def _same_type(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


@lru_cache(maxsize=None)
def _load_default(path: str) -> dict:
    # Callers never see this dict: MemoryStructure deep-copies what it is given.
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- diff


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif (isinstance(value, list) and value and all(isinstance(x, dict) for x in value)
          and all("name" in x or "file" in x for x in value)):
        for x in value:
            key = x.get("name", x.get("file"))
            _flatten({k: v for k, v in x.items() if k != "name"}, f"{prefix}[{key}]", out)
    else:
        out[prefix] = value


def _entries(flat: dict) -> dict[str, set[str]]:
    """Paths that name list entries (``files[x]``) -> their sub-paths."""
    groups: dict[str, set[str]] = {}
    for path in flat:
        m = re.match(r"^(.*?\[[^\]]*\])", path)
        if m:
            groups.setdefault(m.group(1), set()).add(path)
    return groups


def diff(a: MemoryStructure | Mapping, b: MemoryStructure | Mapping) -> list[str]:
    """A readable change list from ``a`` to ``b`` (empty when they are equal)."""
    da = a.doc if isinstance(a, MemoryStructure) else _normalise(copy.deepcopy(dict(a)))
    db = b.doc if isinstance(b, MemoryStructure) else _normalise(copy.deepcopy(dict(b)))
    fa, fb = {}, {}
    _flatten(da, "", fa)
    _flatten(db, "", fb)
    ga, gb = _entries(fa), _entries(fb)
    lines: list[str] = []
    handled: set[str] = set()
    for entry in sorted(set(ga) | set(gb)):
        if entry not in gb:
            lines.append(f"- {entry}: removed")
            handled |= ga[entry]
        elif entry not in ga:
            size = ""
            content = fb.get(f"{entry}.content")
            if isinstance(content, str):
                size = f" ({len(content.splitlines())} lines)"
            lines.append(f"+ {entry}: added{size}")
            handled |= gb[entry]
    entry_parents = {e[:e.rindex("[")] for e in set(ga) | set(gb)}
    for path in sorted((set(fa) | set(fb)) - handled):
        old, new = fa.get(path, _MISSING), fb.get(path, _MISSING)
        if old == new:
            continue
        if path in entry_parents and (old in ([], _MISSING)) and (new in ([], _MISSING)):
            continue  # an empty list on one side; its entries are listed above
        if old is _MISSING:
            lines.append(f"+ {path}: {_short(new)}")
        elif new is _MISSING:
            lines.append(f"- {path}: removed (was {_short(old)})")
        elif isinstance(old, str) and isinstance(new, str) and ("\n" in old or "\n" in new):
            lines.append(f"~ {path}: text changed")
            body = difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=1)
            lines.extend("    " + ln for ln in list(body)[2:])
        elif isinstance(old, list) and isinstance(new, list) and \
                all(isinstance(x, str) for x in old + new):
            added = [x for x in new if x not in old]
            removed = [x for x in old if x not in new]
            parts = [f"+{x}" for x in added] + [f"-{x}" for x in removed]
            if not parts:
                parts = ["reordered"]
            lines.append(f"~ {path}: {' '.join(parts)}")
        else:
            lines.append(f"~ {path}: {_short(old)} -> {_short(new)}")
    return lines


_MISSING = object()


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------- CLI


def _resolve(arg: str) -> MemoryStructure:
    p = Path(arg)
    if p.is_file():
        return MemoryStructure.load(p)
    if ENV_ALIASES.get(arg, arg) in MemoryStructure.default_names():
        return MemoryStructure.default(arg)
    raise SystemExit(f"error: {arg!r} is neither a structure file nor a default "
                     f"({', '.join(MemoryStructure.default_names())})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.memory.structure",
                                 description="Show, diff, validate and import memory structures.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a structure (a default name or a file)")
    show.add_argument("structure")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    d = sub.add_parser("diff", help="list the changes from A to B")
    d.add_argument("a")
    d.add_argument("b")
    v = sub.add_parser("validate", help="check structures; exit status 1 if any is invalid")
    v.add_argument("structures", nargs="+")
    u = sub.add_parser("import-upstream",
                       help="build a structure from your own checkout of upstream AutoMem")
    u.add_argument("checkout", help="path to a local AutoMem checkout (holds scaffolds/)")
    u.add_argument("--scaffold", required=True, help="e.g. crafter_v5, minihack_v4, nethack_v2")
    u.add_argument("--env", choices=("crafter", "minihack", "nle", "nethack"), default=None,
                   help="which env's files and guidance to take (default: from the name)")
    u.add_argument("--out", required=True, help="structure file to write (.json or .yaml), "
                                                "outside this repository")
    c = sub.add_parser("check-upstream",
                       help="check that an imported structure's upstream files are unchanged")
    c.add_argument("structure")
    c.add_argument("--checkout", default=None, help="look here instead of the recorded path")
    args = ap.parse_args(argv)

    if args.cmd in ("import-upstream", "check-upstream"):
        from automem_jax.memory import upstream
        if args.cmd == "import-upstream":
            return upstream.cli_import(args.checkout, args.scaffold, args.env, args.out)
        return upstream.cli_check(args.structure, args.checkout)

    if args.cmd == "show":
        s = _resolve(args.structure)
        sys.stdout.write(s.to_json() + "\n" if args.json else s.to_yaml())
        return 0
    if args.cmd == "diff":
        changes = diff(_resolve(args.a), _resolve(args.b))
        print("\n".join(changes) if changes else "(no changes)")
        return 0
    status = 0
    for arg in args.structures:
        try:
            _resolve(arg).validate()
            print(f"{arg}: ok")
        except StructureError as exc:
            status = 1
            print(f"{arg}: {exc}")
    return status


if __name__ == "__main__":
    sys.exit(main())
