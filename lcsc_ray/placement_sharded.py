"""The `sharded` placement: shard s of every checkpoint in the object store of one node, combined there.

The flat vector is cut into one shard per node, balanced by bytes, at tensor boundaries where one lies near the
balanced cut (a tensor larger than a share is cut inside). Each shard of each checkpoint is made by a Ray task
that reads it from storage (`read_shard`), not by `ray.put`: when its node is lost, Ray rebuilds the shard from
lineage by running that task again. A combination is one task per shard (`combine_shard`), placed on the node
holding the shard (soft affinity: elsewhere when that node is gone) and returning the combined float32 shard; the
evaluator copies each into its own buffer as it arrives, so it holds about one model plus one shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lcsc_ray.combine import check_non_float_equal, combine_flat
from lcsc_ray.layout import Layout, as_tensor
from lcsc_ray.placement import Weights
from lcsc_ray.placement_files import local_file, read_flat
from lcsc_ray.timeouts import FETCH_TIMEOUT_S

TASK_RETRIES = (
    5  # a combination or shard task lost with its node runs again (its inputs rebuilt from lineage)
)


def shard_bounds(layout: Layout, count: int) -> list[tuple[int, int]]:
    """`count` [start, stop) ranges covering the flat vector, about equal in size; each cut moves to the nearest
    tensor boundary within an eighth of a share, else stays inside the tensor."""
    count = max(1, min(count, layout.numel))
    share = layout.numel / count
    boundaries = np.asarray([*layout.offsets, layout.numel], dtype=np.int64)
    cuts = [0]
    for index in range(1, count):
        ideal = round(index * share)
        nearest = int(boundaries[np.abs(boundaries - ideal).argmin()])
        cut = nearest if abs(nearest - ideal) <= share / 8 else ideal
        if cut > cuts[-1]:
            cuts.append(cut)
    cuts.append(layout.numel)
    return [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]


def _segment(layout: Layout, lo: int, hi: int) -> Layout:
    """The layout of [lo, hi): the parts of its tensors, flat, for the integer/bool checks and copies."""
    names, shapes, dtypes, offsets = [], [], [], []
    for name, shape, dtype, offset in zip(layout.names, layout.shapes, layout.dtypes, layout.offsets):
        numel = int(torch.Size(shape).numel())
        start, stop = max(lo, offset), min(hi, offset + numel)
        if start < stop:
            names.append(name)
            shapes.append((stop - start,))
            dtypes.append(dtype)
            offsets.append(start - lo)
    return Layout(names, shapes, dtypes, offsets, hi - lo, layout.storage_dtype)


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES)
def read_shard(uri: str, key: str | None, layout: Layout, lo: int, hi: int, field: str) -> np.ndarray:
    """Values [lo, hi) of one checkpoint's flat array, read from storage (a local file, or this node's cached
    copy of an S3 object) tensor by tensor."""
    return _as_array(read_flat(local_file(uri, field), uri, key, layout, lo, hi))


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES)
def check_shard(segment: Layout, names: list[str], *arrays: np.ndarray) -> int:
    """Integer and bool tensors equal in every checkpoint within one shard; returns the shard's bytes."""
    check_non_float_equal(segment, arrays, names)
    return sum(a.nbytes for a in arrays)


@ray.remote(num_cpus=0, max_retries=TASK_RETRIES)
def combine_shard(segment: Layout, coefficients: list[float], *arrays: np.ndarray) -> np.ndarray:
    """The combined float32 shard: the same sum, in the same order per element, as `combine_flat` over the
    whole arrays."""
    out = torch.empty(segment.numel, dtype=torch.float32)
    combine_flat(out, [as_tensor(a) for a in arrays], coefficients, segment)
    return out.numpy()


def _on(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node, soft=True)


@dataclass
class ShardedWeights(Weights):
    """`sharded`: shards[s][k] is shard s of checkpoint k, made on node nodes[s]; bounds[s] its flat range."""

    shards: list[list]
    bounds: list[tuple[int, int]]
    nodes: list[str]
    layout: Layout
    mode = "sharded"

    def __len__(self) -> int:
        return len(self.shards[0]) if self.shards else 0

    def combine_into(self, out: torch.Tensor, coefficients: Sequence[float], start: bool = True) -> dict:
        if not start:
            raise ValueError("sharded weights start a combination; add further weights after them")
        alphas = [float(a) for a in coefficients]
        pending = {
            combine_shard.options(scheduling_strategy=_on(node)).remote(
                _segment(self.layout, lo, hi), alphas, *refs
            ): (lo, hi)
            for refs, (lo, hi), node in zip(self.shards, self.bounds, self.nodes)
        }
        moved = 0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=FETCH_TIMEOUT_S)
            if not done:
                raise TimeoutError(f"no combined shard arrived within {FETCH_TIMEOUT_S:.0f} s")
            lo, hi = pending.pop(done[0])
            shard = ray.get(done[0], timeout=FETCH_TIMEOUT_S)
            out[lo:hi].copy_(as_tensor(shard))  # a read-only object-store view
            moved += shard.nbytes
            del shard
        item = 2 if self.layout.storage_dtype == "bfloat16" else 4
        return {"read_bytes": len(self) * self.layout.numel * item, "moved_bytes": moved}

    def info(self) -> dict:
        return {**super().info(), "shards": len(self.shards), "nodes": list(self.nodes)}


def place_sharded(
    uris: list[str],
    names: list[str],
    key: str | None,
    layout: Layout,
    nodes: list[str],
    field: str = "checkpoints.uri",
) -> ShardedWeights:
    """Read every checkpoint into shards, shard s on nodes[s], one checkpoint at a time (bounded memory), then
    check the integer and bool tensors of each shard across the set (on its node)."""
    bounds = shard_bounds(layout, len(nodes))
    nodes = nodes[: len(bounds)]
    shards: list[list] = [[] for _ in bounds]
    for uri in uris:
        made = [
            read_shard.options(scheduling_strategy=_on(node)).remote(uri, key, layout, lo, hi, field)
            for (lo, hi), node in zip(bounds, nodes)
        ]
        ray.wait(made, num_returns=len(made), timeout=FETCH_TIMEOUT_S, fetch_local=False)
        for column, ref in zip(shards, made):
            column.append(ref)
    checks = [
        check_shard.options(scheduling_strategy=_on(node)).remote(_segment(layout, lo, hi), names, *refs)
        for refs, (lo, hi), node in zip(shards, bounds, nodes)
    ]
    ray.get(checks, timeout=FETCH_TIMEOUT_S)  # raises a shard's error (a bad file) here, before the search
    return ShardedWeights(shards, bounds, nodes, layout)
