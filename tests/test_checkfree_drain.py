"""Preemption notices in CheckFree: the draining-node watcher, the deadline decision, and the exact hand-off of a
stage to a standby between two steps (real Ray actors; the drain itself comes from an injected state source)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from checkfree_ray import draining
from checkfree_ray.draining import copy_estimate_s, decide, stage_state_bytes
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, build_parts
from rayops.draining import DrainWatcher
from schemas.train import TrainSpec

pytestmark = pytest.mark.timeout(300)
DOOMED = "draining-node"  # the injected id of the node that drains


def drain_spec(
    strategy: str = "checkfree+",
    schedule=(),
    poll: float | None = 0.01,
    standby: bool = True,
    stages: int = 2,
) -> TrainSpec:
    """A d=32 model of one layer per stage, 2 micro-batches of 2x16 bytes, one warm standby."""
    return TrainSpec.model_validate(
        {
            "steps": 4,
            "eval_every": 4,
            "eval_batches": 1,
            "model": {"d_model": 32, "n_layers": stages, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": stages,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": standby,
                "standby_actors": 1,
            },
            "optim": {"lr": 3e-3},
            "recovery": {"strategy": strategy, "drain_poll_s": poll},
            "failures": {"schedule": [list(item) for item in schedule]},
        }
    )


# ----- pure logic ---------------------------------------------------------------------------------------------
def test_watcher_asks_at_most_once_per_interval_and_keeps_last_answer_on_error():
    """The source is called once per interval (forced looks excepted); a failing look keeps the last answer."""
    now, calls, answers = [0.0], [], [{"a": 5}, TimeoutError("gcs"), {"b": 7}]

    def source():
        calls.append(now[0])
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    watcher = DrainWatcher(source, poll_every_s=2.0, clock=lambda: now[0])
    assert watcher.poll() == {"a": 5}
    now[0] = 1.9
    assert watcher.poll() == {"a": 5} and len(calls) == 1  # cached: no second GCS call within the interval
    now[0] = 2.0
    assert watcher.poll() == {"a": 5} and len(calls) == 2  # the failed look keeps the last answer
    assert watcher.poll(force=True) == {"b": 7} and len(calls) == 3


def test_decide_compares_deadline_with_twice_the_estimated_copy():
    """100 MB at 50 MB/s warm: 3 s; hand off with 7.5 s left, not with 6.5 s; no deadline (0) always hands off."""
    nbytes, rate, now = 100_000_000, 50e6, 1_000_000.0
    assert copy_estimate_s(nbytes, rate, warm=True) == pytest.approx(3.0)
    assert copy_estimate_s(nbytes, rate, warm=False) == pytest.approx(3.0 + draining.COLD_START_S)
    yes = decide(int(now + 7500), now, nbytes, rate, warm=True)
    no = decide(int(now + 6500), now, nbytes, rate, warm=True)
    assert (yes.handoff, yes.reason, yes.remaining_s) == (True, "drain", pytest.approx(7.5))
    assert (no.handoff, no.reason) == (False, "drain_deadline_short")
    assert not decide(
        int(now + 7500), now, nbytes, rate, warm=False
    ).handoff  # a cold actor would not make it
    assert decide(0, now, 10**12, rate, warm=False).handoff  # no deadline


def test_stage_state_bytes_counts_weights_and_both_adam_moments():
    """3 x 4 bytes per parameter of exactly the parts each stage holds (embedding first, head last)."""
    cfg = ModelConfig.from_spec(drain_spec(stages=4).model, 4)
    parts = build_parts(cfg, 0)
    count = [sum(p.numel() for p in module.parameters()) for module in parts.stages]
    count[0] += sum(p.numel() for p in parts.embedding.parameters())
    count[3] += sum(p.numel() for p in parts.head.parameters())
    assert [stage_state_bytes(cfg, i) for i in range(4)] == [12 * n for n in count]
    assert count[0] != count[1]


def test_watching_drains_is_not_part_of_the_run_identity():
    """`recovery.drain_poll_s` changes no result, so it leaves the spec's fingerprint entries (and resumes) alone."""
    from checkfree_ray.run_identity import spec_inputs

    watched, unwatched = drain_spec(poll=5.0), drain_spec(poll=None)
    assert spec_inputs(watched) == spec_inputs(unwatched)
    assert spec_inputs(watched) != spec_inputs(drain_spec("checkfree", poll=5.0))


# ----- on Ray ---------------------------------------------------------------------------------------------------
@pytest.fixture
def executor_for(ray_local):
    made = []

    def make(spec: TrainSpec) -> PipelineExecutor:
        executor = PipelineExecutor(spec)
        made.append(executor)
        executor.start()
        return executor

    yield make
    for executor in made:
        executor.shutdown()


