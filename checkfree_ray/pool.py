"""Stage actors in a placement group, plus warm standby actors for fast replacement.

The group has one bundle per stage and one per standby (`pipeline.standby_actors` when
`pipeline.warm_standby`), SPREAD across nodes when there are several. A replacement or new standby
takes any bundle with room (`bundle_index=-1`); when a node is gone Ray reschedules its bundles on the
nodes left.

Standbys are started without waiting: each is created with a ping already submitted, and `take`
hands out the first one whose warm-up step has finished (its process is up, torch imported and
exercised). The pool is refilled asynchronously right after each recovery, so a recovery never waits
for a process to start unless every standby is still starting.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from checkfree_ray.checkpoint_store import storage_env
from checkfree_ray.model import ModelConfig
from checkfree_ray.stage import DirectStageActor, StageActor
from rayops.resources import check_placeable
from schemas.errors import RecoveryError
from schemas.train import TrainSpec

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120.0


def _adopt_driver_storage_env(worker: object, env: dict[str, str]) -> None:
    """Run on a stage actor (`__ray_call__`): take the driver's storage settings and keys into its environment,
    in place of its node's credentials (`storage.forward_credentials`). The values are never logged."""
    os.environ.update(env)


class StagePool:
    """Creates stage actors (cold, or from the warm standby) and tears them all down at the end."""

    def __init__(self, spec: TrainSpec, cfg: ModelConfig, direct_transport: bool = False):
        self.spec, self.cfg = spec, cfg
        # Ray Direct Transport needs actors created with it enabled (which also runs their calls on a
        # background thread), so only a run that may use it gets such actors.
        self.actor_class = DirectStageActor if direct_transport else StageActor
        pipe = spec.pipeline
        self.num_standbys = pipe.standby_actors if pipe.warm_standby else 0
        gpus = {"GPU": pipe.num_gpus_per_stage} if pipe.num_gpus_per_stage > 0 else {}
        bundles = [
            {"CPU": pipe.num_cpus_per_stage, **gpus} for _ in range(pipe.num_stages + self.num_standbys)
        ]
        check_placeable(
            bundles,
            "the pipeline's placement group (stages and standbys)",
            "`pipeline.num_cpus_per_stage` or `pipeline.standby_actors`",
            pipe.placement,
        )
        self.group = placement_group(bundles, strategy=pipe.placement)
        try:
            ray.get(self.group.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            need = sum(b["CPU"] for b in bundles)
            raise RecoveryError(
                f"the placement group of {len(bundles)} bundles ({need} CPUs in all) was not placed within "
                f"{READY_TIMEOUT_S:.0f}s; lower `pipeline.num_cpus_per_stage` or `pipeline.standby_actors`, turn "
                "off `pipeline.warm_standby` or add nodes"
            ) from None
        self.created: list = []
        self.credential_calls: list[
            ray.ObjectRef
        ] = []  # `storage.forward_credentials`: each actor's env update
        self.standbys: list[tuple[object, ray.ObjectRef]] = []  # (actor, its first ping)

    def new_actor(self, bundle_index: int = -1):
        """Start a stage actor process (cold); returns at once, the process starts in the background."""
        actor = self.actor_class.options(
            num_cpus=self.spec.pipeline.num_cpus_per_stage,
            num_gpus=self.spec.pipeline.num_gpus_per_stage,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=bundle_index
            ),
        ).remote(
            self.cfg,
            self.spec.optim.grad_clip,
            self.spec.optim.weight_decay,
            self.spec.pipeline.torch_threads,
            num_gpus=self.spec.pipeline.num_gpus_per_stage,
            precision=self.spec.pipeline.precision,
        )
        self.created.append(actor)
        if self.spec.storage.forward_credentials:  # submitted first: runs before any other call of the actor
            self.credential_calls.append(
                actor.__ray_call__.remote(_adopt_driver_storage_env, storage_env(forward_credentials=True))
            )
        return actor

    def start_stages(self) -> list:
        """One actor per stage in its own bundle, waited for; then the standbys (not waited for)."""
        stages = self.spec.pipeline.num_stages
        actors = [self.new_actor(i) for i in range(stages)]
        ray.get([a.ping.remote() for a in actors], timeout=READY_TIMEOUT_S)
        for k in range(self.num_standbys):
            self._add_standby(bundle_index=stages + k)
        return actors

    def _add_standby(self, bundle_index: int = -1) -> None:
        actor = self.new_actor(bundle_index)
        self.standbys.append((actor, actor.warm_up.remote()))  # ready once its first step has run

    def refill_standby(self) -> None:
        """Start standbys (without waiting) until there are `pipeline.standby_actors` of them."""
        while len(self.standbys) < self.num_standbys:
            self._add_standby()

    def wait_standbys(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Block until every standby is up (or `timeout_s` passes); returns how many are up."""
        pings = [ping for _, ping in self.standbys]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s) if pings else ([], [])
        return len(ready)

    def has_ready_standby(self) -> bool:
        """Whether a standby has finished its warm-up (a hand-off or recovery would then not wait for a process)."""
        pings = [ping for _, ping in self.standbys]
        return bool(pings) and bool(ray.wait(pings, num_returns=1, timeout=0)[0])

    def take(self, avoid_nodes: frozenset[str] = frozenset()) -> tuple[object, bool]:
        """An actor for a lost stage and whether it is a standby (warm).

        The caller refills the pool (`refill_standby`) once the recovery is done, so that new processes
        starting do not compete for the cores with the recovery itself.

        The first standby that is up; when none is up yet, the first to come up (a standby that is
        starting is never slower than a new process); with no standby, a new actor. Standbys on `avoid_nodes`
        (draining nodes) are killed, never handed out.
        """
        actor, warm = None, False
        while self.standbys and actor is None:
            pings = [ping for _, ping in self.standbys]
            ready, _ = ray.wait(pings, num_returns=1, timeout=0)
            if not ready:
                log.info("no standby is up yet; waiting for the first of %d to start", len(pings))
                ready, _ = ray.wait(pings, num_returns=1, timeout=READY_TIMEOUT_S)
            if not ready:
                break
            index = pings.index(ready[0])
            candidate, ping = self.standbys.pop(index)
            try:
                info = ray.get(ping, timeout=READY_TIMEOUT_S)  # already answered: ray.wait returned it
                if info["node_id"] in avoid_nodes:
                    ray.kill(candidate, no_restart=True)
                    continue
                actor, warm = candidate, True
            except ray.exceptions.RayActorError:
                log.warning("a warm standby died too; trying the next")
        if actor is None:
            actor, warm = self.new_actor(), False
        return actor, warm

    def shutdown(self) -> None:
        """Kill every actor this pool started and remove the placement group."""
        for actor in self.created:
            ray.kill(actor, no_restart=True)
        time.sleep(0.05)
        remove_placement_group(self.group)
