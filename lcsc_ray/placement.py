"""Where a checkpoint set is kept, and the one question an evaluator asks of it: the combined weights of a candidate.

Placement modes (`checkpoints.placement`):
- `node`: each checkpoint is one flat array `ray.put` once; every evaluator node maps the whole set zero-copy.
- `sharded` (`placement_sharded`): the flat vector is cut into shards; shard s of every checkpoint lives on one
  node, and a combination is one task per shard there, the evaluator gathering the combined shards.
- `stream` (`placement_stream`): nothing in the object store; the evaluator combines window by window from the
  memory-mapped safetensors files.
`auto` picks `node` when the set fits every node's object store, else `sharded` when the cluster's object stores
hold it, else `stream` (`choose`). Every mode sums the same terms in the same order per element (`accumulate`), so
the combined weights are the same bit for bit. A `Weights` object is what the driver hands to the evaluators
(picklable); `open` prepares it in the evaluator's process, then `combine_into` writes a candidate into the
evaluator's own buffer and says how many bytes it read and moved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lcsc_ray.combine import combine_flat
from lcsc_ray.layout import Layout, as_tensor
from lcsc_ray.placement_files import local_file
from lcsc_ray.placement_stream import combine_files
from lcsc_ray.timeouts import FETCH_TIMEOUT_S
from schemas.errors import CheckpointError

log = logging.getLogger(__name__)
HEADROOM = 0.9  # the share of an object store a set may take (samples, statistics and Tune need the rest)


@dataclass(frozen=True)
class Choice:
    """The placement a set got, and why (logged, and kept with the set)."""

    mode: str
    reason: str


def choose(
    requested: str, need_bytes: int, node_stores: Sequence[int], safetensors: bool, headroom: float = HEADROOM
) -> Choice:
    """The placement of a set of `need_bytes` on nodes whose object stores offer `node_stores` bytes each."""
    gib = 1024**3
    smallest, total = (min(node_stores) if node_stores else 0), sum(node_stores)
    sizes = f"the set needs {need_bytes / gib:.2f} GiB; the smallest node's object store offers {smallest / gib:.2f} GiB, all {len(node_stores)} nodes' {total / gib:.2f} GiB"
    if requested != "auto":
        return Choice(requested, f"`checkpoints.placement: {requested}` ({sizes})")
    if need_bytes <= headroom * smallest:
        return Choice("node", f"auto: it fits every node's object store ({sizes})")
    if not safetensors:
        return Choice("node", f"auto: only safetensors sets can be sharded or streamed ({sizes})")
    if need_bytes <= headroom * total:
        return Choice("sharded", f"auto: too big for one node, the cluster's object stores hold it ({sizes})")
    return Choice(
        "stream", f"auto: too big for the cluster's object stores, streamed from the files ({sizes})"
    )


def _item(values: Sequence[np.ndarray | torch.Tensor]) -> int:
    return as_tensor(values[0]).element_size() if values else 4


class Weights:
    """A list of flat checkpoints of one layout, wherever they are kept (subclasses say where)."""

    mode = "?"
    layout: Layout

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, device: torch.device) -> None:
        """Prepare to combine into buffers on `device` (in the evaluator's process; idempotent)."""

    def combine_into(self, out: torch.Tensor, coefficients: Sequence[float], start: bool = True) -> dict:
        """Write sum_i coefficients[i] * checkpoint_i into `out` (`start` False: add to what `out` holds), integer
        and bool tensors copied from the last checkpoint. Returns {'read_bytes', 'moved_bytes'}: the bytes of
        checkpoints read, and those that crossed into this process from elsewhere (another node, a disk)."""
        raise NotImplementedError

    def info(self) -> dict:
        """Facts for tests and benchmarks."""
        return {"mode": self.mode, "num_checkpoints": len(self)}


@dataclass
class NodeWeights(Weights):
    """`node`: whole flat arrays in the object store (refs, or arrays already fetched), mapped zero-copy."""

    refs: list
    layout: Layout
    mode = "node"
    arrays: list = field(default_factory=list, repr=False)
    sources: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict:
        return {"refs": self.refs, "layout": self.layout, "arrays": [], "sources": []}

    def open(self, device: torch.device) -> None:
        if self.sources or not self.refs:
            return
        import ray

        pending = [i for i, ref in enumerate(self.refs) if isinstance(ref, ray.ObjectRef)]
        fetched = dict(zip(pending, ray.get([self.refs[i] for i in pending], timeout=FETCH_TIMEOUT_S)))
        self.arrays = [fetched.get(i, ref) for i, ref in enumerate(self.refs)]  # read-only object-store views
        self.sources = device_sources(self.arrays, device)

    def combine_into(self, out: torch.Tensor, coefficients: Sequence[float], start: bool = True) -> dict:
        self.open(out.device)
        combine_flat(out, self.sources, coefficients, self.layout, start=start)
        return {"read_bytes": len(self.sources) * out.numel() * _item(self.sources), "moved_bytes": 0}

    def info(self) -> dict:
        return {**super().info(), "writeable": [bool(a.flags.writeable) for a in self.arrays]}


def device_sources(arrays: list, device: torch.device) -> list[torch.Tensor]:
    """Checkpoints as tensors on `device` (a GPU copy once; the host stays zero-copy)."""
    tensors = [as_tensor(a) for a in arrays]
    if device.type == "cuda":
        try:
            return [t.to(device) for t in tensors]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()  # combine on the host, copying each chunk over instead
    return tensors


@dataclass
class StreamWeights(Weights):
    """`stream`: safetensors files, combined window by window from their memory maps (S3 files cached on disk,
    `placement_stream`); about two windows per checkpoint are mapped beside the output at a time."""

    uris: list[str]
    key: str | None
    layout: Layout
    field_name: str = "checkpoints.uri"
    mode = "stream"
    paths: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.uris)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "paths": []}

    def open(self, device: torch.device) -> None:
        if not self.paths:
            self.paths = [local_file(uri, self.field_name) for uri in self.uris]

    def combine_into(self, out: torch.Tensor, coefficients: Sequence[float], start: bool = True) -> dict:
        self.open(out.device)
        read = combine_files(
            out, self.paths, self.uris, self.key, self.layout, coefficients, start, self.field_name
        )
        return {"read_bytes": read, "moved_bytes": read}


@dataclass
class PlacedSet:
    """What every evaluator is built over: the checkpoints, the run's EMA and the extra weights (post-hoc EMA
    snapshots, combined after the checkpoints), each kept by its placement."""

    checkpoints: Weights
    ema: Weights | None = None
    extra: Weights | None = None
    choice: Choice | None = None

    @property
    def layout(self) -> Layout:
        return self.checkpoints.layout

    def open(self, device: torch.device) -> None:
        for weights in (self.checkpoints, self.ema, self.extra):
            if weights is not None:
                weights.open(device)

    def combine_into(self, out: torch.Tensor, coefficients: Sequence[float] | None) -> dict:
        """The candidate `coefficients` (None: the run's EMA) in `out`; the checkpoints first, then the extra
        weights when there is a coefficient for each (one sum, in the same order as one pass over all)."""
        if coefficients is None:
            if self.ema is None:
                raise CheckpointError("no EMA weights were loaded; set `checkpoints.ema_uri`")
            return self.ema.combine_into(out, [1.0])
        count = len(self.checkpoints)
        moved = self.checkpoints.combine_into(out, list(coefficients)[:count])
        if self.extra is not None and len(coefficients) > count:
            more = self.extra.combine_into(out, list(coefficients)[count:], start=False)
            moved = {key: moved[key] + more[key] for key in moved}
        return moved