def inject_drain(executor: PipelineExecutor, stage: int, from_step: int, remaining_s: float) -> dict:
    """Make `stage`'s current actor sit on a node that starts draining before `from_step`, with `remaining_s` left."""
    doomed = executor.actors[stage]._actor_id
    state = {"step": 0, "deadline_ms": int(time.time() * 1000 + remaining_s * 1000)}
    executor.drain.watcher.source = lambda: (
        {DOOMED: state["deadline_ms"]} if state["step"] >= from_step else {}
    )
    executor.drain.locate = lambda actors: [DOOMED if a._actor_id == doomed else "alive" for a in actors]
    executor.before_step.insert(0, lambda ex, step: state.update(step=step))
    return state


def run(executor: PipelineExecutor, last: int) -> None:
    step = 1
    while step <= last:
        step = executor.run_step(step)


def test_handoff_on_notice_is_exact_and_losses_equal_the_no_notice_twin(executor_for):
    """CheckFree+: stage 1's node drains before step 3: it moves (weights, Adam, the embedding copy it holds) to the
    standby, and every loss and final weight equals those of the same run without a notice."""
    twin = executor_for(drain_spec(poll=None, standby=False))
    run(twin, 4)
    twin_losses, twin_states = list(twin.history.losses), twin.stage_states()
    twin.shutdown()  # frees its CPUs and processes for the run with the notice
    executor = executor_for(drain_spec())
    old = executor.actors[1]
    inject_drain(executor, stage=1, from_step=3, remaining_s=60.0)
    run(executor, 4)
    assert executor.history.losses == twin_losses  # exact on CPU: nothing lost, nothing changed
    assert executor.history.steps == [1, 2, 3, 4]
    records = [(f.step, f.stage, f.method, f.reason, f.warm_standby) for f in executor.history.failures]
    assert records == [(3, 1, "handoff", "drain", True)]
    assert executor.actors[1]._actor_id != old._actor_id
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(old.ping.remote(), timeout=30)  # the drained actor was stopped
    for got, want in zip(executor.stage_states(), twin_states):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_short_deadline_falls_back_to_recovery_and_says_why(executor_for):
    """A deadline shorter than the copy needs: no hand-off; the node dies at step 3 and CheckFree recovers the
    middle stage, recorded with reason 'drain_deadline_short'."""
    executor = executor_for(drain_spec("checkfree", schedule=[(3, 1)], stages=3))
    inject_drain(executor, stage=1, from_step=2, remaining_s=1.5)
    run(executor, 4)
    records = [(f.step, f.stage, f.method, f.reason) for f in executor.history.failures]
    assert records == [(3, 1, "checkfree", "drain_deadline_short")]


def test_stage_dying_mid_handoff_is_recovered_as_handoff_failed(executor_for):
    """The draining stage dies while its state is read for the hand-off: the old actor stays in place, the step
    finds it dead, CheckFree rebuilds it and the record says 'drain_handoff_failed'."""
    executor = executor_for(drain_spec("checkfree", stages=3))
    ray.get(executor.actors[1].arm_fault.remote("get_state"), timeout=30)
    inject_drain(executor, stage=1, from_step=3, remaining_s=60.0)
    run(executor, 4)
    records = [(f.step, f.stage, f.method, f.reason) for f in executor.history.failures]
    assert records == [(3, 1, "checkfree", "drain_handoff_failed")]
    assert executor.history.steps == [1, 2, 3, 4]


# `extended`: a drained stage handed off before its node is killed is, in `make test`, test_checkfree_spot_e2e.py
# (on the autoscaling cluster); the hand-off's exactness against the no-notice twin is the fast test above.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
def test_drain_node_on_a_local_cluster_hands_off_before_the_node_is_killed():
    """`ray drain-node` (preemption, 30 s deadline) on the node of a stage, the node killed at the deadline: the
    stage was handed off before, no step is lost and the losses equal the no-notice twin's (`tests/drain_demo.py`)."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.drain_demo"],
        cwd=Path(__file__).parent.parent,
        check=False,
        capture_output=True,
        text=True,
        timeout=580,
        env=env,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    report = json.loads(line[len("RESULT ") :])
    assert report["reported"][report["node"]] > 0  # Ray reported the node as draining, with a deadline
    assert report["killed_at_step"] == 5
    assert [(f["stage"], f["method"], f["reason"]) for f in report["failures"]] == [
        (report["stage"], "handoff", "drain")
    ]
    assert report["failures"][0]["step"] < 5  # handed off before the node was killed
    assert report["losses"] == report["twin_losses"] and len(report["losses"]) == 6
    assert report["node"] not in report["nodes_after"]
