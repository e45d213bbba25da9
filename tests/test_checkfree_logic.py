"""Pure recovery logic, data and model pieces of the CheckFree engine (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkfree_ray.data import FAILURE_STREAM, ByteCorpus, step_rng
from checkfree_ray.failures import FailureInjector
from checkfree_ray.model import ModelConfig, ReferenceTrainer, build_parts
from checkfree_ray.recovery_rules import (
    failure_probability,
    micro_batch_order,
    plan_recovery,
    recovered_lr,
    route,
    swapped_order,
    weighted_average,
)
from schemas.train import DataSpec, FailureSpec, LlamaSpec, TrainSpec

pytestmark = pytest.mark.timeout(60)


def test_weighted_average_matches_float64_formula():
    """W = (g1 W1 + g2 W2)/(g1 + g2) with g = norm + eps, checked against numpy float64."""
    rng = np.random.default_rng(0)
    a = {"w": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32), "b": torch.ones(2)}
    b = {"w": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32), "b": torch.zeros(2)}
    out = weighted_average([a, b], [0.3, 2.7], 1e-4)
    g1, g2 = 0.3 + 1e-4, 2.7 + 1e-4
    expected = (g1 * a["w"].double().numpy() + g2 * b["w"].double().numpy()) / (g1 + g2)
    np.testing.assert_allclose(out["w"].double().numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["b"].numpy(), [g1 / (g1 + g2)] * 2, atol=1e-7)
    zero = weighted_average([a, b], [0.0, 0.0], 1e-4)  # no norms yet: a plain average
    np.testing.assert_allclose(zero["b"].numpy(), [0.5, 0.5])


def test_weighted_average_rejects_mismatched_states():
    """Neighbours with different keys are not averaged."""
    with pytest.raises(ValueError, match="different state-dict keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1.0, 1.0], 1e-4)


def test_swap_order_and_routes():
    """CheckFree+ order E,S2,S1,S3,...,Ss,Ss-1; embedding and head hop where their owner is not adjacent."""
    assert swapped_order(6) == [1, 0, 2, 3, 5, 4]
    assert swapped_order(2) == [1, 0]
    with pytest.raises(ValueError):
        swapped_order(3)
    assert micro_batch_order("checkfree+", 4, 1) == [1, 0, 3, 2]
    assert micro_batch_order("checkfree+", 4, 2) == [0, 1, 2, 3]
    assert micro_batch_order("checkfree", 4, 1) == [0, 1, 2, 3]
    assert route([0, 1, 2, 3], 4) == [
        (0, ("embed", "blocks")),
        (1, ("blocks",)),
        (2, ("blocks",)),
        (3, ("blocks", "head")),
    ]
    assert route([1, 0, 3, 2], 4) == [
        (0, ("embed",)),
        (1, ("blocks",)),
        (0, ("blocks",)),
        (3, ("blocks",)),
        (2, ("blocks",)),
        (3, ("head",)),
    ]


def test_plan_recovery_per_strategy():
    """Middle stages average, outer ones copy under checkfree+ only, adjacent losses roll back."""
    assert plan_recovery("checkfree", {2}, 4).rebuilds[0].sources == (1, 3)
    assert plan_recovery("checkfree", {0}, 4).rollback
    plus = plan_recovery("checkfree+", {0, 3}, 4)
    assert [(r.stage, r.method, r.sources) for r in plus.rebuilds] == [(0, "copy", (1,)), (3, "copy", (2,))]
    assert plan_recovery("checkfree+", {1, 2}, 4).rollback
    assert plan_recovery("checkfree+", {0, 1}, 4).rollback
    assert plan_recovery("redundant", {0}, 4).rebuilds[0].sources == (3,)
    assert plan_recovery("redundant", {2, 3}, 4).rollback
    assert plan_recovery("checkpoint", {1}, 4).rollback


def test_lr_rule_and_hourly_probability():
    """lr x 1.1 is set, not compounded; p = 1-(1-h)^(t/3600)."""
    assert recovered_lr(1e-3, 1.1) == pytest.approx(1.1e-3)
    assert failure_probability(0.16, 3600.0) == pytest.approx(0.16)
    assert failure_probability(0.10, 91.0) == pytest.approx(1 - 0.9 ** (91 / 3600))


def test_failure_draws_are_deterministic_and_fire_once():
    """Same seed, same draws; a scheduled (step, stage) fires only on the first attempt."""
    spec = FailureSpec(probability_per_step=0.3, seed=5, schedule=[(2, 1)])
    a, b = FailureInjector(spec, 4), FailureInjector(spec, 4)
    draws = [a.draw(step) for step in range(50)]
    assert draws == [b.draw(step) for step in range(50)]
    rate = sum(len(d) for d in draws) / (50 * 4)
    assert 0.15 < rate < 0.45
    assert 1 in a.draw(2)
    a.fired.add((2, 1))
    assert 1 not in a.draw(2) or step_rng(5, FAILURE_STREAM, 2).random(4)[1] < 0.3


def test_batches_deterministic_and_validation_held_out():
    """Batches depend only on (seed, step); validation windows come from the held-out tail."""
    corpus = ByteCorpus(DataSpec(), seq_len=16, seed=3)
    x1, y1 = corpus.train_batch(7, 2, 3)
    x2, _ = corpus.train_batch(7, 2, 3)
    assert x1.shape == (2, 3, 16) and torch.equal(x1, x2)
    assert torch.equal(x1[..., 1:], y1[..., :-1])
    assert not torch.equal(x1, corpus.train_batch(8, 2, 3)[0])
    assert len(corpus.train) + len(corpus.val) > 400_000


def test_reference_model_learns_and_parts_are_seeded():
    """Same seed, same weights; a few Adam steps on one batch lower its loss."""
    cfg = ModelConfig.from_spec(LlamaSpec(d_model=32, n_layers=4, n_heads=2, seq_len=16), 2)
    p1, p2 = build_parts(cfg, 1), build_parts(cfg, 1)
    assert torch.equal(p1.stages[1].blocks[0].ffn.w1.weight, p2.stages[1].blocks[0].ffn.w1.weight)
    trainer = ReferenceTrainer(cfg, seed=1, lr=3e-3)
    x, y = ByteCorpus(DataSpec(), 16, 0).train_batch(0, 2, 4)
    losses = [trainer.train_step(x, y, [[0, 1], [0, 1]]) for _ in range(10)]
    assert losses[-1] < losses[0] - 0.5


def test_spec_rejects_three_stage_checkfree_plus():
    """CheckFree+ with 3 stages is a spec error that names the field."""
    with pytest.raises(ValueError, match="num_stages"):
        TrainSpec.model_validate(
            {"model": {"n_layers": 3}, "pipeline": {"num_stages": 3}, "recovery": {"strategy": "checkfree+"}}
        )
