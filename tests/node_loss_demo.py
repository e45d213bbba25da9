"""Survive a node removed from a multi-node `ray.cluster_utils.Cluster` (run as a script; prints JSON).

`python -m tests.node_loss_demo OUT_DIR` (from the repository root) starts a 3-node local cluster, trains a tiny model over 4
stage actors spread across the nodes, removes the worker node that hosts a middle stage at step 3, and
prints the run's steps and failure records. It starts and stops its own cluster, so run it in a fresh
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


def main(out_dir: str) -> dict:
    """Run the demo; returns what it prints."""
    apply_local_ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    spec = TrainSpec.model_validate({
        "steps": 6, "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
        "pipeline": {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 2, "num_cpus_per_stage": 0.25},
        "recovery": {"strategy": "checkfree"}, "checkpointing": {"every": 1},
    })
    executor = PipelineExecutor(spec, checkpoint_uri=f"{out_dir}/ckpt")
    removed: dict = {}

    def remove_node(ex: PipelineExecutor, step: int) -> None:
        if step != 3:
            return
        nodes = [ray.get(a.ping.remote())["node_id"] for a in ex.actors]
        by_id = {w.node_id: w for w in workers}
        for stage in range(1, ex.S - 1):  # prefer a middle stage whose neighbours live elsewhere
            if nodes[stage] in by_id and nodes[stage] not in (nodes[stage - 1], nodes[stage + 1]):
                break
        else:
            stage = next(i for i, n in enumerate(nodes) if n in by_id)
        removed.update(stage=stage, node=nodes[stage], stages_on_node=[i for i, n in enumerate(nodes)
                                                                         if n == nodes[stage]])
        cluster.remove_node(by_id[nodes[stage]])

    executor.before_step.append(remove_node)
    try:
        executor.start()
        step = 1
        while step <= spec.steps:
            step = executor.run_step(step)
        report = {"steps": executor.history.steps, "removed": removed,
                  "failures": [f.model_dump() for f in executor.history.failures],
                  "nodes_after": [ray.get(a.ping.remote())["node_id"] for a in executor.actors]}
    finally:
        executor.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return report


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
