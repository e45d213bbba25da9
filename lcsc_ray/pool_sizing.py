"""How big the evaluator pool should be, and what a lost evaluator means: pure decisions, no Ray.

The pool follows its cluster between `evaluators.min_actors` and `evaluators.num_actors`:
- it always asks Ray for `num_actors` evaluators (one per slot, live or waiting); those Ray cannot place yet wait (on an autoscaling cluster
  their demand is what makes the autoscaler launch nodes) and join the pool as soon as they are constructed: the
  pool grows;
- an evaluator lost with its node (a spot reclaim, a drain) leaves the pool at once (it shrinks) and is asked
  for again, to be placed wherever room appears; it is no failure;
- an evaluator that crashed or hung while its node was alive is a failure, counted against
  `evaluators.max_replacements`.
`EvaluatorSlots` (lcsc_ray/evaluator_slots.py) acts on these decisions; Tune's concurrency follows `concurrency`.
"""

from __future__ import annotations

from dataclasses import dataclass

NODE_LOST, CRASHED, UNDECIDED = "node_lost", "crashed", "undecided"
START_GO, START_WAIT, START_FAIL = "go", "wait", "fail"


@dataclass(frozen=True)
class NodeView:
    """What the GCS says about the node an evaluator ran on (None: not known, e.g. never placed)."""

    alive: bool | None
    draining: bool = False


def loss_kind(actor_state: str | None, node: NodeView) -> str:
    """Why an evaluator was lost: NODE_LOST when its node is dead or draining (routine on spot capacity),
    CRASHED when the GCS holds the actor DEAD on a live node that is not draining (the evaluator's own fault),
    UNDECIDED while the GCS has not yet seen either (a killed node takes some seconds to be declared dead)."""
    if node.alive is False or node.draining:
        return NODE_LOST
    if actor_state == "DEAD" and node.alive:
        return CRASHED
    return UNDECIDED


def final_loss_kind(kind: str) -> str:
    """The verdict once the wait for the GCS is over: an undecided loss counts as the evaluator's own."""
    return CRASHED if kind == UNDECIDED else kind


def start_decision(
    min_actors: int,
    num_actors: int,
    ready: int,
    constructing: int,
    elapsed_s: float,
    grace_s: float,
    timeout_s: float,
) -> str:
    """Whether the pool may start: START_GO once all `num_actors` are ready, or once at least `min_actors` are,
    none is still being constructed (evaluators placed on a node are waited for) and the grace for the rest to be
    placed (`grace_s` after the start) is over; START_FAIL when fewer than `min_actors` are ready after
    `timeout_s` (past it, what is ready goes); else START_WAIT. Evaluators not ready at START_GO join later."""
    if ready >= num_actors or (ready >= min_actors and elapsed_s >= grace_s and constructing == 0):
        return START_GO
    if elapsed_s >= timeout_s:
        return START_FAIL if ready < min_actors else START_GO
    return START_WAIT


def concurrency(num_actors: int, live: int) -> int:
    """Candidates in flight for a pool of `live` evaluators: one each, at least one (a trial may wait for the
    pool to grow), at most `num_actors` (the optimiser's fixed ask/tell order is built for that many)."""
    return min(num_actors, max(1, live))
