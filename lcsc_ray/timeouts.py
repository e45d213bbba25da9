"""Every wait of the LCSC engine that is not a spec field, in one place: what it bounds and why this long.

Waits a user tunes are spec fields (`evaluators.evaluation_timeout_s`, `evaluators.max_replacements`); these are
the engine's own bounds, sized for loaded 2-core machines where a process start can take tens of seconds.
"""

from __future__ import annotations

# Evaluator actors (lcsc_ray/evaluator_slots.py)
READY_TIMEOUT_S = (
    300.0  # an evaluator actor is constructed (process, torch import, model, sampler) within this
)
START_GRACE_S = 30.0  # past this, the pool starts with the evaluators constructed (at least `min_actors`)
NODE_LOSS_WAIT_S = 90.0  # a killed node is declared dead by the GCS's health checks within this
HAND_BACK_MARGIN_S = 5.0  # a drained evaluator hands its candidate back this long before the deadline
DRAIN_POLL_S = 2.0  # seconds between looks at the draining nodes (a spot notice gives about 120 s)

# Evaluations (lcsc_ray/evaluation_records.py): later ones are bounded by the spec's timeout or the timed ones
FIRST_TIMEOUT_S = 900.0  # the first evaluation, before any is timed

# Checkpoint weights (lcsc_ray/placement.py, placement_sharded.py)
FETCH_TIMEOUT_S = (
    600.0  # fetching weights from the object store (a node holding them may be gone and rebuilt)
)
