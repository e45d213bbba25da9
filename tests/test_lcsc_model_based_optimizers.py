"""The model-based optimisers a spec may name (Nevergrad's MetaModel, ChainMetaModelSQP) built the way a search
builds them (`lcsc_ray.tuning.build_optimizer`): seeded, bounded, and better than their start on a smooth bowl
(what FID is as a function of the coefficients near its minimum) within half a usual budget."""

from __future__ import annotations

import numpy as np
import pytest

from lcsc_ray.tuning import build_optimizer
from schemas.search import SearchSpec

DIM, BUDGET, WORKERS = 6, 24, 1
MINIMUM = np.linspace(-0.5, 0.5, DIM)


def bowl(x: np.ndarray) -> float:
    return float(np.sum((np.asarray(x) - MINIMUM) ** 2))


def run(optimizer_name: str, seed: int) -> tuple[list[list[float]], float]:
    spec = SearchSpec.model_validate(
        {"seed": seed, "search": {"optimizer": optimizer_name, "bound": 3.0, "sigma": 0.15}}
    )
    optimizer = build_optimizer(spec, np.zeros(DIM), BUDGET, WORKERS)
    asked, best = [], float("inf")
    for _ in range(BUDGET):
        candidate = optimizer.ask()
        x = np.asarray(candidate.value)
        assert np.all(np.abs(x) <= 3.0)
        value = bowl(x)
        optimizer.tell(candidate, value)
        asked.append([round(float(v), 12) for v in x])
        best = min(best, value)
    return asked, best


@pytest.mark.parametrize("name", ["MetaModel", "ChainMetaModelSQP"])
def test_model_based_optimisers_are_seeded_and_improve_on_their_start(name):
    first, best = run(name, seed=3)
    again, _ = run(name, seed=3)
    other, _ = run(name, seed=4)
    assert first == again  # the spec's seed makes the proposals reproducible (a resumed search replays them)
    assert first != other
    assert best < 0.75 * bowl(np.zeros(DIM))  # it finds its way down the bowl from its start
