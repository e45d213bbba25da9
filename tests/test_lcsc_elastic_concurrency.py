"""Tune's concurrency follows the live evaluator pool (`ReplaySearcher(in_flight_limit=...)`), and the
optimiser's proposals do not depend on it: a search whose pool shrinks and grows proposes exactly what a search
on a pool of fixed size proposes."""

from __future__ import annotations

import numpy as np
from ray.tune.search import Searcher

from lcsc_ray.tuning import ReplaySearcher, build_optimizer, free_names
from schemas.search import SearchSpec

DIM, BUDGET, WORKERS = 3, 20, 3


def _searcher(limit=None) -> ReplaySearcher:
    spec = SearchSpec.model_validate({"seed": 5, "search": {"optimizer": "CMA", "sigma": 0.3}})
    optimizer = build_optimizer(spec, np.full(DIM, 0.1), BUDGET, WORKERS)
    return ReplaySearcher(optimizer, free_names(DIM), WORKERS, None, in_flight_limit=limit)


def _value(config: dict) -> float:
    return float(sum((config[name] - 0.3) ** 2 for name in free_names(DIM)))


def _drive(searcher: ReplaySearcher, live: list[int] | None = None) -> tuple[list[list[float]], int]:
    """Play Tune: take suggestions while offered, then finish the oldest running trial; `live` (consumed one per
    round) is the pool size the searcher's limit reads. Returns the proposals and the most trials in flight."""
    running: dict[str, dict] = {}
    proposals, most, made = [], 0, 0
    while True:
        while True:
            config = searcher.suggest(f"t{made}")
            if config is None or config == Searcher.FINISHED:
                break
            running[f"t{made}"] = config
            proposals.append([config[name] for name in free_names(DIM)])
            made += 1
        most = max(most, len(running))
        if config == Searcher.FINISHED or not running:
            return proposals, most
        trial_id = next(iter(running))
        searcher.on_trial_complete(trial_id, {"fid": _value(running.pop(trial_id))})
        if live:
            live.pop(0)


def test_trials_in_flight_follow_the_live_pool_and_proposals_do_not_change():
    fixed, most_fixed = _drive(_searcher())
    assert most_fixed == WORKERS and len(fixed) == BUDGET

    sizes = [1, 1, 2, 0, 1] + [3] * 40  # the pool shrinks, empties, grows again
    live = list(sizes)
    in_flight: list[int] = []

    def limit() -> int:
        size = live[0] if live else WORKERS
        in_flight.append(size)
        return max(1, size)  # as `pool_sizing.concurrency`: one trial may wait for the pool to grow

    elastic_searcher = _searcher(limit)
    elastic, most = _drive(elastic_searcher, live)
    assert np.allclose(elastic, fixed, rtol=0, atol=0)  # the same proposals, in the same order
    assert (
        most == WORKERS and 1 in in_flight
    )  # one at a time while the pool was small, all again once it grew


def test_a_limit_of_one_keeps_one_trial_in_flight():
    searcher = _searcher(lambda: 1)
    assert searcher.suggest("a") is not None
    assert searcher.suggest("b") is None  # the pool has one evaluator: Tune waits
    searcher.on_trial_complete("a", {"fid": 1.0})
    assert searcher.suggest("b") is not None
