"""Checks a memory structure document, naming every bad field.

The public entry point is ``MemoryStructure.validate()`` (or ``.problems()``); this module holds the
rules. It reads the document as a plain dict whose optional fields are already filled, and never
raises on a bad shape: each problem becomes a ``(field, why)`` pair.
"""
from __future__ import annotations

from automem_jax.memory import ops as ops_mod
from automem_jax.memory.schema import (ACTION_DEFAULTS, ACTION_MATCH, BUDGET_DEFAULTS,
                                       CONTEXT_BLOCKS, KEYED_DEFAULTS, LIMIT_DEFAULTS,
                                       MAX_BUDGET_TURNS, PHASES, PROMPT_PLACEHOLDERS,
                                       REQUIRED_PLACEHOLDERS, REQUIRED_TOP, SCHEMA_VERSION,
                                       TOP_KEYS, name_problem, nbytes)
from automem_jax.memory.template import placeholders


def find_problems(doc) -> list[tuple[str, str]]:
    """Every ``(field, why)`` wrong with ``doc``, in a stable order; empty when it is sound."""
    return _Validator(doc).run()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
            if name not in CONTEXT_BLOCKS:
                self.bad(f"{f}.name", f"unknown context block {name!r} "
                                      f"(known: {', '.join(sorted(CONTEXT_BLOCKS))})")
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
                defaults = CONTEXT_BLOCKS[name].params
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
            ok = allowed | (set(CONTEXT_BLOCKS) if k in PHASES else set())
            for name in sorted(used - ok):
                self.bad(f, f"unknown placeholder {{{name}}} (allowed: "
                            f"{', '.join('{' + a + '}' for a in sorted(allowed))}"
                            f"{' and context block names' if k in PHASES else ''})")
            for name in sorted(REQUIRED_PLACEHOLDERS.get(k, set()) - used):
                self.bad(f, f"must contain the placeholder {{{name}}}")
            if k in PHASES:
                for name in sorted(used & set(CONTEXT_BLOCKS) - blocks[k]):
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

