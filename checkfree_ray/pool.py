"""Stage actors in a placement group, plus a warm standby actor for fast replacement.

The group has one bundle per stage (and one for the standby), SPREAD across nodes when there are
several. A replacement or new standby takes any bundle with room (`bundle_index=-1`); when a node is
gone Ray reschedules its bundles on the nodes left.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from checkfree_ray.model import ModelConfig
from checkfree_ray.stage import StageActor
from schemas.errors import RecoveryError
from schemas.train import TrainSpec

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120.0


class StagePool:
    """Creates stage actors (cold, or from the warm standby) and tears them all down at the end."""

    def __init__(self, spec: TrainSpec, cfg: ModelConfig):
        self.spec, self.cfg = spec, cfg
        pipe = spec.pipeline
        bundles = [{"CPU": pipe.num_cpus_per_stage} for _ in range(pipe.num_stages + int(pipe.warm_standby))]
        self.group = placement_group(bundles, strategy=pipe.placement)
        try:
            ray.get(self.group.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            need = sum(b["CPU"] for b in bundles)
            raise RecoveryError(
                f"the placement group of {len(bundles)} bundles ({need} CPUs in all) was not placed within "
                f"{READY_TIMEOUT_S:.0f}s; lower `pipeline.num_cpus_per_stage`, turn off `pipeline.warm_standby` "
                "or add nodes"
            ) from None
        self.created: list = []
        self.standby = None

    def new_actor(self, bundle_index: int = -1):
        """Start a stage actor process (cold)."""
        actor = StageActor.options(
            num_cpus=self.spec.pipeline.num_cpus_per_stage,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=bundle_index
            ),
        ).remote(self.cfg, self.spec.optim.grad_clip, self.spec.optim.weight_decay, self.spec.pipeline.torch_threads)
        self.created.append(actor)
        return actor

    def start_stages(self) -> list:
        """One actor per stage in its own bundle, waited for; then the standby (not waited for)."""
        actors = [self.new_actor(i) for i in range(self.spec.pipeline.num_stages)]
        ray.get([a.ping.remote() for a in actors], timeout=READY_TIMEOUT_S)
        self.refill_standby(bundle_index=self.spec.pipeline.num_stages)
        return actors

    def refill_standby(self, bundle_index: int = -1) -> None:
        """Start a new standby if warm standby is on and there is none."""
        if self.spec.pipeline.warm_standby and self.standby is None:
            self.standby = self.new_actor(bundle_index)

    def take(self) -> tuple[object, bool]:
        """An actor for a lost stage: the standby when it is alive (warm=True), else a new one."""
        actor, self.standby = self.standby, None
        if actor is not None:
            try:
                ray.get(actor.ping.remote(), timeout=READY_TIMEOUT_S)
                return actor, True
            except ray.exceptions.RayActorError:
                log.warning("the warm standby died too; starting a cold actor")
        return self.new_actor(), False

    def shutdown(self) -> None:
        """Kill every actor this pool started and remove the placement group."""
        for actor in self.created:
            ray.kill(actor, no_restart=True)
        time.sleep(0.05)
        remove_placement_group(self.group)
