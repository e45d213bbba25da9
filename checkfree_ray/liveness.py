"""Which stages answer: the liveness facts the executor, the stage group and the recovery share.

A stage is lost when its actor is dead or does not answer within a bound (then the caller kills it, a timeout
counts as a death). `StageLost` carries which stages were lost and where the step was for each (`phase_of`);
`stuck_stages` tells which stages of a timed-out step are running a call rather than waiting on another stage.
This module imports no other module of the engine.
"""

from __future__ import annotations

import time

import ray

from checkfree_ray.timeouts import FETCH_TIMEOUT_S


class StageLost(Exception):
    """Stages found dead (or not answering) during a step.

    `phases` maps each lost stage to where the step was (see `FailureRecord.phase`), `reasons` to 'died' or
    'timeout'; `norms` and `loss` are the step's when the loss came after some stages stepped their optimizer.
    `relost` lists the stages whose replacement was lost during their own recovery (each is one more failure,
    phase 'recovery'). `keeps_step` (set by the executor, `keeps_step`): the survivors keep that step and the lost
    stages are rebuilt at it (rolled forward), instead of the step running again.
    """

    def __init__(
        self,
        stages: list[int],
        phases: dict[int, str] | str = "before_step",
        norms: list[dict | None] | None = None,
        loss: float = 0.0,
        detected_at: float | None = None,
        reasons: dict[int, str] | None = None,
        relost: list[tuple[int, str]] | None = None,
    ):
        self.stages = sorted(stages)
        self.phases = phases if isinstance(phases, dict) else dict.fromkeys(self.stages, phases)
        self.reasons = reasons or {}
        self.relost = (
            relost or []
        )  # (stage, reason) of replacements lost while their stage was being recovered
        self.norms, self.loss = norms, loss
        self.keeps_step = False
        self.detected_at = time.monotonic() if detected_at is None else detected_at
        super().__init__(f"stages {self.stages} lost ({self.phases})")

    @property
    def optimizer_phase(self) -> bool:
        """Whether some stages had stepped their optimizer when the stages were lost."""
        return any(phase == "optimizer" for phase in self.phases.values())


def _finished(ref) -> bool:
    """Whether a call finished without an error (a call still running, or failed, did not)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        # ready per its owner; fetching a large activation from the object store can still take a moment on a
        # loaded node, so a zero timeout would call a finished call unfinished
        ray.get(ref, timeout=FETCH_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        return True  # ready, its value just slow to fetch: an error would have been there at once
    except ray.exceptions.RayError:
        return False
    except (
        ValueError
    ):  # a Ray Direct Transport value, which the driver may not fetch: it exists, so it finished
        return True
    return True


def phase_of(calls: list[tuple]) -> str:
    """Where a lost stage was in its step: the kind of its first call (in submission order) that did not finish;
    'before_step' when none of them did. `calls` are (kind, ref, upstream refs)."""
    for index, (kind, ref, *_upstream) in enumerate(calls):
        if not _finished(ref):
            return "before_step" if index == 0 else kind
    return "optimizer"


def stuck_stages(calls: list[list[tuple]]) -> list[int]:
    """Stages stuck in a call: their first unfinished call has every input ready, so it is running (a stage
    whose first unfinished call still waits on another stage's output is only waiting)."""
    stuck = []
    for stage, stage_calls in enumerate(calls):
        for _kind, ref, upstream in stage_calls:
            if ray.wait([ref], timeout=0)[0]:
                continue
            inputs = list(upstream)
            if not inputs or len(ray.wait(inputs, num_returns=len(inputs), timeout=0)[0]) == len(inputs):
                stuck.append(stage)
            break
    return stuck


def unanswering(actors: list, timeout_s: float) -> tuple[list[int], list[int]]:
    """(stages whose actor is dead, stages whose actor did not answer a ping within `timeout_s`)."""
    pings = [a.ping.remote() for a in actors]
    deadline = time.monotonic() + timeout_s
    dead, silent = [], []
    for stage, ref in enumerate(pings):
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            silent.append(stage)
        except ray.exceptions.RayActorError:
            dead.append(stage)
    return dead, silent
