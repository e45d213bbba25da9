"""A preemption notice on a real multi-node cluster (run as a script; prints `RESULT <json>`).

`python -m tests.drain_demo` (from the repository root) starts a 3-node local cluster (`ray.cluster_utils.Cluster`:
a head and two worker nodes, each its own raylet) and trains a tiny 2-stage CheckFree+ model twice: once without a
notice (the twin), then again while, before step 3, the worker node that hosts a stage is drained with Ray's own CLI
(`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 30`) and, before step 5, killed
at that deadline. It prints both runs' losses, the failure records, what Ray reported as draining, and the nodes the
stages ended on. It starts and stops its own cluster, so run it in a fresh process (the test does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import ray
from ray.cluster_utils import Cluster

from checkfree_ray.executor import PipelineExecutor
from rayops.draining import gcs_draining_nodes
from rayops.local_head import RAY_CLI, ray_env
from rayops.session import apply_local_ray_env
from schemas.train import TrainSpec

DEADLINE_S = 30
NOTICE_STEP, KILL_STEP, STEPS = 3, 5, 6


def demo_spec(watch: bool) -> TrainSpec:
    """2 stages (d=32) and one warm standby, a quarter CPU each, so SPREAD puts each on its own node."""
    return TrainSpec.model_validate(
        {
            "steps": STEPS,
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 2,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.25,
                "warm_standby": True,
                "standby_actors": 1,
            },
            "recovery": {"strategy": "checkfree+", "drain_poll_s": 0.5 if watch else None},
        }
    )


def train(executor: PipelineExecutor) -> list[float]:
    """Run every step; returns the losses."""
    executor.start()
    step = 1
    while step <= STEPS:
        step = executor.run_step(step)
    return list(executor.history.losses)


def main() -> dict:
    """Run the twin, then the run with the notice; returns what it prints."""
    apply_local_ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    handles = {node.node_id: node for node in [cluster.add_node(num_cpus=1) for _ in range(2)]}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    events: dict = {}
    try:
        twin = PipelineExecutor(demo_spec(watch=False))
        try:
            twin_losses = train(twin)
        finally:
            twin.shutdown()
        executor = PipelineExecutor(demo_spec(watch=True))

        def notice_then_kill(ex: PipelineExecutor, step: int) -> None:
            if step == NOTICE_STEP and "node" not in events:
                nodes = [ray.get(a.ping.remote(), timeout=60)["node_id"] for a in ex.actors]
                stage = next(i for i, n in enumerate(nodes) if n in handles)
                command = [
                    RAY_CLI,
                    "drain-node",
                    f"--address={cluster.address}",
                    f"--node-id={nodes[stage]}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message=spot notice",
                    f"--deadline-remaining-seconds={DEADLINE_S}",
                ]
                subprocess.run(command, check=True, timeout=120, env=ray_env(), capture_output=True)
                events.update(
                    stage=stage,
                    node=nodes[stage],
                    deadline=time.monotonic() + DEADLINE_S,
                    reported=gcs_draining_nodes(),
                )
            if step == KILL_STEP and "node" in events and "killed_at_step" not in events:
                time.sleep(
                    max(0.0, events["deadline"] - time.monotonic())
                )  # the cloud takes it at the deadline
                cluster.remove_node(handles[events["node"]], allow_graceful=False)
                events["killed_at_step"] = step

        executor.before_step.insert(0, notice_then_kill)  # ahead of the drain watcher's look
        try:
            losses = train(executor)
            nodes_after = [ray.get(a.ping.remote(), timeout=60)["node_id"] for a in executor.actors]
            failures = [f.model_dump() for f in executor.history.failures]
        finally:
            executor.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    events.pop("deadline", None)
    return {
        "twin_losses": twin_losses,
        "losses": losses,
        "failures": failures,
        "nodes_after": nodes_after,
        **events,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()), flush=True)
    sys.exit(0)
