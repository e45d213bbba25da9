"""One training run per output: a second run into a running one's output is refused with the owner's name, and
a run whose lock is lost stops before its next step, then resumes when run again."""

from __future__ import annotations

import json

import pytest

import checkfree_ray.train as train_module
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.train import run_training
from rayops.output_lock import OutputLock, OutputLockedError
from tests.test_checkfree_resume import tiny_spec

LOST_AFTER = 3  # the lock's lease runs out after this step


def test_a_second_run_into_a_running_ones_output_is_refused_before_it_writes(tmp_path):
    """Another holder's live lock: the run stops at once with the owner and the fix, writing nothing there."""
    out = tmp_path / "run"
    spec = tiny_spec(str(out))
    with OutputLock(str(out), what="training"):
        with pytest.raises(OutputLockedError, match=r"in use by another training .*give this run another"):
            run_training(spec, progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # no run record, no checkpoint
    assert not (out / "run.lock").exists()  # the holder released it


@pytest.mark.timeout(400)
def test_lost_lock_stops_before_the_next_step_and_a_rerun_resumes(ray_local, tmp_path, monkeypatch):
    """The lease runs out after step 3: no later step runs, no result or model is written; the lock file gone (as a
    lease's expiry makes it for a run on another host), a rerun resumes and ends with every step once."""
    out = tmp_path / "run"
    spec = tiny_spec(str(out), steps=8, every=2)
    locks: list[OutputLock] = []
    steps_run: list[int] = []

    class RecordedLock(OutputLock):
        def __enter__(self):
            locks.append(self)
            return super().__enter__()

    original = PipelineExecutor.run_step

    def run_step(self, step):
        steps_run.append(step)
        next_step = original(self, step)
        if step == LOST_AFTER:
            locks[-1]._valid_until = 0.0  # the lease now ended in the past, unrenewed
        return next_step

    monkeypatch.setattr(train_module, "OutputLock", RecordedLock)
    monkeypatch.setattr(PipelineExecutor, "run_step", run_step)
    with pytest.raises(OutputLockedError, match="was not renewed.*stops without writing"):
        run_training(spec, progress=False)
    assert steps_run == [1, 2, 3]
    assert not (out / "result.json").exists() and not (out / "hf").exists()

    monkeypatch.undo()
    (out / "run.lock").unlink()
    result = run_training(spec, progress=False)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert result.steps[-1] == 8 and sorted(set(result.steps)) == list(range(1, 9))
    assert not (out / "run.lock").exists()
