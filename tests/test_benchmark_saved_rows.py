"""A report regenerated from a written result: `harness.saved_rows` gives back the rows of `<name>.json` that are
the sweep's configs, seeds and config values, and `harness.measured_rows` every row measured so far, so a
report-only run needs no local row cache."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """benchmarks/harness.py with its results and row cache under tmp_path."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("harness", BENCH / "harness.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "harness", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROWS", tmp_path / "rows")
    monkeypatch.setattr(module, "QUICK_RESULTS", tmp_path / "quick")
    return module


def test_a_report_only_run_rebuilds_its_rows_from_the_written_result(harness, tmp_path):
    """Rows measured once and written by `finish` come back from the JSON alone (the row cache deleted), with
    their measured fields and time; a config whose value changed is not taken from it."""
    args = harness.parser("test", seeds=[0, 1], quick_seeds=[0, 1]).parse_args(["--quick"])
    configs = {"a": {"width": 8}, "b": {"width": 16}}
    sweep = harness.Sweep(
        "saved", configs, [0, 1], lambda name, config, seed: {"loss": config["width"] + seed}
    )
    measured = harness.run_sweep(sweep, harness.results_dir(args), progress=lambda _: None)
    harness.finish(sweep, args, harness.run_record(args), measured)
    for path in (tmp_path / "rows").rglob("*.jsonl"):
        path.unlink()

    never = lambda *_: pytest.fail("a report-only run measures nothing")
    changed = harness.Sweep("saved", {**configs, "b": {"width": 32}}, [0, 1, 2], never)
    saved = harness.saved_rows(changed, harness.results_dir(args))
    assert sorted(saved) == [("a", 0), ("a", 1)]

    again = harness.measured_rows(changed, harness.results_dir(args))
    assert [(r["config"], r["seed"], r["loss"]) for r in again] == [("a", 0, 8), ("a", 1, 9)]
    by_seed = {r["seed"]: r for r in measured if r["config"] == "a"}
    assert [r["seconds_measuring"] for r in again] == [
        by_seed[0]["seconds_measuring"],
        by_seed[1]["seconds_measuring"],
    ]
    assert harness.saved_rows(changed, tmp_path / "nowhere") == {}
