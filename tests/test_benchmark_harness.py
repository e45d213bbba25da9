"""The benchmark harness: every config on every seed (seed-major), rows cached and reused after a kill,
paired tables with the project's verdict, results written with the run's record."""

from __future__ import annotations

import importlib.util
import json
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
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "QUICK_RESULTS", tmp_path / "quick")
    return module


def _args(harness, *argv):
    return harness.parser("test", seeds=[0, 1, 2], quick_seeds=[0]).parse_args(list(argv))


def test_sweep_measures_seed_major_and_resumes_only_missing_rows(harness, tmp_path):
    """All configs on seed 0, then seed 1...; a rerun after a kill measures only what is missing."""
    calls = []

    def measure(name, config, seed):
        calls.append((name, seed))
        if len(calls) == 4 and not getattr(measure, "resumed", False):
            raise KeyboardInterrupt  # killed while measuring the 4th row
        return {"value": config * 10 + seed}

    sweep = harness.Sweep("t", configs={"a": 1, "b": 2}, seeds=[0, 1, 2], measure=measure)
    args = _args(harness)
    with pytest.raises(KeyboardInterrupt):
        harness.run_sweep(sweep, harness.results_dir(args), progress=lambda _: None)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    calls.clear()
    measure.resumed = True
    rows = harness.run_sweep(sweep, harness.results_dir(args), progress=lambda _: None)
    assert calls == [("b", 1), ("a", 2), ("b", 2)]
    assert [(r["config"], r["seed"], r["value"]) for r in rows] == [
        ("a", 0, 10),
        ("b", 0, 20),
        ("a", 1, 11),
        ("b", 1, 21),
        ("a", 2, 12),
        ("b", 2, 22),
    ]
    calls.clear()
    harness.run_sweep(sweep, harness.results_dir(args), fresh=True, progress=lambda _: None)
    assert len(calls) == 6  # --fresh measures everything again


def test_a_row_measured_with_another_config_value_is_measured_again(harness, tmp_path):
    """The cache is keyed by what a config holds, not only its name: changing a config's value (a size, a step
    count) measures its rows again instead of reporting the old ones under the new settings."""
    calls = []

    def measure(name, config, seed):
        calls.append((name, seed))
        return {"value": config["steps"] + seed}

    out = harness.results_dir(_args(harness))
    first = harness.Sweep("k", configs={"a": {"steps": 600}, "b": {"steps": 1}}, seeds=[0], measure=measure)
    harness.run_sweep(first, out, fresh=True, progress=lambda _: None)
    calls.clear()
    changed = harness.Sweep("k", configs={"a": {"steps": 900}, "b": {"steps": 1}}, seeds=[0], measure=measure)
    rows = harness.run_sweep(changed, out, progress=lambda _: None)
    assert calls == [("a", 0)]  # b's row, measured with the same value, is kept
    assert [(r["config"], r["value"]) for r in rows] == [("a", 900), ("b", 1)]


def test_paired_table_pairs_by_seed_and_draws_the_verdict(harness):
    """Differences are taken seed by seed; a consistent gap is a win/loss, a noisy one a tie."""
    rows = [{"config": "base", "seed": s, "fid": 10.0 + s} for s in range(4)]
    rows += [{"config": "better", "seed": s, "fid": 9.0 + s + 0.01 * (s % 2)} for s in range(4)]
    rows += [{"config": "noisy", "seed": s, "fid": 10.0 + s + (1 if s % 2 else -1)} for s in range(4)]
    rows += [{"config": "worse", "seed": s, "fid": 11.0 + s} for s in range(3)]  # one seed missing
    table = harness.paired_table(rows, "fid", baseline="base", better="lower")
    by = {e["config"]: e for e in table["rows"]}
    assert by["better"]["verdict"] == "win" and by["better"]["difference"] == pytest.approx(-0.995)
    assert by["noisy"]["verdict"] == "tie"
    assert by["worse"]["seeds"] == 3 and by["worse"]["verdict"] == "loss"  # paired over the 3 seeds both have
    with pytest.raises(ValueError, match="baseline config 'nope'"):
        harness.paired_table(rows, "fid", baseline="nope", better="lower")


def test_finish_writes_record_rows_and_notes(harness, tmp_path):
    """The JSON holds the machine, the commit, the rows and the paired tables; the notes render the table."""
    args = _args(harness, "--quick")
    assert harness.chosen_seeds(args) == [0]
    sweep = harness.Sweep("t", configs={"a": 1, "b": 2}, seeds=[0, 1], measure=lambda n, c, s: {"x": c + s})
    rows = harness.run_sweep(sweep, harness.results_dir(args), progress=lambda _: None)
    table = harness.paired_table(rows, "x", baseline="a", better="higher")
    path = harness.finish(sweep, args, harness.run_record(args), rows, paired=[table], notes=["n1"])
    payload = json.loads(path.read_text())
    assert path.parent == tmp_path / "quick"
    assert payload["machine"]["cores"] >= 1 and "commit" in payload["code"]
    assert [r["x"] for r in payload["rows"]] == [1, 2, 2, 3] and payload["paired"][0]["rows"][0][
        "config"
    ] == "b"
    notes = (tmp_path / "quick" / "t.md").read_text()
    assert "| b |" in notes and "- n1" in notes


def test_alternate_sweeps_reverse_the_order_on_every_other_seed(harness):
    """With `alternate`, no config always runs first in its round (A B, B A, A B)."""
    calls = []

    def measure(name, config, seed):
        calls.append((name, seed))
        return {"value": config}

    sweep = harness.Sweep("alt", configs={"a": 1, "b": 2}, seeds=[0, 1, 2], measure=measure, alternate=True)
    rows = harness.run_sweep(sweep, harness.results_dir(_args(harness)), fresh=True, progress=lambda _: None)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [(r["config"], r["seed"]) for r in rows] == calls


def test_finish_puts_a_benchmarks_own_sections_in_its_notes(harness, tmp_path):
    """A benchmark's own table (`sections`) is written into the Markdown, after what is measured."""
    sweep = harness.Sweep("own", configs={"a": 1}, seeds=[0], measure=lambda *_: {}, describe="one thing")
    args = _args(harness)
    rows = [{"config": "a", "seed": 0}]
    harness.finish(sweep, args, harness.run_record(args), rows, sections=[("Claims", "| x |\n|---|\n| 1 |")])
    text = (tmp_path / "results" / "own.md").read_text()
    assert text.index("## What is measured") < text.index("## Claims") < text.index("## Run")
    assert "| 1 |" in text


def test_a_measure_that_returns_none_leaves_its_row_out(harness):
    """None from `measure` (e.g. a search not run yet, when only tabulating) is no row and is not cached."""
    sweep = harness.Sweep(
        "gaps", configs={"a": 1, "b": 2}, seeds=[0, 1], measure=lambda n, c, s: None if n == "b" else {"v": s}
    )
    out = harness.results_dir(_args(harness))
    rows = harness.run_sweep(sweep, out, fresh=True, progress=lambda _: None)
    assert [(r["config"], r["seed"]) for r in rows] == [("a", 0), ("a", 1)]
    assert set(harness.cached_rows(sweep, out)) == {("a", 0), ("a", 1)}


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
