"""How tensors travel between stage actors: Ray's object store, or Ray Direct Transport (RDT).

RDT (`@ray.method(tensor_transport=...)`, alpha in Ray 2.60) keeps a returned torch tensor in the producing
actor and sends it straight to the consuming actor over a collective group: NCCL between GPUs, gloo between
CPU processes. The object store stays the default and the fallback.

What Ray 2.60's RDT does that shapes this module (measured with gloo on CPU):
- the actors must first join one collective group (`ray.experimental.collective.create_collective_group`);
  a replacement actor means a new group, so the group is formed again after every recovery (`connect`). Ray's
  gloo backend cannot do that (it makes torch's default process group once per process and builds every group
  inside it), so a gloo run falls back to the object store at its first recovery; NCCL groups (Ray's NCCLGroup,
  which needs cupy) are made per group and are formed again, untested here for lack of a GPU;
- the driver cannot `ray.get` an RDT value of a two-sided transport (ValueError), so a hop whose value the
  driver reads (the loss, the last backward, which returns None) always goes through the object store;
- when a transfer fails because its producer died, Ray kills the consumer too and destroys the group: under
  RDT a stage lost mid-step can take a neighbour with it (then CheckFree sees adjacent losses and rolls back
  to a checkpoint). So 'auto' picks NCCL only for strategies that restart the whole model on a loss anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import ray

from checkfree_ray.liveness import StageLost, unanswering
from checkfree_ray.timeouts import GROUP_TIMEOUT_S, PING_TIMEOUT_S

log = logging.getLogger(__name__)
OBJECT_STORE, NCCL, GLOO = "object_store", "nccl", "gloo"
DIRECT = (NCCL, GLOO)
# 'auto' uses NCCL only where a lost stage costs the whole model anyway (see the module docstring).
NCCL_AUTO_STRATEGIES = ("none", "checkpoint")


def select_transport(
    requested: str, num_gpus_per_stage: float, stages_have_nccl: Sequence[bool], strategy: str
) -> tuple[str, str]:
    """The transport a run uses and why: (`object_store` | `nccl` | `gloo`, reason in words).

    'auto' is NCCL when every stage has a GPU with NCCL and the strategy restarts the whole model on a loss
    (`NCCL_AUTO_STRATEGIES`); else the object store. An explicit 'nccl' whose stages lack NCCL falls back.
    """
    if requested == OBJECT_STORE:
        return OBJECT_STORE, "asked for (`pipeline.activation_transport`)"
    if requested == GLOO:
        return GLOO, "asked for (`pipeline.activation_transport`)"
    every_nccl = num_gpus_per_stage > 0 and bool(stages_have_nccl) and all(stages_have_nccl)
    if requested == NCCL:
        if every_nccl:
            return NCCL, "asked for (`pipeline.activation_transport`)"
        return OBJECT_STORE, "'nccl' was asked for but not every stage process has CUDA with NCCL"
    if requested != "auto":
        raise ValueError(
            f"unknown `pipeline.activation_transport` {requested!r}; use auto, object_store, nccl or gloo"
        )
    if not every_nccl:
        return OBJECT_STORE, "'auto' on stages without GPUs with NCCL"
    if strategy not in NCCL_AUTO_STRATEGIES:
        return OBJECT_STORE, (
            f"'auto' with `recovery.strategy` {strategy!r}: a stage lost during a Ray Direct "
            "Transport transfer takes its neighbour with it; set 'nccl' to use it anyway"
        )
    return NCCL, "'auto' on GPU stages with NCCL"


def may_be_direct(spec) -> bool:
    """Whether `spec`'s run may use RDT (its stage actors must then be created with it enabled)."""
    pipe = spec.pipeline
    assumed = [pipe.num_gpus_per_stage > 0] * pipe.num_stages  # confirmed by the stages at start
    name, _ = select_transport(
        pipe.activation_transport, pipe.num_gpus_per_stage, assumed, spec.recovery.strategy
    )
    return name in DIRECT


def open_transport(spec, actors: Sequence, timeout_s: float) -> Transport:
    """The run's transport, from what the stage processes have (`select_transport`), said once in the log, with
    its collective group formed (a group that cannot be formed falls back to the object store)."""
    pipe = spec.pipeline
    pings = ray.get([a.ping.remote() for a in actors], timeout=timeout_s)
    name, reason = select_transport(
        pipe.activation_transport,
        pipe.num_gpus_per_stage,
        [bool(p.get("nccl")) for p in pings],
        spec.recovery.strategy,
    )
    fell_back = pipe.activation_transport not in ("auto", name)
    (log.warning if fell_back else log.info)("activation transport: %s (%s)", name, reason)
    transport = Transport(name)
    transport.connect(actors)
    return transport


