"""A search whose output lock is lost stops writing at once, with the lock's error, and a rerun resumes it."""

from __future__ import annotations

import pytest

from lcsc_ray import output_guard
from lcsc_ray.search import run_search
from lcsc_ray.tuning import SearchProgress
from rayops.output_lock import OutputLockedError
from tests.test_lcsc_search import recorded_evaluations, tiny_spec

LOST_AT = 5  # results told to the driver before the lease runs out: the 4 seeds, then 1 optimiser proposal


@pytest.mark.timeout(500)
def test_lost_lock_stops_the_search_and_a_rerun_resumes(ray_local, tmp_path, monkeypatch):
    """The lease runs out after the 5th Tune result: the search stops with the lock's error before writing
    its result, and a rerun finishes the budget without evaluating again what the first run recorded."""
    spec = tiny_spec(tmp_path, budget=6)
    told = []
    original = SearchProgress.on_trial_result

    def lease_runs_out(self, iteration, trials, trial, result, **info):
        told.append(result.get("label"))
        if len(told) == LOST_AT:
            # the search's lock (the check its guard runs): its lease now ends in the past, unrenewed
            output_guard._CHECKS[self.guard.output_uri].__self__._valid_until = 0.0
        return original(self, iteration, trials, trial, result, **info)

    monkeypatch.setattr(SearchProgress, "on_trial_result", lease_runs_out)
    with pytest.raises(OutputLockedError, match="was not renewed.*stops without writing"):
        run_search(spec)
    out = tmp_path / "out"
    assert len(told) == LOST_AT  # no Tune result was taken after the loss
    assert not (out / "result.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in (out / "state" / "evaluations").glob("*.json")}
    assert len(first) >= LOST_AT  # the probe and the five scored candidates were recorded

    monkeypatch.undo()
    (out / "run.lock").unlink()  # what the lease's expiry does for a run on another host
    result = run_search(spec)
    assert result.num_evaluations == 6 and (out / "result.json").exists()
    again = {p.name: p.stat().st_mtime_ns for p in (out / "state" / "evaluations").glob("*.json")}
    assert {
        name: again[name] for name in first
    } == first  # nothing the first run recorded was evaluated again
    assert len(recorded_evaluations(out)) > len(first)
