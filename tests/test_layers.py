"""The package's shape: the simulation engine (``autofit.sim``) beneath the public layer, and no import cycles."""

import ast
from pathlib import Path

import autofit

PACKAGE = Path(autofit.__file__).parent
BASE = {"autofit", "autofit.errors", "autofit.units", "autofit.files"}  # the floor everything stands on


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every autofit module -> the autofit modules it imports anywhere in its body (functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("autofit")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autofit"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_the_engine_imports_nothing_from_the_public_layer():
    graph = _imports()
    engine = {m for m in graph if m.startswith("autofit.sim")}
    assert {"autofit.sim.simulate", "autofit.sim.allocator", "autofit.sim.tracker", "autofit.sim.arch"} <= engine
    upward = {(m, d) for m in engine for d in graph[m] if not (d.startswith("autofit.sim") or d in BASE)}
    assert upward == set()


def test_the_base_floor_imports_only_itself():
    graph = _imports()
    assert {(m, d) for m in BASE - {"autofit"} for d in graph[m] if d not in BASE} == set()


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
