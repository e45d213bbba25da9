"""The search under chaos: retried trials join their evaluation, killed trial processes cost no candidate, and
(slow) a seeded search with an evaluator, a trial and the driver killed ends as its uninterrupted twin."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lcsc_ray.coefficients import to_alphas
from lcsc_ray.search import run_search
from tests.test_lcsc_pool import calls, jobs, pool_spec, start_pool, wait_until
from tests.test_lcsc_search import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    """benchmarks/chaos_search.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("chaos_search", ROOT / "benchmarks" / "chaos_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_search"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_a_job_asked_again_while_in_flight_joins_that_evaluation(ray_local, tmp_path):
    """A second request for a job being evaluated (a retried trial) waits for the same evaluation: one sampler
    call, the same record for both callers."""
    pool = start_pool(pool_spec(tmp_path, "tests.lcsc_search_plugins:gated_sample", log=True))
    try:
        job = jobs(1)[0]
        first = pool.service.evaluate.remote(job)
        wait_until(lambda: calls(tmp_path) == 1, what="the first evaluation to start")
        second = pool.service.evaluate.remote(job)
        # the second request reaches the service (a state call behind it in the queue answers) before the gate opens
        ray_local.get(pool.service.state.remote(), timeout=60)
        (tmp_path / "log" / "open").touch()
        records = ray_local.get([first, second], timeout=120)
        assert calls(tmp_path) == 1
        assert records[0]["status"] == "ok" and records[0]["fid"] == records[1]["fid"]
    finally:
        pool.close()


@pytest.mark.timeout(240)
def test_a_failed_job_asked_again_is_neither_rerun_nor_counted_twice(ray_local, tmp_path):
    """A job whose evaluation raised gets its failed record again (a retried trial): one call, one failure."""
    spec = pool_spec(tmp_path, "tests.lcsc_search_plugins:failing_sample", log=True)
    spec.sampler.kwargs["fail_after"] = 0
    pool = start_pool(spec)
    try:
        job = jobs(1)[0]
        first, second = (ray_local.get(pool.service.evaluate.remote(job), timeout=120) for _ in range(2))
        assert first["status"] == second["status"] == "failed" and "broken sampler" in second["reason"]
        assert calls(tmp_path) == 1 and pool.state()["failed"] == 1
    finally:
        pool.close()


# `extended`: a Tune trial's process killed mid-evaluation is one of the seeded events of the chaos run below
# (`make test`), which checks the same: the exact budget, each evaluation once, the twin's trials.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(300)
def test_a_killed_trial_process_costs_no_candidate(ray_local, tmp_path):
    """Trial processes SIGKILLed while they wait on an evaluation of the optimiser phase are run again by Tune:
    every candidate scores, the budget is exact, each candidate is sampled once, rows stay in proposal order."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    spec = tiny_spec(
        tmp_path,
        budget=8,
        sampler={
            "target": "tests.lcsc_search_plugins:trial_killing_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(log_dir), "kill_on_call": 6},
        },
    )  # calls 1-4: probe and seeds; 5-8: the optimiser's
    run_search(spec)
    killed = (log_dir / "killed_trials").read_text().split()
    assert killed, "no trial process was killed"
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    search = trials[trials.rung == 0]
    assert len(search) == 8 and (search.status == "ok").all(), search[["label", "status", "reason"]]
    calls = [line.split() for line in (log_dir / "calls.log").read_text().splitlines()]
    # the evaluators' calls (samples.png is drawn in this driver process afterwards, with the same noise)
    noise_seeds = [seed for pid, seed, _ in calls if int(pid) != os.getpid()]
    # calls on the search's noise (the probe's): one per distinct candidate (the probe is the 'last' seed's)
    assert noise_seeds.count(noise_seeds[0]) == 8
    proposals = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "out" / "state" / "proposals").glob("*.json")),
        key=lambda entry: entry["index"],
    )
    expected = [to_alphas(entry["free"], "difference") for entry in proposals]
    optimiser_rows = list(search[search.phase == "search"].coefficients)
    assert len(optimiser_rows) == len(expected) == 4
    assert all(np.allclose(row, alphas, atol=1e-9) for row, alphas in zip(optimiser_rows, expected))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_chaos_run_ends_as_its_uninterrupted_twin(tmp_path):
    """One seeded search with an evaluator, a Tune trial and the driver SIGKILLed (then resumed) and the
    evaluators' node drained at seeded moments: exact budget, each evaluation recorded once, the twin's trials
    and winner, nothing leaked."""
    chaos = load_benchmark()
    row = chaos.chaos_run(0, seed=3, optimizer="CMA", budget=12, base=tmp_path)
    expected = {"evaluator": 1, "trial": 1, "driver": 1, "drain": 1, "reclaim": 0, "timeout": 0}
    assert row["kills_by_kind"] == expected, row["kills"]
    assert not row["not_fired"] and row["driver_runs"] == 2
    assert row["evaluations"] == 12 and row["recorded_once"] and row["all_ok"], row
    assert row["same_trials"] and row["same_winner"], row
    assert row["leaked"] == 0, row["leaked_titles"]
    assert row["passed"]
