"""Checkpoints off the critical path and storage faults: stages write their own shards, the run survives outages."""

from __future__ import annotations

import io
import logging

import pyarrow.parquet as pq
import pytest
import ray

from checkfree_ray.checkpoint_store import CheckpointStore
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.failures import wait_until_dead
from checkfree_ray.run_identity import new_identity
from checkfree_ray.train import build_result, write_result
from rayops import storage
from schemas.errors import RecoveryError
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def started(ray_local):
    """Executors started on the shared local Ray, shut down after the test."""
    made = []

    def make(spec, checkpoint_uri: str) -> PipelineExecutor:
        executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
        made.append(executor)
        executor.start()
        return executor

    yield make
    for executor in made:
        executor.shutdown()


# ----- the store, without Ray ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_corrupt_or_incomplete_latest_checkpoint_falls_back_to_the_previous(where, tmp_path, request, caplog):
    """Checkpoint 4 with a changed shard is skipped for 2 (with a warning naming it); with 2's manifest gone too
    there is none left: RecoveryError naming the run and the fix."""
    base = str(tmp_path / "ckpt") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ckpt"
    store = CheckpointStore(base, 3, new_identity(tiny_spec("checkfree")))
    for step in (2, 4):
        store.save(
            step, [b"step-%d-stage-%d" % (step, i) for i in range(4)], {"grad_norms": [{"blocks": step}]}
        )
    storage.write_bytes(store.shard_uri(4, 1), b"step-4-stage-X")  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        checkpoint = store.load_latest(4)
    assert checkpoint.step == 2 and checkpoint.shards[3] == b"step-2-stage-3"
    assert checkpoint.metadata["grad_norms"] == [{"blocks": 2}]
    assert "checkpoint_000004" in caplog.text and "sha256" in caplog.text
    storage.delete(f"{store.checkpoint_uri(2)}/MANIFEST.json")
    with pytest.raises(RecoveryError, match=f"run {store.run.run_id} has no complete checkpoint") as error:
        store.load_latest(4, context="step 7: stages 1 and 2 lost together")
    assert "checkpointing.every" in str(error.value) and "step 7" in str(error.value)


# ----- saves on real Ray ----------------------------------------------------------------------------------------
def test_stages_write_their_own_shards_and_the_manifest_comes_last(started, s3_bucket):
    """Each shard on SeaweedFS equals that stage's state after the saved step, and the manifest lists its sha256;
    the save does not hold the step: the driver never had the shards (the store's save() is never called)."""
    from safetensors.torch import load as load_safetensors

    spec = tiny_spec("checkfree", checkpointing={"every": 2}, storage={"forward_credentials": True})
    executor = started(spec, f"{s3_bucket}/ckpt")
    executor.checkpoints.save = None  # the driver-side write path must not be used
    states = {}
    executor.before_step.append(
        lambda ex, step: states.setdefault(step, ex.stage_states()) if step == 3 else None
    )
    run_steps(executor, 3)
    assert executor.finish_checkpoints() == 2
    checkpoint = executor.checkpoints.load(2, 4)
    for stage, shard in enumerate(checkpoint.shards):
        flat = load_safetensors(shard)
        assert any(key.startswith("optim/") for key in flat)
        assert all(flat[key].equal(value) for key, value in states[3][stage].items())
    assert (
        checkpoint.history["steps"] == [1, 2]
        and checkpoint.metadata["run_id"] == executor.checkpoints.run.run_id
    )


@pytest.mark.parametrize("side", ["driver", "stages"])
def test_storage_outage_during_a_save_warns_and_the_next_save_retries(
    started, s3_bucket, monkeypatch, caplog, side
):
    """With the S3 endpoint dead during step 4's save (for the driver, or only once the stages write their
    shards), training goes on (a warning, no error) and step 6's save, with the endpoint back, is complete."""
    endpoint = storage.settings.s3_endpoint()
    spec = tiny_spec(
        "checkfree", checkpointing={"every": 2, "keep": 3}, storage={"forward_credentials": True}
    )
    executor = started(spec, f"{s3_bucket}/ckpt")
    begin = executor.checkpoints.begin

    def begin_then_outage(step):
        begin(step)
        if step == 4:
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the stages get it with their save

    def outage(ex, step):
        if step == 4:
            ex.finish_checkpoints()
            if side == "driver":
                monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
            else:
                ex.checkpoints.begin = begin_then_outage
        if step == 5:
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

    executor.before_step.append(outage)
    with caplog.at_level(logging.WARNING):
        run_steps(executor, 6)
    assert executor.history.steps == [1, 2, 3, 4, 5, 6]
    assert "checkpoint 4 was not saved" in caplog.text and "127.0.0.1:9" in caplog.text
    assert executor.finish_checkpoints() == 6
    assert executor.checkpoints.steps() == [0, 2, 6]
    assert executor.history.costs["checkpoint_failed_saves"] == 1


def test_stage_killed_while_writing_its_shard_is_recovered_and_named(started, tmp_path):
    """(e) stage 2 dies in the middle of checkpoint 2's save: the save is abandoned, the run finishes with every
    step once, the record names phase 'checkpoint_save', and the next save is complete."""
    spec = tiny_spec("checkfree", checkpointing={"every": 2})
    executor = started(spec, str(tmp_path / "ckpt"))
    executor.before_step.append(
        lambda ex, step: (
            ray.get(ex.actors[2].arm_fault.remote("write_shard"), timeout=60) if step == 2 else None
        )
    )
    # The shard is written in a background thread: wait (bounded) for the death before step 3 is submitted, so
    # step 3's first forward can never finish on the dying stage first (the phase would then read 'forward').
    executor.before_step.append(
        lambda ex, step: wait_until_dead(ex.actors[2], wait_s=120) if step == 3 else None
    )
    run_steps(executor, 5)
    assert [(f.step, f.stage, f.method, f.phase) for f in executor.history.failures] == [
        (3, 2, "checkfree", "checkpoint_save")
    ]
    assert executor.history.steps == [1, 2, 3, 4, 5]
    assert executor.finish_checkpoints() == 4
    assert executor.checkpoints.steps() == [0, 4]  # checkpoint 2 never became complete
    assert executor.history.costs["checkpoint_failed_saves"] == 1


def test_rolled_back_steps_are_marked_and_throughput_counts_kept_work(started, tmp_path):
    """Stages 1 and 2 lost together at step 4 roll back to checkpoint 2: step 3's first run is marked rolled back
    in the result and metrics.parquet, and tokens/s counts 5 kept steps over the time of all 6 run."""
    spec = tiny_spec(
        "checkfree",
        schedule=[(4, 1), (4, 2)],
        checkpointing={"every": 2},
        output={"uri": str(tmp_path / "run")},
    )
    executor = started(spec, str(tmp_path / "ckpt"))
    executor.before_step.append(lambda ex, step: ex.finish_checkpoints())
    run_steps(executor, 5)
    result = write_result(build_result(executor, 1.0), str(tmp_path / "run"))
    assert result.steps == [1, 2, 3, 3, 4, 5]
    assert result.rolled_back == [False, False, True, False, False, False]
    tokens_per_step = 2 * 2 * 16
    assert result.tokens_per_s == pytest.approx(5 * tokens_per_step / sum(executor.history.step_times))
    table = pq.read_table(io.BytesIO(storage.read_bytes(result.files["metrics.parquet"])))
    assert table.column("rolled_back").to_pylist() == result.rolled_back
