"""Recovery rules of the paper's ablation (Figure 2): pure functions, and the rule wired into the executor."""

from __future__ import annotations

import pytest
import torch

from checkfree_ray.model import ModelConfig, build_parts
from checkfree_ray.recovery import reinit_seed, reinitialised_blocks, rule_weights, weighted_sum
from schemas.train import RecoverySpec

STATES = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])},
          {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([[0.0]])}]


def _apply(rule: str, norms=(0.3, 0.1), eps=1e-4):
    return weighted_sum(STATES, rule_weights(rule, norms, eps))


def test_weighted_rule_is_the_paper_formula():
    """'weighted': (g0+eps) W0 + (g1+eps) W1 over the sum, computed independently in float64."""
    out = _apply("weighted")
    g0, g1 = 0.3 + 1e-4, 0.1 + 1e-4
    expected = (g0 * torch.tensor([1.0, 2.0], dtype=torch.float64) + g1 * torch.tensor([3.0, -2.0],
                dtype=torch.float64)) / (g0 + g1)
    torch.testing.assert_close(out["w"].double(), expected, atol=1e-6, rtol=0)


def test_average_rule_ignores_gradient_norms():
    """'average': equal weights whatever the norms."""
    out = _apply("average", norms=(100.0, 0.0))
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[2.0]]))


def test_copy_rule_takes_the_previous_neighbour_exactly():
    """'copy': the previous neighbour's tensors, bit for bit."""
    out = _apply("copy", norms=(0.0, 5.0))
    assert torch.equal(out["w"], STATES[0]["w"]) and torch.equal(out["b"], STATES[0]["b"])


def test_random_rule_reinitialises_from_a_new_seed():
    """'random': no average; fresh blocks with the model's init (std 0.02), unlike the run's initial stage."""
    assert rule_weights("random", (0.3, 0.1), 1e-4) is None
    cfg = ModelConfig.from_spec(_llama(), 4)
    blocks = reinitialised_blocks(cfg, 1, reinit_seed(0, 10, 1))
    initial = build_parts(cfg, 0).stages[1].state_dict()
    key = "blocks.0.ffn.w1.weight"
    fresh = blocks[f"model/blocks/{key}"]
    assert not torch.equal(fresh, initial[key])
    assert fresh.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(fresh, reinitialised_blocks(cfg, 1, reinit_seed(0, 10, 1))[f"model/blocks/{key}"])
    assert set(blocks) == {f"model/blocks/{k}" for k in initial}


def test_unknown_rule_is_refused():
    """A rule outside the four raises, naming the choices; the spec refuses it too."""
    with pytest.raises(ValueError, match="'weighted', 'average', 'copy' or 'random'"):
        rule_weights("median", (1.0, 1.0), 0.0)
    with pytest.raises(ValueError):
        RecoverySpec(rule="median")


def _llama():
    from schemas.train import LlamaSpec

    return LlamaSpec(d_model=32, n_layers=4, n_heads=2, seq_len=16)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_copy_rule_is_used_by_the_executor(ray_local):
    """A middle stage killed under checkfree with rule 'copy' comes back equal to its previous neighbour."""
    from checkfree_ray.executor import PipelineExecutor
    from tests.test_checkfree_engine import tiny_spec

    spec = tiny_spec("checkfree", schedule=[(3, 2)], recovery={"rule": "copy"})
    executor = PipelineExecutor(spec)
    captured = {}
    executor.after_recovery.append(lambda ex, step, stages: captured.update(states=ex.stage_states(("blocks",))))
    try:
        executor.start()
        step = 1
        while step <= 3:
            step = executor.run_step(step)
    finally:
        executor.shutdown()
    assert [(f.step, f.stage, f.method) for f in executor.history.failures] == [(3, 2, "checkfree")]
    states = captured["states"]
    for key, value in states[2].items():
        assert torch.equal(value, states[1][key]), key
