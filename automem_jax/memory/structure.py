"""MemoryStructure: the versioned document that shapes the memory skill.

Prompts (LOG/PLAN templates with named placeholders), initial files, the op vocabulary per phase
(including keyed-update ops such as UPSERT_MAP), limits and pruning rules, deterministic context
blocks with parameters, LOG/PLAN budgets and the fallback action. Loop 1 revises this document;
nothing in it is ever executed as code. What the document may contain is declared in
``schema.py``, checked by ``validate.py``, compared by ``diff.py``; the commands below are in
``cli.py``:

    python -m automem_jax.memory.structure show crafter
    python -m automem_jax.memory.structure diff A.yaml B.yaml
    python -m automem_jax.memory.structure validate A.yaml
    python -m automem_jax.memory.structure import-upstream ~/AutoMem --scaffold crafter_v5 \
        --out ~/crafter_v5.json      # text read from your own upstream checkout (upstream.py)
    python -m automem_jax.memory.structure check-upstream ~/crafter_v5.json
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import yaml

from automem_jax.memory.ops import KeyedOp
from automem_jax.memory.schema import (ACTION_DEFAULTS, BUDGET_DEFAULTS, CONTEXT_BLOCKS,
                                       KEYED_DEFAULTS, LIMIT_DEFAULTS, OPS_DEFAULTS,
                                       OPTIONAL_PROMPTS, PHASES, Limits, PruneRule)
from automem_jax.memory.template import render
from automem_jax.memory.validate import find_problems

DEFAULTS_DIR = Path(__file__).with_name("defaults")
ENV_ALIASES = {"nle": "nethack", "craftax": "crafter", "craftax_classic": "crafter"}


class StructureError(ValueError):
    """A structure failed validation; ``field`` names the first bad field."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        self.field = problems[0][0] if problems else ""
        super().__init__("invalid memory structure:\n" + "\n".join(
            f"  {f}: {why}" for f, why in problems))


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
                block = CONTEXT_BLOCKS.get(c.get("name"))
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
        return find_problems(self.doc)


@lru_cache(maxsize=None)
def _load_default(path: str) -> dict:
    # Callers never see this dict: MemoryStructure deep-copies what it is given.
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


if __name__ == "__main__":
    # The documented entry point; the commands live in cli.py, which imports this module, so
    # run it by name rather than import it here (no structure <-> cli import cycle).
    import runpy

    runpy.run_module("automem_jax.memory.cli", run_name="__main__")
