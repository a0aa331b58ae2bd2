"""Build a MemoryStructure from the user's own checkout of upstream AutoMem.

automem_jax ships its own wording only. A user who has upstream's repository can still run
upstream's exact prompts: this module reads a scaffold's ``agents/memory_agent.py`` with ``ast``
(nothing of it is imported or executed), takes the module-level constants it needs by name (the
LOG/PLAN templates, the initial memory files, the spatial guidance, the instruction override, the
fallback actions, the turn budgets), translates upstream's ``str.format`` placeholders into ours
and writes a complete structure file for the user, outside this repository.

The structure records where its text came from (the checkout, each file read and its sha256) in
``notes``; ``check-upstream`` re-hashes those files and says clearly when the checkout changed
since the import, so the structure can be re-imported.

    python -m automem_jax.memory.structure import-upstream ~/AutoMem --scaffold crafter_v5 \
        --out ~/structures/crafter_v5.json
    python -m automem_jax.memory.structure check-upstream ~/structures/crafter_v5.json
"""
from __future__ import annotations

import ast
import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from automem_jax.memory import ops as ops_mod
from automem_jax.memory.structure import MemoryStructure, StructureError
from automem_jax.memory.template import placeholders, render

UPSTREAM_ENVS = ("crafter", "minihack", "nle")
ENV_ARG_ALIASES = {"nethack": "nle"}
OUR_ENV = {"crafter": "crafter", "minihack": "minihack", "nle": "nethack"}
AGENT_FILE = "agents/memory_agent.py"

# Which of our prompts each upstream template becomes; optional ones may be absent.
TEMPLATES = {"LOG_SYSTEM": "log", "LOG_CONTINUE": "log_continue", "PLAN_SYSTEM": "plan",
             "PLAN_CONTINUE": "plan_continue"}
OPTIONAL_TEMPLATES = {"PLAN_HANDOFF": "handoff", "PLAN_HANDOFF_WITH_RESULTS":
                      "handoff_with_results"}
PHASE_OF = {"log": "log", "plan": "plan"}

# Upstream placeholder -> ("ph", our placeholder) | ("block", context block) |
# ("const", {env: constant whose text is inlined}) | ("drop", why).
PLACEHOLDER_MAP: dict[str, tuple] = {
    "action_description": ("ph", "action_description"),
    "observation": ("ph", "observation"),
    "file_index": ("ph", "file_index"),
    "results": ("ph", "results"),
    "spatial_guidance": ("ph", "guidance"),
    "instruction_prompt": ("ph", "instruction"),
    "diff_notice": ("block", "unchanged_observation"),
    "stuckness_warning": ("block", "unchanged_observation"),
    "map_analysis": ("block", "map_analysis"),
    "inventory_changes": ("block", "inventory_change"),
    "vital_urgency": ("block", "vitals_urgency"),
    "repetition_warning": ("block", "repetition"),
    "oscillation_warning": ("block", "repetition"),
    "recent_actions_section": ("block", "recent_actions"),
    "env_specific_logging": ("const", {"crafter": "CRAFTER_LOG_INSTRUCTIONS"}),
    "env_specific_planning": ("const", {"crafter": "CRAFTER_PLAN_INSTRUCTIONS"}),
}
# Filled by upstream code that automem_jax does not reimplement: left out, and listed in notes.
for _name in ("compaction_warnings", "craft_failure_notice", "threat_warning", "noop_warning",
              "stagnation_warning", "tech_tree_status", "craft_context", "goals_content",
              "auto_memory_context", "direction_prompt_notice", "exploration_guidance",
              "mandatory_exploration", "stairs_directive", "task_tips", "game_status",
              "stairs_reminder", "stairs_urgency"):
    PLACEHOLDER_MAP[_name] = ("drop", "computed by upstream code with no automem_jax equivalent")
# Upstream computes a NetHack map analysis for nle/minihack only; on Crafter it is always empty.
BLOCK_ENVS = {"map_analysis": ("nle", "minihack")}

_ENTRY_RE = re.compile(r"^( {1,8})(<\|([A-Z][A-Z0-9_]*)\|>(?:.*?<\|END\|>)?)\s+(\S.*)$")
_DROP = "__upstream_drop_{}__"
_NOTE_ROOT = "upstream-root: "
_NOTE_FILE = "upstream-file: "


class UpstreamError(ValueError):
    """The scaffold could not be turned into a structure; the message names what and where."""


# --------------------------------------------------------------------------- ast constants


