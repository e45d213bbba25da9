"""Chaos for CheckFree training (`benchmarks/chaos_train.py`): stage, driver and node losses, every step once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.chaos_train import passed, step_accounting

ROOT = Path(__file__).resolve().parents[1]
# the chaos harness starts (and shuts down) a Ray of its own, so it runs in its own process, away from the
# test session's Ray
RUN_ONE_SEED = (
    "import json, sys; from benchmarks.chaos_train import chaos; "
    "print('CHAOS_ROWS ' + json.dumps(chaos(1, tuple(sys.argv[1].split(','))), default=str))"
)


def test_step_accounting_counts_rolled_back_steps_out_and_finds_lost_and_repeated_ones():
    """Steps discarded by a rollback are not counted; a step kept twice or never kept is named."""
    clean = step_accounting([1, 2, 3, 2, 3, 4], [False, True, True, False, False, False], 4)
    assert clean == {"kept_steps": 4, "lost_steps": [], "counted_twice": [], "extra_steps": []}
    broken = step_accounting([1, 2, 2, 4, 5], None, 4)
    assert broken["lost_steps"] == [3] and broken["counted_twice"] == [2] and broken["extra_steps"] == [5]
    row = {"finished": True, **clean, "leaked_actors": 0, "leaked_placement_groups": 1}
    assert not passed(row) and passed({**row, "leaked_placement_groups": 0})


# `make test` runs the driver and two-event kinds in one harness run; the others are `extended`. The stage kind's
# run is the driver kind's without the SIGKILL: same spec, same seeded stage kills, same checks (the driver kind's
# resumed run goes through the same kills and rollbacks). The node kind runs tests/node_loss_demo.py, which
# test_checkfree_run.py::test_survives_node_removed_from_multi_node_cluster runs with the same checks (every step
# kept once, no actor or placement group left, the lost stage recorded).
@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize(
    "kinds",
    [
        pytest.param(("driver", "backup", "norm"), id="driver-backup-norm"),
        pytest.param(("stages", "node"), id="stages-node", marks=pytest.mark.extended),
    ],
)
def test_chaos_runs_finish_with_every_step_once_and_leak_nothing(kinds):
    """One seed of each kind (random stage kills, a SIGKILLed driver then resumed, a removed worker node, and the
    two-event cases: a redundant stage lost before its backup, a stage lost before its norm under global
    clipping): each run finishes with steps 1..N kept exactly once and leaves no actor or placement group alive;
    a two-event run loses only its stage, without a rollback."""
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ONE_SEED, ",".join(kinds)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=1400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("CHAOS_ROWS "))
    rows = json.loads(line.removeprefix("CHAOS_ROWS "))
    assert [row["kind"] for row in rows] == list(kinds)
    for row in rows:
        assert passed(row), row
    by_kind = {row["kind"]: row for row in rows}
    if "driver" in by_kind:
        driver = by_kind["driver"]
        assert driver["driver_killed_after_checkpoint"] is not None and driver["resumed_from"]
    if "node" in by_kind:
        assert by_kind["node"]["failures"] >= 1
