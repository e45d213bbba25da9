"""Stage actors in a placement group, plus warm standby actors for fast replacement.

The group has one bundle per stage and one per standby (`pipeline.standby_actors` when
`pipeline.warm_standby`), SPREAD across nodes when there are several. A replacement or new standby
takes any bundle with room (`bundle_index=-1`); when a node is gone Ray reschedules its bundles on the
nodes left.

`pipeline.node_resources` and `pipeline.node_labels` put every bundle on a node type that has them (the spot
workers of cluster/aws-spot.yaml); on an autoscaling cluster a bundle that finds no such node is the demand that
makes the autoscaler launch one. Every wait for a node (the first placement, a replacement, a hand-off's new
actor) is bounded by `recovery.node_wait_s`, past which `NodeWaitTimeout` stops the run (resumable). A hand-off
whose pool has no standby off the draining nodes gets its actor in a one-bundle placement group of its own, which
Ray never places on a draining node: room on a live node, or a node launched for it.

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
from checkfree_ray.timeouts import READY_TIMEOUT_S
from rayops.resources import check_placeable, cluster_autoscales
from schemas.errors import InfeasibleResourcesError, RecoveryError
from schemas.train import TrainSpec

log = logging.getLogger(__name__)


def _adopt_driver_storage_env(worker: object, env: dict[str, str]) -> None:
    """Run on a stage actor (`__ray_call__`): take the driver's storage settings and keys into its environment,
    in place of its node's credentials (`storage.forward_credentials`). The values are never logged."""
    os.environ.update(env)


class NodeWaitTimeout(RecoveryError):
    """A replacement waited `recovery.node_wait_s` for a node and got none; the run stops and a rerun resumes it."""


def stage_bundle(spec: TrainSpec) -> dict[str, float]:
    """One stage's placement-group bundle: its CPUs, GPUs and `pipeline.node_resources`."""
    pipe = spec.pipeline
    gpus = {"GPU": pipe.num_gpus_per_stage} if pipe.num_gpus_per_stage > 0 else {}
    return {"CPU": pipe.num_cpus_per_stage, **gpus, **pipe.node_resources}


def check_labels_present(labels: dict[str, str]) -> None:
    """On a cluster that does not grow, refuse `pipeline.node_labels` that no alive node has (Ray would wait
    forever); on an autoscaling cluster such nodes may be launched."""
    if not labels or cluster_autoscales():
        return
    nodes = [node.get("Labels") or {} for node in ray.nodes() if node.get("Alive")]
    if not any(all(node.get(k) == v for k, v in labels.items()) for node in nodes):
        raise InfeasibleResourcesError(
            f"no node of this cluster has the labels {labels} that `pipeline.node_labels` asks for, and it does "
            "not grow; empty `pipeline.node_labels`, or start nodes with `ray start --labels`",
            source="pipeline.node_labels",
        )


