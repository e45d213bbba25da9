"""The training run's cluster timeline: stages alive and steps done against the cluster's nodes
(`rayops.cluster_timeline`), recorded while the run trains; it goes into result.json and cluster_timeline.png
when the cluster's nodes changed."""

from __future__ import annotations

import ray

from rayops.cluster_timeline import ClusterTimeline

POLL_S = 2.0  # one look at the GCS this often
TIMELINE_FILE = "cluster_timeline.png"  # only when the cluster's nodes changed during the run


def stages_alive(num_stages: int, node_events: list[dict]) -> int:
    """Stages in service: all of them, less those lost and not yet rebuilt or handed off (from the run's node
    events, in order)."""
    down: set[int] = set()
    for event in node_events:
        stage = event.get("stage")
        if event.get("kind") == "stage_lost":
            down.add(stage)
        elif event.get("kind") in ("stage_rebuilt", "handoff"):
            down.discard(stage)
    return num_stages - len(down)


def start_training_timeline(executor) -> ClusterTimeline:
    """Start recording the cluster of this driver's Ray beside the run of `executor` (a PipelineExecutor)."""
    history, num_stages = executor.history, executor.spec.pipeline.num_stages
    timeline = ClusterTimeline(
        ray.get_runtime_context().gcs_address,
        lambda: stages_alive(num_stages, list(history.node_events)),
        lambda: (history.steps or [0])[-1],
        labels=("stages alive", "steps done"),
        poll_s=POLL_S,
    )
    return timeline.start()
