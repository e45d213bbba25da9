"""The recovery studies' committed results regenerate from their own rows: every row is still a config of today's
grid (same config value, so `--report-only` takes it), and the report's summaries and tables come out as written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness
import recovery_ablation
import recovery_width
from recovery_ablation_report import summarise, table_text
from recovery_width_report import merge, table


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN (an interval of one seed)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _committed(name: str, configs: dict) -> tuple[dict, list[dict]]:
    data = json.loads((BENCH / "results" / f"{name}.json").read_text())
    sweep = harness.Sweep(name, configs, data["seeds"], lambda *_: pytest.fail("nothing is measured"))
    saved = harness.saved_rows(sweep, BENCH / "results")
    assert len(saved) == len(data["rows"]), "a committed row is no longer a config of the grid"
    return data, [saved[(r["config"], r["seed"])] for r in data["rows"]]


def test_the_ablation_regenerates_from_its_rows():
    data, rows = _committed("recovery_ablation", recovery_ablation.configs(quick=False))
    results = recovery_ablation.scale_results(rows)
    summaries = [summarise(res) for res in results]
    assert _same(summaries, [s["rows"] for s in data["summaries"]])
    assert [table_text(res, s) for res, s in zip(results, summaries)] == data["tables"]


def test_the_width_study_regenerates_from_its_rows():
    plan = recovery_width.parse_plan(recovery_width.DEFAULT_PLAN)
    configs = {recovery_width.config_name(d, k): recovery_width.config(d, k) for d, k in plan}
    data, rows = _committed("recovery_width", configs)
    results = merge(rows)
    summaries = [summarise(res) for res in results]
    assert _same(summaries, [s["rows"] for s in data["summaries"]])
    assert [table(res, s) for res, s in zip(results, summaries)] == data["tables"]
