"""Failure injection: which stages die at which step, and killing their processes for real.

Draws are deterministic: stage s fails at step t when u(seed, t)[s] < p (u from the failure stream, apart
from the data order's), where p is the spec's per-step
probability or comes from the hourly rate and the measured step time. A schedule gives exact failures.
Each (step, stage) fires at most once, so the retried step is not killed again.

A kill is realistic: the stage's process is SIGKILLed and the step goes on at once; the failure is
detected when one of the step's calls fails, as it would be when a node is lost.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from checkfree_ray.data import FAILURE_STREAM, step_rng
from checkfree_ray.recovery_rules import failure_probability
from schemas.train import FailureSpec


class FailureInjector:
    """Decides the stages to kill at each step and kills them (`ray.kill`)."""

    def __init__(self, spec: FailureSpec, num_stages: int):
        self.spec, self.num_stages = spec, num_stages
        self.fired: set[tuple[int, int]] = set()
        self.kill_times: dict[tuple[int, int], float] = {}

    def probability(self, step_time_s: float | None) -> float:
        """Per-stage per-step failure probability now."""
        if self.spec.probability_per_step is not None:
            return self.spec.probability_per_step
        if self.spec.hourly_rate is not None and step_time_s:
            return failure_probability(self.spec.hourly_rate, step_time_s)
        return 0.0

    def draw(self, step: int, step_time_s: float | None = None) -> list[int]:
        """Stages that fail at `step` (scheduled or drawn), excluding those that already fired."""
        stages = {stage for s, stage in self.spec.schedule if s == step}
        p = self.probability(step_time_s)
        if p > 0:
            draws = step_rng(self.spec.seed, FAILURE_STREAM, step).random(self.num_stages)
            stages |= {int(i) for i in np.flatnonzero(draws < p)}
        return sorted(s for s in stages if (step, s) not in self.fired)

    def kill(self, step: int, stage: int, actor) -> float:
        """SIGKILL the stage's process and return at once; returns the kill time (monotonic).

        The kill is an actor call, so it runs before any call the driver submits to that actor later:
        the process is gone before the step's first call to it (`ray.kill` from outside is asynchronous
        and a call right after it can still reach the old process).
        """
        self.fired.add((step, stage))
        killed_at = time.monotonic()
        self.kill_times[(step, stage)] = killed_at
        actor.terminate.remote()
        return killed_at


def wait_until_dead(actor, wait_s: float = 10.0) -> None:
    """`ray.kill` is asynchronous: poll until a call to the actor raises `RayActorError`."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=1.0)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.01)
    raise TimeoutError(f"actor {actor} still answers {wait_s}s after ray.kill")
