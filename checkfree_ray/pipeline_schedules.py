"""Pipeline schedules: the order in which one step's forward and backward hops are submitted.

Ray runs an actor's calls in the order one caller submits them, so a schedule is just that order: a list of
ops `(kind, micro_batch, hop)`, each submitted after the op it consumes (the previous hop's forward, the next
hop's backward). A route (`recovery_rules.route`) gives each micro-batch's hops as (stage, parts); CheckFree+
routes visit some stages twice, so everything here works on hops, not on stage numbers.

- GPipe (Huang et al., 2019): every forward of every micro-batch, then every backward. A stage holds the
  activations of all M micro-batches at the turn.
- 1F1B (PipeDream-Flush, Narayanan et al., 2021, Fig. 4): stage s runs S-s-1 warm-up forwards, then alternates
  one forward and one backward, then cools down with the remaining backwards; it holds the activations of at
  most S-s micro-batches. Here that order comes out of a small list-scheduling simulation (a backward first
  when one is ready, a forward only while the stage holds fewer than S-s micro-batches), which gives exactly
  the textbook order on plain routes and a valid, deadlock-free order on CheckFree+'s swapped routes.

Every stage accumulates its gradients over the micro-batches in the same order (0, 1, ...) under both
schedules, so the two give the same losses and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

Op = tuple[str, int, int]  # ("forward" | "backward", micro_batch, hop)
Route = Sequence[tuple[int, tuple[str, ...]]]  # hops of one micro-batch: (stage, parts)
SCHEDULES = ("gpipe", "1f1b")
# Relative costs in the simulation (a backward is about twice a forward); they only shape the interleaving.
FORWARD_COST, BACKWARD_COST = 1, 2


def _chain(route: Route) -> list[tuple[str, int]]:
    """One micro-batch's ops in dependency order: forwards hop 0..H-1, then backwards H-1..0."""
    hops = range(len(route))
    return [("forward", h) for h in hops] + [("backward", h) for h in reversed(hops)]


def gpipe_order(routes: Sequence[Route]) -> list[Op]:
    """GPipe: every forward (micro-batch by micro-batch), then every backward."""
    forwards = [("forward", mb, hop) for mb, route in enumerate(routes) for hop in range(len(route))]
    backwards = [
        ("backward", mb, hop) for mb, route in enumerate(routes) for hop in reversed(range(len(route)))
    ]
    return forwards + backwards


def one_f_one_b_order(routes: Sequence[Route], num_stages: int) -> list[Op]:
    """1F1B: ops in the start order of a list-scheduling simulation in which stage s admits a new micro-batch
    only while it holds fewer than S-s (the oldest unfinished micro-batch is always admitted: no deadlock)."""
    chains = [_chain(route) for route in routes]
    position = [0] * len(routes)  # next op of each micro-batch
    ready_at = [0] * len(routes)  # when that op's input is ready
    busy_until = [0] * num_stages
    held: list[set[int]] = [set() for _ in range(num_stages)]  # micro-batches with activations on the stage
    pending = [_pending_per_stage(route, num_stages) for route in routes]  # ops left per (micro-batch, stage)
    order: list[Op] = []
    time, total = 0, sum(len(chain) for chain in chains)
    while len(order) < total:
        for stage in range(num_stages):
            if busy_until[stage] > time:
                continue
            mb = _pick(stage, time, chains, routes, position, ready_at, held, pending, num_stages)
            if mb is None:
                continue
            kind, hop = chains[mb][position[mb]]
            order.append((kind, mb, hop))
            held[stage].add(mb)
            pending[mb][stage] -= 1
            if pending[mb][stage] == 0:
                held[stage].discard(mb)  # its last backward here: the activations are freed
            busy_until[stage] = time + (FORWARD_COST if kind == "forward" else BACKWARD_COST)
            position[mb] += 1
            ready_at[mb] = busy_until[stage]
        time += 1
    return order


def _pending_per_stage(route: Route, num_stages: int) -> list[int]:
    counts = [0] * num_stages
    for stage, _parts in route:
        counts[stage] += 2  # one forward and one backward per hop
    return counts


def _pick(
    stage: int, time: int, chains, routes, position, ready_at, held, pending, num_stages: int
) -> int | None:
    """The micro-batch whose next op this stage runs now: a ready backward first (oldest first), else the
    oldest ready forward the stage may admit."""
    ready = [
        mb
        for mb in range(len(chains))
        if position[mb] < len(chains[mb])
        and ready_at[mb] <= time
        and routes[mb][chains[mb][position[mb]][1]][0] == stage
    ]
    backwards = [mb for mb in ready if chains[mb][position[mb]][0] == "backward"]
    if backwards:
        return backwards[0]
    oldest = min((mb for mb in range(len(chains)) if pending[mb][stage] > 0), default=None)
    for mb in ready:
        if mb in held[stage] or len(held[stage]) < num_stages - stage or mb == oldest:
            return mb
    return None


def step_order(schedule: str, routes: Sequence[Route], num_stages: int) -> list[Op]:
    """The submission order of one training step under `schedule` ('gpipe' or '1f1b')."""
    if schedule == "gpipe":
        return gpipe_order(routes)
    if schedule == "1f1b":
        return one_f_one_b_order(routes, num_stages)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {SCHEDULES}")


def peak_held(order: Sequence[Op], routes: Sequence[Route], num_stages: int) -> list[int]:
    """Per stage, the most micro-batches whose activations it holds at once when it runs `order`."""
    live: list[dict[int, int]] = [{} for _ in range(num_stages)]  # stage -> micro-batch -> cached hops
    peak = [0] * num_stages
    for kind, mb, hop in order:
        stage = routes[mb][hop][0]
        entries = live[stage].get(mb, 0) + (1 if kind == "forward" else -1)
        if entries:
            live[stage][mb] = entries
        else:
            live[stage].pop(mb, None)
        peak[stage] = max(peak[stage], len(live[stage]))
    return peak
