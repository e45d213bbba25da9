"""The CheckFree SDK and `checkfree-ray submit`: a training run submitted as a Ray job."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from checkfree_ray import submit_training
from checkfree_ray.cli import main
from schemas.train import TrainSpec
from schemas.train_result import TrainResult

ROOT = Path(__file__).resolve().parents[1]


def test_submit_and_demo_help():
    """`checkfree-ray submit --help` and `demo --help` list their options."""
    outcome = CliRunner().invoke(main, ["submit", "--help"])
    assert outcome.exit_code == 0, outcome.output
    assert "--address" in outcome.output and "--no-wait" in outcome.output
    demo = CliRunner().invoke(main, ["demo", "--help"])
    assert demo.exit_code == 0 and "--no-reference" in demo.output


def test_submit_bad_spec_exits_2(tmp_path):
    """`checkfree-ray submit` on an invalid spec exits 2 naming the field, before any Ray is started."""
    path = tmp_path / "bad.yaml"
    path.write_text("kind: train\nmodel: {n_layers: 5}\npipeline: {num_stages: 4}\n")
    outcome = CliRunner().invoke(main, ["submit", str(path)])
    assert outcome.exit_code == 2 and "n_layers" in outcome.output


# `extended`: a spec submitted through the SDK to a local head it starts is, in `make test`,
# test_lcsc_jobs.py (the same `rayops.jobs.submit_spec`); a training run as a Ray job is test_checkfree_spot_e2e.py.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(300)
def test_submit_training_to_local_head(tmp_path, monkeypatch):
    """A tiny spec submitted to a local head SUCCEEDS and `.result()` is its TrainResult (4 steps, 1 recovery)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = TrainSpec.model_validate(
        {
            "name": "sdk-tiny",
            "steps": 4,
            "eval_every": 2,
            "eval_batches": 2,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "recovery": {"strategy": "checkfree+"},
            "failures": {"schedule": [[2, 1]]},
            "output": {"uri": str(tmp_path / "run")},
        }
    )
    with submit_training(spec) as job:
        assert job.wait(timeout_s=240) == "SUCCEEDED", job.logs()[-3000:]
        result = job.result()
    assert isinstance(result, TrainResult)
    assert result.steps == [1, 2, 3, 4] and result.spec.name == "sdk-tiny"
    assert [(f.step, f.stage, f.method) for f in result.failures] == [(2, 1, "checkfree")]
    assert (tmp_path / "run" / "result.json").exists()


def test_demo_spec_hits_middle_first_and_last_stages_and_summary_names_each_rebuild():
    """The demo spec kills middle, first and last stages under checkfree+; the summary says how each came back."""
    from checkfree_ray.demo import demo_spec, format_summary
    from schemas.train_result import FailureRecord

    spec = demo_spec()
    stages = {stage for _, stage in spec.failures.schedule}
    assert spec.recovery.strategy == "checkfree+" and {0, 1, spec.pipeline.num_stages - 1} <= stages
    failures = [
        FailureRecord(step=50, stage=1, method="checkfree", detection_s=0.1, recovery_s=0.25),
        FailureRecord(
            step=100,
            stage=0,
            method="copy",
            detection_s=0.1,
            recovery_s=0.5,
            death_to_retry_s=0.7,
            warm_standby=True,
        ),
    ]
    result = TrainResult(
        spec=spec,
        steps=[1, 2],
        losses=[3.0, 2.9],
        wall_times=[0.1, 0.2],
        failures=failures,
        final_val_loss=2.0,
        final_perplexity=7.389056,
        wall_time_s=10.0,
    )
    reference = result.model_copy(
        update={"failures": [], "final_val_loss": 1.9, "final_perplexity": 6.685894}
    )
    text = format_summary(result, reference)
    assert "weighted avg of S0,S2" in text and "copy of swap partner S1" in text
    assert "+0.1000" in text and "1.105x perplexity" in text