class _Unsupported(Exception):
    pass


@dataclass
class _Module:
    path: Path
    rel: str
    sha256: str
    assigns: dict[str, ast.expr]
    imports: dict[str, tuple[str, int, str]]  # local name -> (module, level, original name)
    tree: ast.Module


@dataclass
class Scaffold:
    """A scaffold's modules, parsed but never run; constants are evaluated on demand."""

    root: Path  # the checkout
    name: str
    modules: dict[Path, _Module] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.root / "scaffolds" / self.name

    @property
    def agent_path(self) -> Path:
        return self.dir / AGENT_FILE

    @classmethod
    def open(cls, root: str | Path, name: str) -> "Scaffold":
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise UpstreamError(f"upstream checkout {root} does not exist or is not a folder")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise UpstreamError(f"invalid scaffold name {name!r}")
        s = cls(root, name)
        if not s.agent_path.is_file():
            found = sorted(p.parent.parent.name
                           for p in (root / "scaffolds").glob(f"*/{AGENT_FILE}"))
            raise UpstreamError(
                f"scaffold {name!r} not found: {s.agent_path} does not exist (scaffolds with an "
                f"{AGENT_FILE} under {root / 'scaffolds'}: {', '.join(found) or 'none'})")
        s._parse(s.agent_path)
        return s

    def _parse(self, path: Path) -> _Module:
        path = path.resolve()
        if path in self.modules:
            return self.modules[path]
        rel = path.relative_to(self.root).as_posix()
        data = path.read_bytes()
        try:
            tree = ast.parse(data.decode("utf-8"), filename=str(path))
        except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
            raise UpstreamError(f"{path} is not a Python file that can be parsed: "
                                f"{type(exc).__name__}: {exc}") from None
        assigns: dict[str, ast.expr] = {}
        imports: dict[str, tuple[str, int, str]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        assigns[t.id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.value is not None:
                assigns[node.target.id] = node.value
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    imports[a.asname or a.name] = (node.module or "", node.level, a.name)
        mod = _Module(path, rel, hashlib.sha256(data).hexdigest(), assigns, imports, tree)
        self.modules[path] = mod
        return mod

    @property
    def agent(self) -> _Module:
        return self.modules[self.agent_path.resolve()]

    def has(self, name: str) -> bool:
        return name in self.agent.assigns or name in self.agent.imports

    def const(self, name: str, *, mod: _Module | None = None, _seen: frozenset = frozenset()):
        """The value of a module-level constant; UpstreamError naming it when it is missing."""
        mod = mod or self.agent
        key = (mod.path, name)
        if key in _seen:
            raise UpstreamError(f"constant {name} in {mod.path} refers to itself")
        _seen = _seen | {key}
        if name in mod.assigns:
            try:
                return self._eval(mod.assigns[name], mod, _seen)
            except _Unsupported as exc:
                raise UpstreamError(f"constant {name} in {mod.path} is not a plain constant "
                                    f"expression ({exc})") from None
        if name in mod.imports:
            other = self._import(mod, *mod.imports[name][:2])
            if other is not None:
                return self.const(mod.imports[name][2], mod=other, _seen=_seen)
        raise UpstreamError(f"constant {name} not found in {mod.path}")

    def _import(self, mod: _Module, module: str, level: int) -> _Module | None:
        """The scaffold file an ``from X import Y`` names, when it is inside the scaffold."""
        base = mod.path.parent
        for _ in range(max(level - 1, 0)):
            base = base.parent
        parts = module.split(".") if module else []
        candidates = [base.joinpath(*parts)] if level else [self.dir.joinpath(*parts)]
        for c in candidates:
            for p in (c.with_suffix(".py"), c / "__init__.py"):
                if p.is_file() and self.dir.resolve() in p.resolve().parents:
                    return self._parse(p)
        return None

    def _eval(self, node: ast.expr, mod: _Module, seen: frozenset):
        ev = lambda n: self._eval(n, mod, seen)  # noqa: E731
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            try:
                return self.const(node.id, mod=mod, _seen=seen)
            except UpstreamError as exc:
                raise _Unsupported(f"line {node.lineno}: {exc}") from None
        if isinstance(node, ast.JoinedStr):
            raise _Unsupported(f"f-string at line {node.lineno}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.BitOr)):
            left, right = ev(node.left), ev(node.right)
            try:
                return left + right if isinstance(node.op, ast.Add) else left | right
            except TypeError as exc:
                raise _Unsupported(f"line {node.lineno}: {exc}") from None
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise _Unsupported(f"dict unpacking at line {node.lineno}")
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Set):
            return {ev(e) for e in node.elts}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords \
                and node.func.id in ("frozenset", "set", "tuple", "list") and len(node.args) <= 1:
            items = ev(node.args[0]) if node.args else []
            return set(items) if node.func.id in ("frozenset", "set") else list(items)
        raise _Unsupported(f"{type(node).__name__} at line {getattr(node, 'lineno', '?')}")

    def get(self, name: str, default=None):
        return self.const(name) if self.has(name) else default

    def text(self, name: str) -> str:
        v = self.const(name)
        if not isinstance(v, str):
            raise UpstreamError(f"constant {name} in {self.agent_path} is a "
                                f"{type(v).__name__}, expected a string")
        return v

    def referenced(self, name: str) -> bool:
        """Whether the agent module reads ``name`` anywhere (not just assigns it)."""
        return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                   for n in ast.walk(self.agent.tree))

    def prune_calls(self) -> list[dict]:
        """``x.auto_prune("file", max_lines=..., keep_lines=...)`` calls, defaults filled in."""
        defaults: dict[str, object] = {}
        for node in ast.walk(self.agent.tree):
            if isinstance(node, ast.FunctionDef) and node.name == "auto_prune":
                names = [a.arg for a in node.args.args]
                for a, d in zip(names[len(names) - len(node.args.defaults):], node.args.defaults):
                    defaults[a] = d
        rules = []
        for node in ast.walk(self.agent.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "auto_prune" and node.args):
                continue
            try:
                file = self._eval(node.args[0], self.agent, frozenset())
                kw = {**defaults, **{k.arg: k.value for k in node.keywords if k.arg}}
                mx = self._eval(kw["max_lines"], self.agent, frozenset())
                keep = self._eval(kw["keep_lines"], self.agent, frozenset())
            except (_Unsupported, KeyError, UpstreamError):
                continue
            if isinstance(file, str) and isinstance(mx, int) and isinstance(keep, int):
                rules.append({"file": file, "max_lines": mx, "keep_lines": keep})
        return rules


# --------------------------------------------------------------------------- templates


@dataclass
class _Translated:
    text: str
    blocks: list[str]
    dropped: list[str]


def _check_literal(constant: str, text: str, what: str) -> None:
    found = sorted(placeholders(text))
    if found:
        raise UpstreamError(f"{constant}: {what} contains {{{found[0]}}}, which automem_jax "
                            "would read as a placeholder; it cannot be imported as is")


def translate(constant: str, template: str, env: str, sc: Scaffold) -> _Translated:
    """Upstream ``str.format`` template -> our placeholder syntax (``{{`` becomes ``{``)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UpstreamError(f"{constant} is not a valid format template: {exc}") from None
    out: list[str] = []
    blocks: list[str] = []
    dropped: list[str] = []
    drops: dict[str, str] = {}
    # Escaped braces split the literal text into pieces; fields separate the pieces with \0.
    _check_literal(constant, "".join(p[0] + ("\0" if p[1] is not None else "") for p in parts),
                   "literal text (after {{/}} unescaping)")
    for literal, name, spec, conv in parts:
        out.append(literal)
        if name is None:
            continue
        if spec or conv or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UpstreamError(f"{constant}: placeholder {{{name}"
                                f"{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                                "cannot be mapped (only plain {name} placeholders are supported)")
        kind = PLACEHOLDER_MAP.get(name)
        if kind is None:
            raise UpstreamError(
                f"{constant}: placeholder {{{name}}} cannot be mapped to automem_jax (known "
                f"upstream placeholders: {', '.join(sorted(PLACEHOLDER_MAP))})")
        if kind[0] == "ph":
            out.append("{" + kind[1] + "}")
        elif kind[0] == "block" and env in BLOCK_ENVS.get(kind[1], UPSTREAM_ENVS):
            out.append("{" + kind[1] + "}")
            if kind[1] not in blocks:
                blocks.append(kind[1])
        elif kind[0] == "const" and env in kind[1]:
            text = sc.text(kind[1][env])
            _check_literal(kind[1][env], text, f"the text inlined for {{{name}}}")
            out.append(text)
        else:  # dropped, or empty for this env: removed like an empty block
            token = _DROP.format(len(drops))
            drops[token] = ""
            out.append("{" + token + "}")
            if kind[0] == "drop":
                dropped.append(name)
    return _Translated(render("".join(out), drops), blocks, dropped)


@dataclass
class _Listing:
    text: str  # the template with the listing replaced by {commands}
    ops: list[str]
    entries: dict[str, tuple[str, str]]  # op -> (usage, description)


def extract_commands(constant: str, template: str) -> _Listing:
    """Replace upstream's hard-coded command listing with ``{commands}``; return its entries."""
    lines = template.split("\n")
    start = end = None
    ops, entries = [], {}
    i = 0
    while i < len(lines):
        m = _ENTRY_RE.match(lines[i])
        if not m:
            i += 1
            continue
        if start is not None and i != end:
            raise UpstreamError(f"{constant}: two separate command listings; expected one")
        start = i if start is None else start
        indent, usage, op, desc = len(m.group(1)), m.group(2), m.group(3), m.group(4).strip()
        i += 1
        more = []
        while i < len(lines) and lines[i].strip() and not _ENTRY_RE.match(lines[i]) \
                and len(lines[i]) - len(lines[i].lstrip()) > indent:
            more.append(lines[i].rstrip())  # continuation lines keep their own indentation
            i += 1
        if op in entries:
            raise UpstreamError(f"{constant}: command {op} is listed twice")
        ops.append(op)
        # Our listing is "  " + usage padded to 40 + " " + description: pad the usage further
        # when upstream's description column is further right, so the columns line up.
        width = m.start(4) - 3
        entries[op] = (usage.ljust(width) if width > 40 and indent == 2 else usage,
                       "\n".join([desc] + more))
        end = i
    if start is None:
        raise UpstreamError(f"{constant}: no command listing found (lines such as "
                            "'  <|SEARCH|>file|keyword<|END|>   description'), so there is "
                            "nothing to turn into automem_jax's {commands}")
    text = "\n".join(lines[:start] + ["{commands}"] + lines[end:])
    return _Listing(text, ops, entries)


# --------------------------------------------------------------------------- the import


def infer_env(scaffold: str) -> str:
    low = scaffold.lower()
    for prefix, env in (("crafter", "crafter"), ("minihack", "minihack"), ("nethack", "nle"),
                        ("nle", "nle")):
        if low.startswith(prefix):
            return env
    raise UpstreamError(f"cannot tell which env scaffold {scaffold!r} is for; pass --env "
                        f"({'|'.join(UPSTREAM_ENVS)})")


def _by_env(sc: Scaffold, table: str, default: str, env: str):
    if sc.has(table):
        value = sc.const(table)
        if not isinstance(value, dict):
            raise UpstreamError(f"constant {table} in {sc.agent_path} is a "
                                f"{type(value).__name__}, expected a dict literal")
        if env in value:
            return value[env], f"{table}[{env!r}]"
    if sc.has(default):
        return sc.const(default), default
    raise UpstreamError(f"constant {table} (with an entry for {env!r}) or {default} not found "
                        f"in {sc.agent_path}")


def import_scaffold(root: str | Path, scaffold: str, env: str | None = None) -> MemoryStructure:
    """Read the scaffold's constants and build a validated structure holding their text."""
    sc = Scaffold.open(root, scaffold)
    env = ENV_ARG_ALIASES.get(env, env) if env else infer_env(scaffold)
    if env not in UPSTREAM_ENVS:
        raise UpstreamError(f"unknown env {env!r}; expected one of {', '.join(UPSTREAM_ENVS)}")
    base = MemoryStructure.default(OUR_ENV[env])
    doc = base.to_dict()
    notes: list[str] = []

    # Prompts.
    prompts = doc["prompts"]
    origin: dict[str, str] = {}
    blocks: dict[str, list[str]] = {"log": [], "plan": []}
    dropped: dict[str, list[str]] = {}
    listings: dict[str, _Listing] = {}
    for const, ours in list(TEMPLATES.items()) + list(OPTIONAL_TEMPLATES.items()):
        if const in OPTIONAL_TEMPLATES and not sc.has(const):
            continue
        t = translate(const, sc.text(const), env, sc)
        text = t.text
        if ours in PHASE_OF:
            listings[ours] = extract_commands(const, text)
            text = listings[ours].text
            blocks[ours] = t.blocks
        elif t.blocks:
            raise UpstreamError(f"{const}: placeholder(s) for context blocks "
                                f"({', '.join(t.blocks)}) are only supported in LOG_SYSTEM "
                                "and PLAN_SYSTEM")
        if t.dropped:
            dropped[const] = t.dropped
        prompts[ours] = text
        origin[ours] = const
    if "handoff" in origin and "handoff_with_results" not in origin or \
            "handoff_with_results" in origin and "handoff" not in origin:
        notes.append("only one of PLAN_HANDOFF / PLAN_HANDOFF_WITH_RESULTS exists; the other "
                     "handoff prompt is automem_jax's")

    guidance_used = any("guidance" in placeholders(prompts[p]) for p in ("log", "plan"))
    if guidance_used:
        g, src = _by_env(sc, "SPATIAL_GUIDANCE", "SPATIAL_GUIDANCE_DEFAULT", env)
        if not isinstance(g, str):
            raise UpstreamError(f"{src} is a {type(g).__name__}, expected a string")
        _check_literal(src, g, "the guidance text")
        prompts["guidance"] = g
        origin["guidance"] = src
    else:
        prompts["guidance"] = ""

    override = f"{'NLE' if env == 'nle' else env.upper()}_MEMORY_SYSTEM_PROMPT"
    if sc.has(override) and sc.referenced(override):
        text = sc.text(override)
        _check_literal(override, text, "the instruction text")
        prompts["instruction"] = text
        origin["instruction"] = override
    else:
        prompts["instruction"] = None  # upstream uses the environment's own instruction here

    # Initial files.
    files, src = _by_env(sc, "INITIAL_FILES_BY_ENV", "INITIAL_FILES_DEFAULT", env)
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in files.items()):
        raise UpstreamError(f"{src} in {sc.agent_path} is not a dict of file name -> text")
    desc = base.file_descriptions()
    doc["files"] = [{"name": n, "description": desc.get(n, ""), "content": c}
                    for n, c in files.items()]

    # Ops: the listings become the phase op lists and the vocabulary.
    keyed = {k["name"]: k for k in doc["ops"]["keyed"]}
    vocab: dict[str, dict] = {}
    differ: list[str] = []
    for phase in ("log", "plan"):
        lst = listings[phase]
        for op in lst.ops:
            usage, description = lst.entries[op]
            if op in keyed:
                if keyed[op].get("_set"):
                    continue
                keyed[op].update(usage=usage, description=description, _set=True)
            elif op in ops_mod.BUILTIN_OPS:
                if op in vocab:
                    if (vocab[op]["usage"], vocab[op]["description"]) != (usage, description):
                        differ.append(op)
                    continue
                vocab[op] = {"usage": usage, "description": description}
            else:
                raise UpstreamError(
                    f"{origin[phase]}: command {op} has no automem_jax equivalent (built-in: "
                    f"{', '.join(ops_mod.BUILTIN_OPS)}; keyed ops of the {OUR_ENV[env]} "
                    f"structure: {', '.join(keyed) or 'none'})")
        doc["ops"][phase] = list(lst.ops)
    for k in keyed.values():
        k.pop("_set", None)
    doc["ops"]["vocabulary"] = vocab
    used = set(doc["ops"]["log"]) | set(doc["ops"]["plan"])
    doc["ops"]["keyed"] = [k for k in doc["ops"]["keyed"] if k["name"] in used]
    if differ:
        notes.append(f"PLAN_SYSTEM describes {', '.join(differ)} differently from LOG_SYSTEM; "
                     "a structure has one description per op, so LOG_SYSTEM's is shown in both")

    # Context blocks: exactly those the templates name, in the phases that name them.
    params = {c["name"]: c["params"] for c in doc["context"]}
    names = list(dict.fromkeys(blocks["log"] + blocks["plan"]))
    doc["context"] = [{"name": n, "enabled": True,
                       "phases": [p for p in ("log", "plan") if n in blocks[p]],
                       "params": dict(params.get(n, {}))} for n in names]

    # Numbers and the action.
    for const, section, key in (("MAX_LOG_ITERATIONS", "budgets", "log_turns"),
                                ("MAX_VALIDATE_ITERATIONS", "budgets", "plan_turns"),
                                ("MAX_SEARCH_RESULTS", "limits", "max_search_results")):
        v = sc.get(const)
        if v is not None:
            doc[section][key] = v
    fb = sc.get("FALLBACK_ACTIONS", {})
    fb = fb.get(env) if isinstance(fb, dict) and env in fb else sc.get("FALLBACK_ACTION_DEFAULT")
    if fb is not None:
        doc["action"]["fallback"] = fb
    two = sc.get("_TWO_STEP_COMMANDS")
    if env != "crafter" and isinstance(two, (set, list)):
        doc["action"]["two_step_commands"] = sorted(two)
    names_now = {f["name"] for f in doc["files"]}
    doc["pruning"] = [r for r in sc.prune_calls() if r["file"] in names_now] or doc["pruning"]

    doc.update(name=f"upstream-{scaffold}-{env}", env=OUR_ENV[env], version=0, parent=None)
    lines = [f"Imported from upstream AutoMem scaffold {scaffold} (env {env}) by "
             "`python -m automem_jax.memory.structure import-upstream`. The prompt text and "
             "initial files come from the user's checkout; they are not part of automem_jax.",
             _NOTE_ROOT + str(sc.root)]
    lines += [f"{_NOTE_FILE}{m.rel} sha256={m.sha256}" for m in sc.modules.values()]
    lines += [f"prompts.{k} <- {v}" for k, v in origin.items()]
    for const, names_ in dropped.items():
        lines.append(f"left out of {const} (no automem_jax equivalent): "
                     + ", ".join("{" + n + "}" for n in names_))
    lines += notes
    doc["notes"] = "\n".join(lines)

    s = MemoryStructure(doc)
    problems = s.problems()
    if problems:
        msg = []
        for fld, why in problems:
            p = fld.split(".")[1].split("[")[0] if fld.startswith("prompts.") else None
            src_ = f" (from {origin[p]})" if p in origin else ""
            msg.append(f"  {fld}{src_}: {why}")
        raise UpstreamError(f"scaffold {scaffold} does not make a valid structure:\n"
                            + "\n".join(msg))
    return s


