"""The package's layers only point down, and no module imports itself through others.

Every module under ``src/sparseroute`` is parsed (not imported); each ``import`` and ``from ...
import`` naming a sparseroute module, at module level or inside a function, is an edge. The order
of the layers is the layout of the design (each line imports only from the lines above it):

    routing, registry, fileio, _testing  (and the package root)
    kernels -> moe -> integrations -> data -> attention -> models -> weights -> evaluation
    -> distributed -> train -> lab -> cli

An edge into a higher layer fails, naming the file, the line and the import; so does a cycle
among modules (an edge into a package's ``__init__`` counts, the implicit import of a parent
package does not). One lazy re-export is allowed, as the design says: ``sparseroute.moe``
offers ``from_hf`` / ``to_hf`` by importing ``sparseroute.integrations.hf`` inside its
``__getattr__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sparseroute"

LAYERS: list[tuple[str, ...]] = [
    ("", "routing", "registry", "fileio", "_testing", "__init__"),
    ("kernels",),
    ("moe",),
    ("integrations",),
    ("data",),
    ("attention",),
    ("models",),
    ("weights",),
    ("evaluation",),
    ("distributed",),
    ("train",),
    ("lab",),
    ("cli", "__main__", "doctor"),
]

#: (importing module, imported module): allowed although it points up
ALLOWED_UP = {("sparseroute.moe", "sparseroute.integrations.hf")}


def _level(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer of tests/test_layering.py; place its package in LAYERS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _edges(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name, modules)
                    if target:
                        out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules)
                if target:
                    out.append((target, node.lineno))
    return [(t, line) for t, line in out if t != module]


def _graph():
    modules = _modules()
    return modules, {m: _edges(m, p, modules) for m, p in modules.items()}


def test_every_module_is_placed():
    modules, _ = _graph()
    assert modules, f"no modules found under {SRC / PACKAGE}"
    for m in modules:
        _level(m)


def test_no_import_points_up():
    modules, graph = _graph()
    bad = []
    for m, edges in graph.items():
        for target, line in edges:
            if _level(target) > _level(m) and (m, target) not in ALLOWED_UP:
                rel = modules[m].relative_to(SRC.parent)
                bad.append(f"{rel}:{line}: {m} imports {target}, a higher layer")
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    _, graph = _graph()
    simple = {m: sorted({t for t, _ in edges if (m, t) not in ALLOWED_UP}) for m, edges in graph.items()}
    cycles = _cycles(simple)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """The cycle finder and the layer order catch what they are meant to catch."""
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []
    assert _level("sparseroute.cli") > _level("sparseroute.lab.runner") > _level("sparseroute.train.loop")
    assert _level("sparseroute.evaluation.diagnostics") < _level("sparseroute.train.loop")
    assert _level("sparseroute.kernels.gemm") < _level("sparseroute.moe.layer")
    with pytest.raises(AssertionError, match="no layer"):
        _level("sparseroute.nowhere.x")
