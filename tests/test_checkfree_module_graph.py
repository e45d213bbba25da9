"""The CheckFree engine's import graph: no circles, liveness at the bottom, no reach into the LCSC engine."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "checkfree_ray"


def _imports(path: Path) -> set[str]:
    """Absolute module names `path` imports (lazy and TYPE_CHECKING imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = {f"{PACKAGE}.{p.stem}": p for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_checkfree_modules_import_no_circle():
    """No module of the engine imports itself back through others (a circle is printed as its path)."""
    assert _cycle(_graph()) is None


def test_cycle_finder_reports_a_circle():
    """The circle finder itself sees a three-module circle (so the test above can fail)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_liveness_is_the_bottom_of_the_executor_modules():
    """`liveness.py` imports no other module of the engine but its timeouts (constants that import nothing): the
    executor, the stage group and the recovery share it."""
    graph = _graph()
    assert graph[f"{PACKAGE}.liveness"] == {f"{PACKAGE}.timeouts"}
    assert graph[f"{PACKAGE}.timeouts"] == set()


def test_checkfree_does_not_import_the_lcsc_engine():
    """No module of CheckFree imports `lcsc_ray` (shared code lives in `rayops`)."""
    reaching = {
        p.name
        for p in (ROOT / PACKAGE).glob("*.py")
        if any(name == "lcsc_ray" or name.startswith("lcsc_ray.") for name in _imports(p))
    }
    assert reaching == set()


def test_lcsc_keeps_its_safetensors_names():
    """`lcsc_ray.checkpoint_formats` still offers the safetensors reader, now the one in `rayops`."""
    from lcsc_ray import checkpoint_formats
    from rayops import safetensors_files

    assert checkpoint_formats.load_safetensors is safetensors_files.load_safetensors
    assert checkpoint_formats.SAFETENSORS_HEADER_CAP == 100_000_000