def sources(s: MemoryStructure) -> tuple[Path | None, dict[str, str]]:
    """(checkout, {relative path: sha256}) recorded by import_scaffold in the notes."""
    root, files = None, {}
    for line in str(s.doc.get("notes") or "").splitlines():
        if line.startswith(_NOTE_ROOT):
            root = Path(line[len(_NOTE_ROOT):])
        elif line.startswith(_NOTE_FILE):
            rel, _, sha = line[len(_NOTE_FILE):].rpartition(" sha256=")
            files[rel] = sha
    return root, files


def check_sources(s: MemoryStructure, root: str | Path | None = None) -> list[str]:
    """Problems with the upstream files a structure was imported from; [] when unchanged."""
    recorded_root, files = sources(s)
    if not files:
        return [f"{s.label} records no upstream files (it was not made by import-upstream)"]
    base = Path(root).expanduser().resolve() if root else recorded_root
    out = []
    for rel, sha in files.items():
        p = base / rel
        if not p.is_file():
            out.append(f"{rel}: missing in {base} (recorded sha256 {sha})")
            continue
        now = hashlib.sha256(p.read_bytes()).hexdigest()
        if now != sha:
            out.append(f"{rel}: sha256 mismatch, the file changed since the import (recorded "
                       f"{sha}, now {now}); run import-upstream again to use the new text")
    return out


