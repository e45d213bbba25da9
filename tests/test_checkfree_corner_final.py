"""The end of a run: a stage lost after the last step is recovered before the final evaluation and the export, and
the last progress line shows the final evaluation."""

from __future__ import annotations

import io
import json

import pytest
import ray

from checkfree_ray import train
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.train import run_training, train_loop
from rayops import storage
from rayops.progress import ProgressLine
from schemas.train_result import TrainResult
from tests.test_checkfree_engine import tiny_spec

pytestmark = pytest.mark.timeout(240)
REPLY_FLUSH_S = 0.5  # a kill waits this long, so the stage's earlier replies reach the driver first


def test_stage_lost_after_the_last_step_is_recovered_before_evaluation_and_export(
    ray_local, tmp_path, monkeypatch
):
    """Stage 1 dies after step 3 (the last) committed, at the final evaluation's first forward: it is rebuilt by
    CheckFree, and the run writes result.json with step 3's evaluation, the exported model, and run.json 'finished'."""
    spec = tiny_spec("checkfree", steps=3, eval_every=3, output={"uri": str(tmp_path / "run")})
    made: list[PipelineExecutor] = []

    def executor_with_fault(*args, **kwargs) -> PipelineExecutor:
        executor = PipelineExecutor(*args, **kwargs)
        made.append(executor)

        def arm(ex: PipelineExecutor, step: int) -> None:
            if step == 3:  # stage 1's two training forwards of step 3 run first, then the evaluation's
                ray.get(ex.actors[1].arm_fault.remote("forward", "kill", REPLY_FLUSH_S, 2), timeout=60)

        executor.before_step.append(arm)
        return executor

    monkeypatch.setattr(train, "PipelineExecutor", executor_with_fault)
    result = run_training(spec, progress=False)
    assert [(f.step, f.stage, f.method, f.phase) for f in result.failures] == [
        (4, 1, "checkfree", "before_step")
    ]
    assert result.steps == [1, 2, 3] and result.val_steps == [3]
    stored = TrainResult.model_validate_json(storage.read_bytes(str(tmp_path / "run" / "result.json")))
    assert stored.final_val_loss == result.val_losses[-1]
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_last_progress_line_shows_the_final_evaluation(ray_local):
    """Evaluations at steps 2 and 3: the last progress line carries step 3's validation loss, not step 2's."""
    executor = PipelineExecutor(tiny_spec("checkfree", steps=3, eval_every=2))
    stream = io.StringIO()
    try:
        executor.start()
        train_loop(executor, ProgressLine("train", total=3, interval_s=0.0, stream=stream))
    finally:
        executor.shutdown()
    assert executor.history.val_steps == [2, 3]
    last = stream.getvalue().strip().splitlines()[-1]
    assert last.startswith("train 3/3")
    assert f"val_loss={executor.history.val_losses[-1]:.4g}" in last.split()
    assert executor.history.val_losses[0] != pytest.approx(executor.history.val_losses[-1], abs=1e-4)
