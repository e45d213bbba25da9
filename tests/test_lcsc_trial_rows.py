"""The trials table's rows from Tune's results (`lcsc_ray.tuning._grid_rows`, `ReplaySearcher.in_proposal_order`):
an attempt that errored and was proposed again is superseded by the later trial even when Tune left another
trial's `trial_id` in its metrics (seen under chaos: a Tune trial killed before it reported, its actor reused)."""

from __future__ import annotations

from ray.tune import Result

from lcsc_ray.tuning import ReplaySearcher, _grid_rows

OK_METRICS = {"trial_id": "aaaa", "fid": 0.21, "status": "ok", "num_samples": 64, "seed": 0, "alphas": [1.0]}


def _result(folder: str, metrics: dict, error: Exception | None = None) -> Result:
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/runs/out/tune/search/{folder}")


def test_a_row_is_named_by_its_trial_folder_not_by_a_stale_metrics_id():
    grid = [
        _result("trial_aaaa", OK_METRICS),
        _result("trial_bbbb", {"trial_id": "aaaa"}, error=RuntimeError("trial actor killed")),
    ]
    rows = _grid_rows(grid, "search")
    assert list(rows.trial_id) == ["aaaa", "bbbb"]
    assert list(rows.status) == ["ok", "failed"]


def test_the_superseded_attempt_leaves_the_table_in_proposal_order():
    searcher = ReplaySearcher.__new__(ReplaySearcher)  # only its proposal entries are read here
    searcher.entries = [{"index": 0, "trial_id": "aaaa", "free": [0.0], "done": True, "value": 0.21}]
    grid = [
        _result("trial_bbbb", {"trial_id": "aaaa"}, error=RuntimeError("trial actor killed")),
        _result("trial_aaaa", OK_METRICS),
    ]
    rows = searcher.in_proposal_order(_grid_rows(grid, "search"))
    assert list(rows.trial_id) == ["aaaa"] and list(rows.status) == ["ok"]
