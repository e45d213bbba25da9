"""Thin Ray Tune trials: take a free evaluator from the pool, score one candidate, report its FID.

The optimiser (Nevergrad behind Tune's searcher) never learns how FID is computed, and the evaluator
never learns which optimiser asked: the trial only maps the free values to coefficients and back.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import ray
from ray import tune
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lcsc_ray.coefficients import normalized_sum_problem, to_alphas
from lcsc_ray.evaluations import EvaluationStore
from schemas.errors import LcscCheckfreeError

# Reported for a candidate whose samples are NaN/inf (it diverged): a legitimate, very bad score, so the
# optimiser learns to avoid that region instead of never hearing about it.
NONFINITE_FID = 1.0e4
# A trial needs no CPU (evaluators hold the cores) but Tune needs a non-empty resource request.
TRIAL_RESOURCES = {"cpu": 0, "memory": 16 * 1024 * 1024}


class TrialFailedError(LcscCheckfreeError):
    """A candidate could not be evaluated even after a retry on another evaluator."""


@ray.remote(num_cpus=0)
class EvaluatorBroker:
    """Hands out free evaluator indices to trials; a trial blocks until one is free."""

    def __init__(self, num_evaluators: int):
        self.num_evaluators = num_evaluators
        self.free = list(range(num_evaluators))
        self.condition = asyncio.Condition()

    async def acquire(self, avoid: list[int]) -> int:
        """A free evaluator, preferring those not in `avoid` (ones that already failed this candidate)."""
        async with self.condition:
            while True:
                pool = [i for i in self.free if i not in avoid]
                if not pool and len(set(avoid)) >= self.num_evaluators:
                    pool = self.free  # every evaluator failed this candidate once: any (restarted) one will do
                if pool:
                    index = pool[0]
                    self.free.remove(index)
                    return index
                await self.condition.wait()

    async def release(self, index: int) -> None:
        """Give an evaluator back."""
        async with self.condition:
            if index not in self.free:
                self.free.append(index)
            self.condition.notify_all()


def start_broker(num_evaluators: int):
    """The broker, pinned to the driver's node: a trial can survive losing an evaluator, not its broker."""
    node = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return EvaluatorBroker.options(scheduling_strategy=strategy).remote(num_evaluators)


def evaluate_candidate(config: dict, *, evaluators: list, broker, names: list[str], parametrization: str,
                       num_samples: int, seed: int, record_uri: str) -> None:
    """Tune trainable: evaluate one coefficient vector (unless the record already holds it, as after a
    resumed search); retry once on another evaluator if one dies."""
    start = time.monotonic()
    free = [config[name] for name in names]
    problem = normalized_sum_problem(free, parametrization)
    if problem:  # scored as failed, with its reason, instead of evaluating blown-up coefficients
        raise TrialFailedError(f"candidate {[round(float(x), 6) for x in free]}: {problem}")
    alphas = to_alphas(free, parametrization)
    record = EvaluationStore(record_uri)
    known = record.get(alphas, num_samples, seed)
    if known is not None and "metrics" in known:
        tune.report({**known["metrics"], "trial_s": time.monotonic() - start, "replayed": True})
        return
    tried: list[int] = []
    reasons: list[str] = []
    for _attempt in range(2):
        index = ray.get(broker.acquire.remote(tried))
        tried.append(index)
        try:
            out = ray.get(evaluators[index].evaluate.remote(alphas.tolist(), num_samples, seed,
                                                            raise_nonfinite=False))
        except RayActorError as exc:
            reasons.append(f"evaluator {index} died: {type(exc).__name__}")
            continue
        except ray.exceptions.RayTaskError as exc:
            reasons.append(f"evaluator {index}: {exc.cause!r}"[:300])
            continue
        finally:
            broker.release.remote(index)
        fid = float(out["fid"])
        finite = math.isfinite(fid) and not out.get("nonfinite")
        metrics = _metrics(config, alphas, fid if finite else NONFINITE_FID, num_samples, seed, start, index,
                           "ok" if finite else "nonfinite", float(out["timings"]["total_s"]),
                           "" if finite else "combined weights or samples hold NaN/inf")
        record.put(alphas, num_samples, seed, {"fid": metrics["fid"], "metrics": metrics})
        tune.report(metrics)
        return
    raise TrialFailedError(f"candidate failed on evaluators {tried}: {'; '.join(reasons)}")


def _metrics(config: dict, alphas: np.ndarray, fid: float, num_samples: int, seed: int, start: float,
             evaluator: int, status: str, eval_s: float, reason: str) -> dict:
    return {
        "fid": fid,
        "label": config.get("label", "search"),
        "alphas": [float(a) for a in alphas],
        "num_samples": num_samples,
        "seed": seed,
        "evaluator": evaluator,
        "status": status,
        "reason": reason,
        "eval_s": eval_s,
        "trial_s": time.monotonic() - start,
    }


def trainable(evaluators: list, broker, names: list[str], parametrization: str, num_samples: int, seed: int,
              record_uri: str):
    """The Tune trainable with its resources and bound parameters."""
    bound = tune.with_parameters(
        evaluate_candidate, evaluators=evaluators, broker=broker, names=names,
        parametrization=parametrization, num_samples=num_samples, seed=seed, record_uri=record_uri,
    )
    return tune.with_resources(bound, TRIAL_RESOURCES)