class Transport:
    """The run's transport: submits stage calls with or without RDT and keeps the collective group current."""

    def __init__(self, name: str = OBJECT_STORE):
        self.name = name
        self.group: str | None = None
        self.members: list = []

    @property
    def direct(self) -> bool:
        """Whether tensors go through RDT."""
        return self.name in DIRECT

    def fall_back(self, reason: str) -> None:
        """Use the object store from now on; said once in the log."""
        if self.direct:
            log.warning("activation transport: %s; falling back to Ray's object store", reason)
        self.name, self.group, self.members = OBJECT_STORE, None, []

    def connect(self, actors: Sequence, timeout_s: float = GROUP_TIMEOUT_S) -> None:
        """Make `actors` (in stage order) the collective group, unless they already are (bounded; a group that
        cannot be made within `timeout_s` means falling back to the object store).

        Every member must answer a ping first: a dead one raises its `RayActorError` (the caller recovers it), since
        the live members would otherwise wait in the group's rendezvous for a rank that never comes."""
        if not self.direct or self.connected(actors):
            return
        from ray.experimental.collective import create_collective_group, destroy_collective_group

        if self.group is not None and self.name == GLOO:
            self.fall_back(
                "Ray 2.60's gloo backend cannot put the surviving stages in a new group with a "
                "replacement (torch's default process group is made once per process)"
            )
            return
        ray.get([a.ping.remote() for a in actors], timeout=timeout_s)
        if self.group is not None:  # the old group names an actor that is gone (Ray may have destroyed it)
            _bounded(
                lambda: destroy_collective_group(self.group),
                timeout_s,
                swallow=(ValueError, ray.exceptions.RayError),
            )
        self.group, self.members = None, []
        created = _bounded(lambda: create_collective_group(list(actors), backend=self.name), timeout_s)
        if isinstance(created, BaseException) or created is None:
            self.fall_back(
                f"the {self.name} collective group of {len(actors)} stages could not be made ({created!r})"
            )
            return
        self.group, self.members = created.name, list(actors)

    def connected(self, actors: Sequence) -> bool:
        """Whether our group exists (Ray destroys it after a failed transfer) and holds exactly `actors`."""
        from ray.experimental.collective import get_collective_groups

        if self.group is None or [a._actor_id for a in actors] != [a._actor_id for a in self.members]:
            return False
        return any(group.name == self.group for group in get_collective_groups(list(actors), self.name))

    def submit(self, actor, method: str, direct: bool, *args, **kwargs) -> ray.ObjectRef:
        """Call `actor.method(*args, **kwargs)`; its returned tensors travel by RDT when `direct` (the caller's
        promise that the value goes to another stage, never to the driver) and the run's transport is direct."""
        bound = getattr(actor, method)
        if direct and self.direct:
            return bound.options(tensor_transport=self.name).remote(*args, as_tensor=True, **kwargs)
        return bound.remote(*args, **kwargs)


def _bounded(call, timeout_s: float, swallow: tuple[type[BaseException], ...] = (Exception,)):
    """Run `call` in a thread and wait at most `timeout_s` (Ray's group calls wait without a bound); returns its
    value, the exception it raised (of `swallow`), or a TimeoutError."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except swallow as exc:  # reported to the caller, which falls back
            box["value"] = exc

    thread = threading.Thread(target=run, daemon=True, name="collective-group")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return TimeoutError(f"no answer within {timeout_s:.0f}s")
    return box.get("value")


def connect_or_lose(transport: Transport, actors: Sequence, timeout_s: float) -> None:
    """`transport.connect(actors)` before a step; a stage found dead or silent meanwhile (Ray Direct Transport
    kills both ends of a failed transfer) raises `StageLost` in phase 'before_step', so that it is recovered."""
    try:
        transport.connect(actors, timeout_s=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        dead, silent = unanswering(list(actors), min(PING_TIMEOUT_S, timeout_s))
        for stage in silent:
            ray.kill(actors[stage], no_restart=True)
        if not dead + silent:
            raise
        raise StageLost(dead + silent, "before_step", reasons=dict.fromkeys(silent, "timeout")) from None