class StagePool:
    """Creates stage actors (cold, or from the warm standby) and tears them all down at the end."""

    def __init__(self, spec: TrainSpec, cfg: ModelConfig, direct_transport: bool = False):
        self.spec, self.cfg = spec, cfg
        # Ray Direct Transport needs actors created with it enabled (which also runs their calls on a
        # background thread), so only a run that may use it gets such actors.
        self.actor_class = DirectStageActor if direct_transport else StageActor
        pipe = spec.pipeline
        self.node_wait_s = spec.recovery.node_wait_s
        self.num_standbys = pipe.standby_actors if pipe.warm_standby else 0
        bundles = [stage_bundle(spec) for _ in range(pipe.num_stages + self.num_standbys)]
        check_placeable(
            bundles,
            "the pipeline's placement group (stages and standbys)",
            "`pipeline.num_cpus_per_stage`, `pipeline.node_resources` or `pipeline.standby_actors`",
            pipe.placement,
        )
        check_labels_present(pipe.node_labels)
        self.group = self._placement_group(bundles, pipe.placement)
        wait_s = max(READY_TIMEOUT_S, self.node_wait_s)
        try:
            ray.get(self.group.ready(), timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            need = sum(b["CPU"] for b in bundles)
            raise RecoveryError(
                f"the placement group of {len(bundles)} bundles ({need} CPUs in all"
                f"{', labels ' + str(pipe.node_labels) if pipe.node_labels else ''}) was not placed within "
                f"{wait_s:.0f}s; lower `pipeline.num_cpus_per_stage` or `pipeline.standby_actors`, turn off "
                "`pipeline.warm_standby`, add nodes, or raise `recovery.node_wait_s` for an autoscaler to launch them"
            ) from None
        self.spare_groups: dict[
            str, object
        ] = {}  # actor id -> its one-bundle group (`take` with `own_bundle`)
        self.nodes: dict[str, str] = {}  # actor id (hex) -> the node it was seen on
        self.created: list = []
        self.credential_calls: list[
            ray.ObjectRef
        ] = []  # `storage.forward_credentials`: each actor's env update
        self.standbys: list[tuple[object, ray.ObjectRef]] = []  # (actor, its first ping)

    def _placement_group(self, bundles: list[dict[str, float]], strategy: str):
        labels = self.spec.pipeline.node_labels
        selector = [dict(labels) for _ in bundles] if labels else None
        return placement_group(bundles, strategy=strategy, bundle_label_selector=selector)

    def new_actor(self, bundle_index: int = -1, group=None):
        """Start a stage actor process (cold) in a bundle of `group` (the pool's); returns at once, the process
        starts in the background (once a node has room for its bundle)."""
        actor = self.actor_class.options(
            num_cpus=self.spec.pipeline.num_cpus_per_stage,
            num_gpus=self.spec.pipeline.num_gpus_per_stage,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group or self.group, placement_group_bundle_index=bundle_index
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
        infos = ray.get([a.ping.remote() for a in actors], timeout=READY_TIMEOUT_S)
        for actor, info in zip(actors, infos):
            self.note_node(actor, info)
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

    def start_spares(self, needed: int) -> None:
        """Start standbys at once until `needed` are up or starting, each new one in a one-bundle group of its own
        (placed off draining nodes, or on a node the autoscaler launches for it), so that the hand-offs of several
        stages of a draining node do not wait for one process start after another. `trim_standbys` releases
        those left unused."""
        while len(self.standbys) < needed:
            actor = self._cold_actor(own_bundle=True)
            self.standbys.append((actor, actor.warm_up.remote()))

    def trim_standbys(self) -> None:
        """Release the standbys beyond `pipeline.standby_actors` (spares a hand-off did not use), newest first."""
        while len(self.standbys) > self.num_standbys:
            actor, _ = self.standbys.pop()
            self.release(actor)

    def has_standby(self) -> bool:
        """Whether a standby is up or starting (a hand-off takes the first to come up)."""
        return bool(self.standbys)

    def wait_standbys(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Block until every standby is up (or `timeout_s` passes); returns how many are up."""
        pings = [ping for _, ping in self.standbys]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s) if pings else ([], [])
        return len(ready)

    def note_node(self, actor, info: dict) -> None:
        """Remember the node `actor` answered from (`info`: its ping)."""
        self.nodes[actor._actor_id.hex()] = info["node_id"]

    def node_of(self, actor) -> str | None:
        """The node `actor` was last seen on (None: it never answered a ping of the pool's)."""
        return self.nodes.get(actor._actor_id.hex())

    def take(
        self,
        avoid_nodes: frozenset[str] = frozenset(),
        own_bundle: bool = False,
        wait_s: float | None = None,
    ) -> tuple[object, bool]:
        """An actor for a lost stage and whether it is a standby (warm).

        The caller refills the pool (`refill_standby`) once the recovery is done, so that new processes
        starting do not compete for the cores with the recovery itself.

        The first standby that is up; when none is up yet, the first to come up within `recovery.node_wait_s` (a
        standby that is starting is never slower than a new process, and one waiting for a node waits for the same
        node a new actor would); with no standby, a new actor: in a bundle of the pool's group (a lost node's
        bundles are placed again on a live node with room, or on one the autoscaler launches), or with
        `own_bundle` (a hand-off off draining nodes) in a one-bundle group of its own. Standbys on `avoid_nodes`
        (draining nodes) are killed, never handed out. `wait_s` (default `recovery.node_wait_s`) bounds the wait
        for a standby still starting.
        """
        actor, warm = None, False
        wait_s = self.node_wait_s if wait_s is None else wait_s
        while self.standbys and actor is None:
            pings = [ping for _, ping in self.standbys]
            ready, _ = ray.wait(pings, num_returns=1, timeout=0)
            if not ready and wait_s > 0:
                log.info("no standby is up yet; waiting for the first of %d to start", len(pings))
                ready, _ = ray.wait(pings, num_returns=1, timeout=wait_s)
            if not ready:
                break
            index = pings.index(ready[0])
            candidate, ping = self.standbys.pop(index)
            try:
                info = ray.get(ping, timeout=READY_TIMEOUT_S)  # already answered: ray.wait returned it
                self.note_node(candidate, info)
                if info["node_id"] in avoid_nodes:
                    ray.kill(candidate, no_restart=True)
                    continue
                actor, warm = candidate, True
            except ray.exceptions.RayActorError:
                log.warning("a warm standby died too; trying the next")
        if actor is None:
            actor, warm = self._cold_actor(own_bundle), False
        return actor, warm

    def _cold_actor(self, own_bundle: bool):
        if not own_bundle:
            return self.new_actor()
        group = self._placement_group([stage_bundle(self.spec)], "PACK")
        actor = self.new_actor(0, group)
        self.spare_groups[actor._actor_id.hex()] = group
        return actor

    def release(self, actor) -> None:
        """Kill `actor` for good, with the one-bundle group it may have had (so no node is launched for it)."""
        ray.kill(actor, no_restart=True)
        group = self.spare_groups.pop(actor._actor_id.hex(), None)
        if group is not None:
            remove_placement_group(group)

    def shutdown(self) -> None:
        """Kill every actor this pool started and remove the placement group."""
        for actor in self.created:
            ray.kill(actor, no_restart=True)
        time.sleep(0.05)
        for group in [self.group, *self.spare_groups.values()]:
            remove_placement_group(group)
        self.spare_groups = {}