def _inside_repo(path: Path) -> Path | None:
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "setup.py").is_file() or not (repo / "automem_jax").is_dir():
        return None
    try:
        path.resolve().relative_to(repo)
    except ValueError:
        return None
    return repo


def cli_import(root: str, scaffold: str, env: str | None, out: str) -> int:
    out_p = Path(out).expanduser()
    repo = _inside_repo(out_p)
    if repo is not None:
        print(f"error: {out_p} is inside the automem_jax repository ({repo}); upstream's text "
              "must not be stored there. Write the structure somewhere else.")
        return 2
    try:
        s = import_scaffold(root, scaffold, env)
    except UpstreamError as exc:
        print(f"error: {exc}")
        return 1
    s.save(out_p)
    _, files = sources(s)
    print(f"wrote {out_p}: {s.label} ({len(s.doc['files'])} initial files, log ops "
          f"{' '.join(s.phase_ops('log'))}, plan ops {' '.join(s.phase_ops('plan'))})")
    for rel, sha in files.items():
        print(f"  from {rel} sha256={sha}")
    for line in s.doc["notes"].splitlines():
        if line.startswith("left out of") or "differently" in line or "only one of" in line:
            print(f"  note: {line}")
    return 0


def cli_check(structure: str, root: str | None) -> int:
    try:
        s = MemoryStructure.load(structure)
    except (OSError, StructureError) as exc:
        print(f"error: {exc}")
        return 1
    problems = check_sources(s, root)
    if problems:
        print(f"{structure}: upstream sources changed or missing:")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"{structure}: upstream sources unchanged")
    return 0
