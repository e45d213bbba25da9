"""Survive a node removed from a multi-node `ray.cluster_utils.Cluster` (run as a script; prints JSON).

`python -m tests.node_loss_demo OUT_DIR [SEED]` (from the repository root) starts a 3-node local cluster, trains a
tiny model over 4 stage actors spread across the nodes, removes the worker node that hosts a middle stage at step
3 (with SEED: step 2 + SEED % 3, the model and data from SEED), and prints the run's steps (which were rolled
back), failure records, and the actors and placement groups left alive after the executor shut down. It starts and stops its own cluster, so run it in a fresh
process (the tests do), never next to another Ray in the same process.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from checkfree_ray.executor import PipelineExecutor
from rayops.session import apply_local_ray_env
from schemas.train import TrainSpec


def leftovers(wait_s: float = 60.0) -> dict:
    """Actors alive and placement groups not removed on the connected Ray, after a bounded wait for cleanup."""
    import time

    from ray._private import state

    deadline = time.monotonic() + wait_s
    while True:
        alive = len(state.actors(actor_state_name="ALIVE"))
        groups = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
        if (alive == 0 and groups == 0) or time.monotonic() > deadline:
            return {"leaked_actors": alive, "leaked_placement_groups": groups}
        time.sleep(0.5)


def main(out_dir: str, seed: int | None = None) -> dict:
    """Run the demo; returns what it prints."""
    apply_local_ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    remove_at = 3 if seed is None else 2 + seed % 3
    spec = TrainSpec.model_validate(
        {
            "steps": 6,
            "seed": seed or 0,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.25,
            },
            "recovery": {"strategy": "checkfree"},
            "checkpointing": {"every": 1},
        }
    )
    executor = PipelineExecutor(spec, checkpoint_uri=f"{out_dir}/ckpt")
    removed: dict = {}

    def remove_node(ex: PipelineExecutor, step: int) -> None:
        if step != remove_at or removed:
            return
        nodes = [ray.get(a.ping.remote(), timeout=60)["node_id"] for a in ex.actors]
        by_id = {w.node_id: w for w in workers}
        for stage in range(1, ex.S - 1):  # prefer a middle stage whose neighbours live elsewhere
            if nodes[stage] in by_id and nodes[stage] not in (nodes[stage - 1], nodes[stage + 1]):
                break
        else:
            stage = next(i for i, n in enumerate(nodes) if n in by_id)
        removed.update(
            stage=stage,
            node=nodes[stage],
            stages_on_node=[i for i, n in enumerate(nodes) if n == nodes[stage]],
        )
        cluster.remove_node(by_id[nodes[stage]])

    executor.before_step.append(remove_node)
    try:
        executor.start()
        step = 1
        while step <= spec.steps:
            step = executor.run_step(step)
        h = executor.history
        report = {
            "steps": h.steps,
            "rolled_back": h.rolled_back + [False] * (len(h.steps) - len(h.rolled_back)),
            "expected_steps": spec.steps,
            "removed": removed,
            "failures": [f.model_dump() for f in h.failures],
            "nodes_after": [ray.get(a.ping.remote(), timeout=60)["node_id"] for a in executor.actors],
        }
    finally:
        executor.shutdown()
        try:
            left = leftovers()
        finally:
            ray.shutdown()
            cluster.shutdown()
    return {**report, **left}


if __name__ == "__main__":
    print(
        "RESULT " + json.dumps(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)), flush=True
    )
