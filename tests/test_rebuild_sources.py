"""The engine's rebuild of a lost stage as functions (`recovery_rules.plan_for`, `rebuild_sources`): what
`StageRecovery` sends a replacement actor, and what the in-process recovery benchmarks call."""

from __future__ import annotations

import torch

from checkfree_ray.model import ModelConfig
from checkfree_ray.recovery_rules import (
    gradient_weights,
    plan_for,
    rebuild_sources,
    reinit_seed,
    reinitialised_blocks,
)
from schemas.train import LlamaSpec, RecoverySpec

NORMS = [  # what each stage's optimizer step reported
    {"stage": 0.4, "blocks": 0.1, "stage_pre_clip": 2.0, "blocks_pre_clip": 0.5},
    {"stage": 0.3, "blocks": 0.2, "stage_pre_clip": 0.3, "blocks_pre_clip": 0.2},
    {"stage": 0.6, "blocks": 0.05, "stage_pre_clip": 0.6, "blocks_pre_clip": 0.05},
    {"stage": 0.5, "blocks": 0.3, "stage_pre_clip": 0.9, "blocks_pre_clip": 0.3},
]


def _fetch(kind):
    return lambda stage: (kind, stage)


def _sources(rebuild, cfg=None, lr=0.01):
    return rebuild_sources(rebuild, lr, cfg, 3, 7, _fetch("blocks"), _fetch("copy"), _fetch("backup"))


def test_plan_for_weighs_by_the_spec_norms_and_rule():
    """The spec's scope, clip side, rule and epsilon decide the plan's sources and weights."""
    (blocks,) = plan_for(RecoverySpec(grad_norm_scope="blocks"), "checkfree", [1], 4, NORMS).rebuilds
    assert blocks.sources == (0, 2) and blocks.weights == gradient_weights(0.1, 0.05, 1e-4)
    (pre,) = plan_for(RecoverySpec(grad_norm="pre_clip", epsilon=0.5), "checkfree", {2}, 4, NORMS).rebuilds
    assert pre.sources == (1, 3) and pre.weights == gradient_weights(0.3, 0.9, 0.5)
    (copy,) = plan_for(RecoverySpec(rule="copy"), "checkfree", {1}, 4, NORMS).rebuilds
    assert (copy.sources, copy.weights) == ((0,), (1.0,))
    assert plan_for(RecoverySpec(), "checkfree", {1, 2}, 4, NORMS).rollback


def test_rebuild_sources_per_method():
    """CheckFree: the neighbours' blocks and the recipe's weights; CheckFree+: the partner's blocks and the copy
    it holds; redundant: the backup with its own lr; random and identity: fresh blocks seeded by run, step, stage."""
    spec = RecoverySpec()
    (weighted,) = plan_for(spec, "checkfree", {2}, 4, NORMS).rebuilds
    src = _sources(weighted)
    assert (src.lr, src.sources, src.weights) == (0.01, [("blocks", 1), ("blocks", 3)], weighted.weights)
    (outer,) = plan_for(spec, "checkfree+", {3}, 4, NORMS).rebuilds
    src = _sources(outer)
    assert (src.lr, src.sources, src.weights) == (0.01, [("blocks", 2), ("copy", 2)], ())
    (backup,) = plan_for(spec, "redundant", {0}, 4, NORMS).rebuilds
    src = _sources(backup)
    assert (src.lr, src.sources, src.weights) == (None, [("backup", 3)], ())
    cfg = ModelConfig.from_spec(LlamaSpec(d_model=32, n_layers=4, n_heads=2, seq_len=16), 4)
    for rule in ("random", "identity"):
        (fresh,) = plan_for(RecoverySpec(rule=rule), "checkfree", {1}, 4, NORMS).rebuilds
        src = _sources(fresh, cfg)
        expected = reinitialised_blocks(cfg, 1, reinit_seed(3, 7, 1), rule)
        assert src.lr == 0.01 and src.weights == () and len(src.sources) == 1
        assert src.sources[0].keys() == expected.keys()
        assert all(torch.equal(src.sources[0][k], v) for k, v in expected.items())
