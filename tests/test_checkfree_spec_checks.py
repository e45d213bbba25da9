"""Spec checks of CheckFree training: refused at load (exit code 2, field named) before any actor starts."""

from __future__ import annotations

import warnings

import pytest
from click.testing import CliRunner

import checkfree_ray.train
from checkfree_ray.cli import main
from schemas.errors import SpecError
from schemas.loader import parse_spec
from schemas.train import TrainSpec

BASE = "kind: train\nsteps: 10\nmodel: {d_model: 32, n_layers: 4, n_heads: 2, seq_len: 16}\n"


def _train_exit(tmp_path, monkeypatch, body: str):
    """`checkfree-ray train` on BASE + body; returns (exit code, output, whether training was started)."""
    started = []
    monkeypatch.setattr(checkfree_ray.train, "run_training", lambda *a, **k: started.append(a))
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + body)
    outcome = CliRunner().invoke(main, ["train", str(path)])
    return outcome.exit_code, outcome.output, bool(started)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("pipeline: {micro_batches: 1}\nrecovery: {strategy: checkfree+}\n", "pipeline.micro_batches"),
        ("pipeline: {micro_batches: 3}\nrecovery: {strategy: checkfree+}\n", "pipeline.micro_batches"),
        ("recovery: {epsilon: 0}\n", "recovery.epsilon"),
        ("failures: {schedule: [[11, 1]]}\n", "failures.schedule"),
        ("failures: {schedule: [[0, 1]]}\n", "failures.schedule"),
    ],
)
def test_bad_spec_exits_2_naming_the_field_before_training(tmp_path, monkeypatch, body, field):
    """Odd/too few CheckFree+ micro-batches, epsilon 0, schedule steps outside 1..steps: exit 2, field named."""
    code, output, started = _train_exit(tmp_path, monkeypatch, body)
    assert code == 2 and field in output and not started


def test_checks_accept_the_boundaries():
    """Two micro-batches under CheckFree+, odd counts under CheckFree, failures at steps 1 and `steps` are fine."""
    spec = parse_spec(
        {"steps": 10, "pipeline": {"micro_batches": 2}, "failures": {"schedule": [[1, 0], [10, 3]]}},
        TrainSpec,
    )
    assert spec.recovery.strategy == "checkfree+" and spec.pipeline.micro_batches == 2
    assert (
        parse_spec(
            {"pipeline": {"micro_batches": 3}, "recovery": {"strategy": "checkfree"}}, TrainSpec
        ).pipeline.micro_batches
        == 3
    )
    with pytest.raises(SpecError, match="outside 1..`steps` \\(10\\)"):
        parse_spec({"steps": 10, "failures": {"schedule": [[12, 0]]}}, TrainSpec)


def test_high_failure_probability_warns_about_quadratic_replay():
    """probability_per_step >= 0.5 warns (replay grows quadratically); 0.49 does not."""
    with pytest.warns(UserWarning, match="quadratically"):
        parse_spec({"failures": {"probability_per_step": 0.5}}, TrainSpec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            parse_spec({"failures": {"probability_per_step": 0.49}}, TrainSpec).failures.probability_per_step
            == 0.49
        )
