"""A seed whose trial errored in the seeds phase is evaluated once more; its second attempt takes its place."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lcsc_ray.search import merge_seed_retries, seeds_to_retry


def _rows(phase: str, entries: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"trial_id": f"{phase}-{label}", "phase": phase, "label": label, "fid": fid, "status": status}
            for label, status, fid in entries
        ]
    )


SEEDS = [("last", np.array([0.0, 1.0])), ("ema", np.array([0.5, 0.5])), ("uniform", np.array([0.5, 0.5]))]


def test_only_the_failed_seeds_are_retried_in_the_seeds_order():
    first = _rows("seeds", [("uniform", "failed", np.nan), ("last", "failed", np.nan), ("ema", "ok", 3.0)])
    assert [label for label, _ in seeds_to_retry(first, SEEDS)] == ["last", "uniform"]
    assert seeds_to_retry(_rows("seeds", [("last", "ok", 1.0)]), SEEDS) == []
    assert seeds_to_retry(pd.DataFrame(), SEEDS) == []


def test_a_retry_replaces_the_failed_row_in_place_and_a_second_failure_stays_failed():
    first = _rows("seeds", [("last", "failed", np.nan), ("ema", "ok", 3.0), ("uniform", "failed", np.nan)])
    retry = _rows("seeds-retry", [("last", "ok", 2.0), ("uniform", "failed", np.nan)])
    merged = merge_seed_retries(first, retry)
    assert list(merged.label) == ["last", "ema", "uniform"]
    assert list(merged.status) == ["ok", "ok", "failed"]
    assert merged.fid.iloc[0] == 2.0 and merged.trial_id.iloc[0] == "seeds-retry-last"
    assert set(merged.phase) == {"seeds"}  # where the baselines are read from
    assert list(merged.columns) == list(first.columns)
