"""The package's shape, read from the source: no import cycle among automem_jax modules (function-local
and type-only imports count), each package imports only its own layer or the ones below, and no
library module over 700 lines."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "automem_jax"
MAX_LINES = 700

# Bottom to top. A package may import its own layer and those below it.
LAYERS = (
    ("storage", "parallel"),
    ("memory", "envs"),
    ("agent", "models"),
    ("llm", "training", "rollout"),
    ("critic",),
    ("loops", "report"),
)
LAYER = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(REPO, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """Every automem_jax module `name` imports, wherever the import statement stands. The implicit
    import of a parent package is not an edge (Python runs it first, whatever the order)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_the_walk_sees_the_package():
    assert len(MODULES) > 50 and "automem_jax.memory.structure" in MODULES
    assert "automem_jax.memory.schema" in GRAPH["automem_jax.memory.store"]
    assert {_package(m) for m in MODULES} - {PKG} <= set(LAYER), "a package without a layer"


def test_no_import_cycle():
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_seen(monkeypatch):
    """The check above can fail: a planted back edge makes a cycle it reports."""
    monkeypatch.setitem(GRAPH, "automem_jax.memory.schema",
                        GRAPH["automem_jax.memory.schema"] | {"automem_jax.memory.store"})
    with pytest.raises(AssertionError, match="memory.schema"):
        test_no_import_cycle()


def _upward() -> list[str]:
    bad = []
    for a, targets in GRAPH.items():
        for b in targets:
            pa, pb = _package(a), _package(b)
            if pa != PKG and pb != PKG and LAYER[pb] > LAYER[pa]:
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def test_packages_import_only_their_layer_or_below():
    assert not _upward()


def test_memory_and_envs_import_nothing_above_them():
    for m, targets in GRAPH.items():
        if _package(m) in ("memory", "envs"):
            above = [t for t in targets if _package(t) not in ("memory", "envs", "storage", "parallel")]
            assert not above, f"{m} imports {above}"


def test_an_upward_import_is_seen(monkeypatch):
    monkeypatch.setitem(GRAPH, "automem_jax.memory.structure",
                        GRAPH["automem_jax.memory.structure"] | {"automem_jax.agent.context"})
    assert _upward() == ["automem_jax.memory.structure -> automem_jax.agent.context"]


def test_no_library_module_over_700_lines():
    long = {}
    for m, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[m] = n
    assert not long, f"modules over {MAX_LINES} lines: {long}"
