"""What a trial reports to Tune (`lcsc_ray.trials.trial_metrics`): no list of NaNs for Tune's loggers to warn on."""

from __future__ import annotations

import math
import time

from lcsc_ray.trials import trial_metrics


def _record(**extra) -> dict:
    return {"status": "ok", "fid": 72.5, "num_samples": 500, "samples_drawn": 500, **extra}


def test_a_search_that_does_not_extrapolate_reports_no_nan_fid_inf_list():
    rungs = {"rung_samples": [500], "rung_fids": [72.5], "rung_fids_inf": [math.nan], "rung_drawn": [500]}
    metrics = trial_metrics({}, _record(), time.monotonic(), "raw", rungs)
    assert "rung_fids_inf" not in metrics
    assert metrics["rung_fids"] == [72.5] and metrics["samples_spent"] == 500 and metrics["rung"] == 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in metrics.values())


def test_an_extrapolated_search_reports_each_rungs_fid_inf():
    rungs = {
        "rung_samples": [128, 512],
        "rung_fids": [80.0, 74.0],
        "rung_fids_inf": [70.0, 71.5],
        "rung_drawn": [128, 384],
    }
    metrics = trial_metrics(
        {}, _record(fid_inf=71.5, num_samples=512), time.monotonic(), "extrapolated", rungs
    )
    assert metrics["rung_fids_inf"] == [70.0, 71.5]
    assert metrics["fid"] == 71.5 and metrics["fid_raw"] == 72.5
    assert metrics["samples_spent"] == 512 and metrics["rung"] == 1
