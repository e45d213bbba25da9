"""Every wait of the CheckFree engine that is not a spec field, in one place: what it bounds and why this long.

Waits a user tunes are spec fields (`recovery.step_timeout_s`, `recovery.node_wait_s`, `recovery.drain_poll_s`);
these are the engine's own bounds.
"""

from __future__ import annotations

# Stage actors (checkfree_ray/pool.py). Shorter than an LCSC evaluator's start (no sampler or feature network
# to build); a node that never comes is bounded by `recovery.node_wait_s` instead.
READY_TIMEOUT_S = 120.0  # a stage actor answers its first ping within this
PING_TIMEOUT_S = 30.0  # a live stage answers a ping within this (liveness.py: dead or silent past it)
FETCH_TIMEOUT_S = 10.0  # fetching a finished call's value (a large activation on a loaded node)

# Steps (checkfree_ray/executor.py): the default of `recovery.step_timeout_s` is
# max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_FACTOR x the median step), FIRST_STEP_TIMEOUT_S before any is measured
STEP_TIMEOUT_FLOOR_S = 30.0
STEP_TIMEOUT_FACTOR = 10.0
FIRST_STEP_TIMEOUT_S = 300.0

# State moves
CONFIGURE_TIMEOUT_S = 120.0  # every stage takes its initial state or its checkpoint shard
SAVE_TIMEOUT_S = 120.0  # a checkpoint's shards are written (saving.py)
CONNECT_TIMEOUT_S = 120.0  # the stages open their activation transport when the pipeline starts
GROUP_TIMEOUT_S = 60.0  # a collective group is formed again after a recovery (transport.py)
