"""The search's cluster timeline: evaluators alive and evaluations done against the cluster's nodes
(`rayops.cluster_timeline`), recorded while the search runs; it goes into result.json and cluster_timeline.png
when the cluster's nodes changed."""

from __future__ import annotations

import time

import ray

from rayops.cluster_timeline import ClusterTimeline

POLL_S = 2.0  # one look at the GCS and one at the pool service this often


class PoolCounters:
    """The live pool size and the evaluations done, read from the search's pool service (one call per look)."""

    def __init__(self, run):
        self.run = run  # a SearchRun: its pool exists once started
        self._state: dict = {}
        self._at = float("-inf")

    def _read(self) -> dict:
        if self.run.pool is not None and time.monotonic() - self._at > POLL_S / 2:
            self._state, self._at = self.run.pool.state(), time.monotonic()
        return self._state

    def live(self) -> int:
        """Evaluators in service now."""
        return int(self._read().get("live", 0))

    def evaluated(self) -> int:
        """Evaluations done so far (candidates, rungs and final scores)."""
        return int(self._read().get("evaluated", 0))


def start_timeline(run) -> ClusterTimeline:
    """Start recording the cluster of this driver's Ray beside the search `run`."""
    counters = PoolCounters(run)
    timeline = ClusterTimeline(
        ray.get_runtime_context().gcs_address,
        counters.live,
        counters.evaluated,
        labels=("evaluators alive", "evaluations done"),
        poll_s=POLL_S,
    )
    return timeline.start()
