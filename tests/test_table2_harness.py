"""Table 2 on the benchmark harness: its sweeps' order, the measured rows turned into the results JSON's sections,
and the report regenerated from the committed measured data alone (numbers unchanged)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import paper_table2
import table2_extrapolate


@pytest.fixture
def results(tmp_path, monkeypatch):
    """The harness's results, quick results and row cache under tmp_path, holding a copy of the committed
    paper_table2.json."""
    h = paper_table2.harness
    monkeypatch.setattr(h, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(h, "QUICK_RESULTS", tmp_path / "quick")
    monkeypatch.setattr(h, "ROWS", tmp_path / "rows")
    (tmp_path / "results").mkdir()
    shutil.copy(RESULTS / "paper_table2.json", tmp_path / "results" / "paper_table2.json")
    return tmp_path / "results"


def test_rotated_sweeps_start_each_seed_one_config_later():
    """With `rotate`, seed i runs the configs from the i-th on (A B C, B C A, C A B), as Table 2's cost rounds do."""
    calls = []

    def measure(name, config, seed):
        calls.append((name, seed))
        return {"value": config}

    h = paper_table2.harness
    sweep = h.Sweep("rot", configs={"a": 1, "b": 2, "c": 3}, seeds=[0, 1, 2], measure=measure, rotate=True)
    out = h.results_dir(h.parser("t", [0], [0]).parse_args(["--quick"]))
    rows = h.run_sweep(sweep, out, fresh=True, progress=lambda _: None)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("a", 1), ("c", 2), ("a", 2), ("b", 2)]
    assert [(r["config"], r["seed"]) for r in rows] == calls
    assert paper_table2.cost_sweep([0], ["checkpoint"], True, None).rotate


def test_runs_sweep_keeps_the_reference_first_and_rotates_strategies_from_rate_to_rate():
    """Per seed: the no-failure reference, then each rate's strategies, rotated by one more at each rate."""
    sweep = paper_table2.runs_sweep([0], ["a", "b"], ["5%", "10%", "16%"], 2.5, 300, None)
    assert list(sweep.configs) == ["0%/none", "5%/a", "5%/b", "10%/b", "10%/a", "16%/a", "16%/b"]
    assert sweep.configs["16%/b"]["probability_per_step"] == pytest.approx(0.004 * paper_table2.FAILURE_SCALE)


def test_measured_rows_become_the_runs_section_the_report_reads():
    """Rows of the runs sweep (harness keys and all) group into the reference and each rate, in the order measured,
    with the measurement's loads and niceness kept as its part."""

    def row(config, seed):
        strategy = config.split("/")[1]
        return {
            "config": config,
            "config_key": "k",
            "seconds_measuring": 1.0,
            "seed": seed,
            "strategy": strategy,
        }

    rows = [row("0%/none", 0), row("16%/checkpoint", 0), row("0%/none", 1), row("16%/checkpoint", 1)]
    part = {"load_before": [1.0], "load_after": [2.0], "machine": {"niceness": 10}, "total_wall_s": 5.0}
    runs = paper_table2.runs_section(rows, [0, 1], ["16%"], 2.7, 200, part | {"quick": True})
    assert [r["seed"] for r in runs["reference"]] == [0, 1]
    assert runs["runs"]["16%"] == [
        {"seed": 0, "strategy": "checkpoint"},
        {"seed": 1, "strategy": "checkpoint"},
    ]
    assert runs["parts"] == [
        {"seeds": [0, 1], "load_before": [1.0], "load_after": [2.0], "total_wall_s": 5.0, "niceness": 10}
    ]
    assert runs["target_val_loss"] == 2.7 and runs["quick"] is True and runs["rates"] == ["16%"]


def test_report_regenerates_the_committed_table_from_the_measured_data(results):
    """`report` alone redraws every table and note of paper_table2.{json,md} from the JSON's measured data: every
    key the committed JSON has comes out identical (but the report run's own record), the Markdown's sections too."""
    committed = json.loads((RESULTS / "paper_table2.json").read_text())
    paper_table2.main(["report"])
    regenerated = json.loads((results / "paper_table2.json").read_text())
    record = {"machine", "code", "argv", "quick", "started_unix", "finished_unix"}  # this report's own run
    for key, value in committed.items():
        assert key in record or regenerated[key] == value, key
    assert regenerated["code"]["commit"] and len(regenerated["rows"]) == sum(
        len(group) for group in [committed["runs"]["reference"], *committed["runs"]["runs"].values()]
    )
    markdown = (results / "paper_table2.md").read_text()
    before_run = markdown.split("\n## Run\n")[0]
    assert before_run.rstrip() == (RESULTS / "paper_table2.md").read_text().split("\n## Run\n")[0].rstrip()
    assert (results / "paper_table2.png").stat().st_size > 0


def test_extrapolation_report_regenerates_from_the_costs_the_json_keeps(results):
    """The extrapolation redrawn from the costs paper_table2.json keeps gives the committed rows and Markdown."""
    committed = json.loads((RESULTS / "paper_table2.json").read_text())["extrapolated"]
    args = paper_table2.harness.parser("t", [0], [0]).parse_args([])
    extrapolated = table2_extrapolate.report(args)
    assert extrapolated["rows"] == committed["rows"] and extrapolated["notes"] == committed["notes"]
    written = (results / "paper_table2_extrapolated.md").read_text()
    assert written == (RESULTS / "paper_table2_extrapolated.md").read_text()
