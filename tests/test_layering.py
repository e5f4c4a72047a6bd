"""Import layering (docs/architecture.md, "Package layering"): a static scan of every
first-party import, at module level or inside a function, gives the module graph; it must
be acyclic, and between packages only the documented layering may hold:

    core  <-  hw_targets  <-  exporters  <-  sims  <-  toolchain

(a package imports only those to its left; ``core`` imports nothing first-party)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the first-party packages it may import
LAYERS = {
    "core": set(),
    "hw_targets": {"core"},
    "exporters": {"core", "hw_targets"},
    "sims": {"core", "hw_targets", "exporters"},
    "toolchain": {"core", "hw_targets", "exporters", "sims"},
}


def _modules() -> dict[str, Path]:
    """Every first-party module name ("sims.lava_procs.models", "hw_targets") -> its file."""
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """First-party modules an import statement loads: ``from a import b`` is module ``a.b``
    when that is a module, else ``a``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                 else node.module for alias in node.names]
    else:
        assert not (isinstance(node, ast.ImportFrom) and node.level), "relative import"
        return []
    return [name for name in names if name in modules]


def import_graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (anywhere in the file)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {dep for node in ast.walk(tree) for dep in _imported(node, modules)
                       if dep != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    top = lambda m: m.split(".")[0]  # noqa: E731
    return {(top(a), top(b)) for a, deps in graph.items() for b in deps if top(a) != top(b)}


def test_the_scan_sees_the_imports() -> None:
    graph = import_graph()
    assert {"core.ir", "toolchain.builder", "sims.lava_procs.models", "hw_targets"} <= set(graph)
    assert "toolchain.report" in graph["toolchain.pipeline"]  # imported inside a function
    assert "sims.engine" in graph["toolchain.calibrate"]  # "from sims import engine"
    assert "core.errors" in graph["hw_targets.base"]


def test_cycle_detector_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert package_edges({"sims.x": {"toolchain.y"}}) == {("sims", "toolchain")}


def test_no_module_import_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_package_layering(package: str) -> None:
    graph = import_graph()
    bad = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                 if a.split(".")[0] == package and b.split(".")[0] != package
                 and b.split(".")[0] not in LAYERS[package])
    assert not bad, f"{package} may import only {sorted(LAYERS[package])}: {bad}"


def test_layering_is_acyclic() -> None:
    assert cycles({p: set(deps) for p, deps in LAYERS.items()}) == []
