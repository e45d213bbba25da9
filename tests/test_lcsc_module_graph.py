"""The LCSC engine's import graph: no circles; healing and draining reach the evaluators only through the slots."""

from __future__ import annotations

from tests.test_checkfree_module_graph import ROOT, _cycle, _imports

PACKAGE = "lcsc_ray"


def _graph() -> dict[str, set[str]]:
    """Module -> the LCSC modules it imports (lazy and TYPE_CHECKING imports included)."""
    modules = {f"{PACKAGE}.{p.stem}": p for p in (ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_lcsc_modules_import_no_circle():
    """No LCSC module imports itself back through others (a circle is printed as its path)."""
    assert _cycle(_graph()) is None


def test_healing_and_draining_ask_the_evaluator_slots_not_the_pool():
    """`healing` and `draining` import the slots and never the pool; the slots import neither of them nor the pool."""
    graph = _graph()
    for module in ("healing", "draining"):
        assert f"{PACKAGE}.evaluator_slots" in graph[f"{PACKAGE}.{module}"]
        assert f"{PACKAGE}.pool" not in graph[f"{PACKAGE}.{module}"]
    lcsc_deps = graph[f"{PACKAGE}.evaluator_slots"]
    assert not lcsc_deps & {f"{PACKAGE}.{m}" for m in ("pool", "healing", "draining")}


def test_healing_and_draining_call_no_private_method_of_the_slots():
    """Neither module calls a `slots._name` or `service._name` (the replacement is the slots' public `replace`)."""
    for module in ("healing", "draining"):
        text = (ROOT / PACKAGE / f"{module}.py").read_text()
        assert "slots._" not in text and "service._" not in text and "slots.replace(" in text
