"""Benchmarks as harness sweeps: the rows each study measures are turned back into the tables and keys its
results have always had (search_overhead's per-round ratios, fid_extrapolation's per-vector scores)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, monkeypatch):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def overhead_row(mode: str, seed: int, wall: float, busy: list[float], gap: float = 0.1) -> dict:
    row = {
        "config": mode,
        "seed": seed,
        "evaluations": len(busy),
        "wall_s": wall,
        "busy_s": busy,
        "mean_eval_s": sum(busy) / len(busy),
        "idle_per_eval_s": (2 * wall - sum(busy)) / len(busy),
    }
    if mode == "tune":
        breakdown = {"search": {"gap_median_s": gap}}
        row |= {"trial_gap_mean_s": gap, "trial_gap_max_s": 2 * gap, "tune_breakdown": breakdown}
    return row


def test_overhead_rows_pair_tune_with_direct_by_round(monkeypatch):
    """Each round's tune row is compared with the direct row of the same round; the ratios divide by the mean
    evaluation time of both; a round missing one mode is left out."""
    overhead = load("search_overhead", monkeypatch)
    rows = [
        overhead_row("tune", 0, 12.0, [5.0] * 4),
        overhead_row("direct", 0, 10.0, [5.0] * 4),
        overhead_row("tune", 1, 11.0, [5.0] * 4),
    ]
    summary = overhead.summary(rows)
    (only,) = summary["rows"]
    assert only["round"] == 0 and only["wall_overhead_per_eval_s"] == pytest.approx(0.5)
    assert only["wall_overhead_ratio"] == pytest.approx(0.1)
    assert only["idle_overhead_ratio"] == pytest.approx((1.0 - 0.0) / 5.0)
    assert summary["tune_extra_wall_per_search_s"] == pytest.approx(2.0)
    assert summary["within_target"]  # steady gap 0.1 / 5 and 2 s over 48 evaluations of 5 s
    assert set(summary["tune_breakdown"]) == {"tune-0", "tune-1"}


def test_extrapolation_rows_become_per_vector_scores_and_a_summary_per_count(monkeypatch):
    """A row per (N, seed) holds every vector's scores; the summary pairs them with the reference per N."""
    fid = load("fid_extrapolation", monkeypatch)

    def row(n, seed, raw, inf):
        vectors = {
            label: {"fid_raw": raw + i, "fid_inf": inf + i, "fit_points": [], "reference_fid": 10.0 + i}
            for i, label in enumerate(["last", "uniform", "ema@0.9"])
        }
        return {"config": f"N={n}", "seed": seed, "n": n, "vectors": vectors}

    rows = [row(64, 1, 20.0, 11.0), row(128, 1, 15.0, 10.5), row(64, 2, 22.0, 9.0), row(128, 2, 16.0, 9.5)]
    flat = fid.per_vector(rows)
    assert len(flat) == 12 and {"label", "n", "seed", "fid_raw", "fid_inf", "reference_fid"} <= set(flat[0])
    summary = fid.summarize(flat, [128, 64])
    assert [t["n"] for t in summary] == [64, 128]
    assert summary[0]["raw_minus_reference"]["mean"] == pytest.approx(11.0)
    assert summary[0]["abs_error_inf_mean"] == pytest.approx(1.0)
    assert summary[0]["spearman_inf_vs_reference"] == pytest.approx(1.0)
