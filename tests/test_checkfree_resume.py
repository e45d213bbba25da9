"""Run identity and resume: a rerun never mixes with another run, and a killed driver's run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from checkfree_ray.checkpoint_store import CheckpointStore
from checkfree_ray.cli import main
from checkfree_ray.data import DATA_STREAM, FAILURE_STREAM, ByteCorpus, step_rng
from checkfree_ray.failures import FailureInjector
from checkfree_ray.run_identity import new_identity, open_run
from rayops import storage
from schemas.errors import RunConflictError
from schemas.loader import dump_spec
from schemas.train import DataSpec, FailureSpec, TrainSpec

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(output: str, steps: int = 8, every: int = 4, schedule=(), **extra) -> TrainSpec:
    """A d=32, 4-layer, 4-stage CheckFree model checkpointing every `every` steps into `output`."""
    return TrainSpec.model_validate(
        {
            "name": "resume-tiny",
            "steps": steps,
            "eval_every": steps,
            "eval_batches": 2,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "optim": {"lr": 3e-3},
            "recovery": {"strategy": "checkfree"},
            "checkpointing": {"every": every},
            "failures": {"schedule": [list(item) for item in schedule]},
            "output": {"uri": output},
            **extra,
        }
    )


# ----- streams --------------------------------------------------------------------------------------------------
def test_failure_draws_and_data_order_come_from_separate_streams():
    """With the same seed, which stage fails and where a batch starts do not correlate (they did at 0.9999), and
    each draw is a pure function of (seed, step) from its own child of `SeedSequence(seed)`."""
    corpus = ByteCorpus(DataSpec(), seq_len=16, seed=0)
    injector = FailureInjector(FailureSpec(probability_per_step=0.3, seed=0), 4)
    span = len(corpus.train) - 17
    first_start = [step_rng(0, DATA_STREAM, step).integers(0, span) / span for step in range(1, 2001)]
    failure_u = [step_rng(0, FAILURE_STREAM, step).random(4)[0] for step in range(1, 2001)]
    assert abs(np.corrcoef(first_start, failure_u)[0, 1]) < 0.1
    x, _ = corpus.train_batch(5, 1, 1)
    start = int(step_rng(0, DATA_STREAM, 5).integers(0, span))
    assert x[0, 0].tolist() == corpus.train[start : start + 16].tolist()
    assert injector.draw(5) == [
        int(i) for i in np.flatnonzero(step_rng(0, FAILURE_STREAM, 5).random(4) < 0.3)
    ]
    expected = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[FAILURE_STREAM].spawn(8)[7]).random()
    assert step_rng(0, FAILURE_STREAM, 7).random() == expected


# ----- identity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_rerun_of_another_spec_is_refused_naming_the_run_and_restart_starts_a_new_one(
    where, tmp_path, request
):
    """Same spec: the run in run.json is resumed; another lr: RunConflictError naming the run, the change and
    --restart; with restart a new run id; where Ray runs (cpus per stage) is not part of the identity."""
    base = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/out"
    spec = tiny_spec(base)
    first = open_run(spec)
    assert not first.resumed
    record = json.loads(storage.read_bytes(storage.join(base, "run.json")))
    assert record["run_id"] == first.run_id and record["fingerprint"] == first.fingerprint
    moved = spec.model_copy(update={"pipeline": spec.pipeline.model_copy(update={"num_cpus_per_stage": 0.5})})
    again = open_run(moved)
    assert again.resumed and again.run_id == first.run_id
    other = spec.model_copy(update={"optim": spec.optim.model_copy(update={"lr": 1e-2})})
    with pytest.raises(RunConflictError) as refused:
        open_run(other)
    message = str(refused.value)
    assert first.run_id in message and "spec.optim: lr changed" in message and "--restart" in message
    assert "output.uri" in message
    restarted = open_run(other, restart=True)
    assert restarted.run_id != first.run_id and not restarted.resumed
    assert json.loads(storage.read_bytes(storage.join(base, "run.json")))["run_id"] == restarted.run_id


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_rerun_never_prunes_or_loads_an_earlier_runs_checkpoints(where, tmp_path, request):
    """An earlier run's checkpoints 150 and 200 outlive a rerun's 0, 20, 40 (keep=2), and the rerun's latest is
    its own 40; the earlier run still loads its own 200."""
    base = str(tmp_path / "ckpt") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/ckpt"
    spec = tiny_spec(str(tmp_path / "out"))
    earlier, rerun = (
        CheckpointStore(base, 2, new_identity(spec)),
        CheckpointStore(base, 2, new_identity(spec)),
    )
    for step in (150, 200):
        earlier.save(step, [b"earlier-%d" % step] * 4, {})
    for step in (0, 20, 40):
        rerun.save(step, [b"rerun-%d" % step] * 4, {})
    assert rerun.steps() == [20, 40] and rerun.latest() == 40
    assert earlier.steps() == [150, 200]
    assert rerun.load(40, 4).shards[0] == b"rerun-40"
    assert earlier.load(200, 4).shards[0] == b"earlier-200"
    assert earlier.load(200, 4).metadata["run_id"] == earlier.run.run_id


def test_cli_train_into_another_specs_output_exits_1_naming_the_run(tmp_path):
    """`checkfree-ray train` of a changed spec into an occupied output exits 1 before starting Ray, naming the run
    there, what changed and --restart."""
    first = open_run(tiny_spec(str(tmp_path / "out")))
    changed = tiny_spec(str(tmp_path / "out"), steps=9)
    dump_spec(changed, tmp_path / "changed.yaml")
    outcome = CliRunner().invoke(main, ["train", str(tmp_path / "changed.yaml")])
    assert outcome.exit_code == 1, outcome.output
    assert first.run_id in outcome.output and "spec.steps: changed" in outcome.output
    assert "--restart" in outcome.output


def test_train_and_submit_offer_restart():
    """`checkfree-ray train --help` and `submit --help` list --restart."""
    for command in ("train", "submit"):
        outcome = CliRunner().invoke(main, [command, "--help"])
        assert outcome.exit_code == 0 and "--restart" in outcome.output


# ----- resume after the driver is killed ----------------------------------------------------------------------
def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(0.2)


def _newest_complete_checkpoint(output: Path) -> int:
    """The step of the newest checkpoint with its manifest written (-1: none yet)."""
    manifests = output.glob("checkpoints/run-*/checkpoint_*/MANIFEST.json")
    return max((int(path.parent.name.rsplit("_", 1)[1]) for path in manifests), default=-1)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_driver_killed_mid_run_resumes_with_the_losses_of_an_uninterrupted_twin(ray_local, tmp_path):
    """SIGKILL `python -m checkfree_ray train` once checkpoint 8 is complete; `checkfree-ray train` again resumes
    from the newest complete checkpoint and every loss equals an uninterrupted twin's (1e-6), failures included."""
    from checkfree_ray import run_training

    steps, schedule = 24, [(3, 2), (18, 1)]
    spec = tiny_spec(str(tmp_path / "run"), steps=steps, schedule=schedule)
    spec_path = tmp_path / "spec.yaml"
    dump_spec(spec, spec_path)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "checkfree_ray", "train", str(spec_path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # any complete checkpoint from step 8 on: with `keep: 2`, checkpoint 8 itself is gone once 16 is written,
        # and a test process held off its core for a moment could miss it
        _wait_for(
            lambda: _newest_complete_checkpoint(tmp_path / "run") >= 8 or driver.poll() is not None,
            300,
            "checkpoint 8 was not written",
        )
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL, (
        f"the driver ended (exit {driver.returncode}) before it was killed:\n{driver.stderr.read().decode()[-3000:]}"
    )
    assert not (tmp_path / "run" / "result.json").exists()  # the killed run never finished

    outcome = CliRunner().invoke(main, ["train", str(spec_path)])
    assert outcome.exit_code == 0, outcome.output
    resumed = json.loads((tmp_path / "run" / "result.json").read_text())
    twin = run_training(tiny_spec(str(tmp_path / "twin"), steps=steps, schedule=schedule), progress=False)

    assert resumed["resumed_from"] and 8 <= resumed["resumed_from"][0] < steps
    assert resumed["run_id"] == json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert resumed["steps"] == twin.steps == list(range(1, steps + 1))
    assert resumed["losses"] == pytest.approx(twin.losses, abs=1e-6)
    assert resumed["val_losses"] == pytest.approx(twin.val_losses, abs=1e-6)
    assert (
        [(f["step"], f["stage"], f["method"]) for f in resumed["failures"]]
        == [(f.step, f.stage, f.method) for f in twin.failures]
        == [(3, 2, "checkfree"), (18, 1, "checkfree")]
    )


def test_rerun_of_a_finished_run_returns_its_result_without_training(ray_local, tmp_path, monkeypatch):
    """A resubmitted job whose run already finished gets the stored result back; no stage actor is started."""
    from checkfree_ray import run_training
    from checkfree_ray.executor import PipelineExecutor

    spec = tiny_spec(str(tmp_path / "run"), steps=2, every=2)
    first = run_training(spec, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"

    def refuse(self, resume=None):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(PipelineExecutor, "start", refuse)
    again = run_training(spec, progress=False)
    assert (
        again.run_id == first.run_id
        and again.losses == first.losses
        and again.wall_time_s == first.wall_time_s
    )
