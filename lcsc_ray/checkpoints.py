"""Checkpoint sets for LCSC: list, read (.safetensors / torch), validate, flatten once, put in object store.

Each checkpoint file is read from storage exactly once; listing reads at most the safetensors header (a
ranged read) for the training step and the tensor sizes. Each checkpoint becomes ONE contiguous flat array
(float32, or bfloat16 stored as uint16 bits) that is `ray.put` once; evaluators read it zero-copy.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lcsc_ray import checkpoint_formats
from lcsc_ray.layout import STORAGE_DTYPES, Layout, as_tensor  # noqa: F401 - re-exported
from lcsc_ray.placement import HEADROOM, Choice, NodeWeights, PlacedSet, StreamWeights, Weights, choose
from lcsc_ray.placement_files import check_same_layout, header_layout, require_safetensors
from lcsc_ray.placement_sharded import place_sharded
from rayops import storage
from schemas.errors import CheckpointError, StorageError, StorageNotFoundError
from schemas.search import CheckpointSetSpec

log = logging.getLogger(__name__)
OBJECT_STORE_HEADROOM = HEADROOM  # keep 10% of the object store for samples, stats and Tune's own objects


# ------------------------------------------------------------------------------------------ reading


def _select_key(obj: object, key: str | None, uri: str) -> dict:
    if key is not None:
        for part in [key] if isinstance(obj, Mapping) and key in obj else key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"checkpoint {uri} has no key {key!r}; available keys: {keys}")
            obj = obj[part]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {uri} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {uri} is a dict of non-tensors ({not_tensors[:5]}); set `checkpoints.key` to the "
            f"entry holding the state dict, one of {sorted(map(str, obj))[:20]}"
        )
    return dict(obj)


def _load_safetensors(data: bytes, uri: str, key: str | None, field: str) -> dict[str, torch.Tensor]:
    state = checkpoint_formats.load_safetensors(data, uri, field)
    if key is None:
        return state
    prefix = key.rstrip(".") + "."
    selected = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
    if not selected:
        prefixes = sorted({name.split(".")[0] for name in state})
        raise CheckpointError(
            f"checkpoint {uri} has no key {key!r}; available top-level keys: {prefixes[:20]}"
        )
    return selected


def _check_finite(state: Mapping[str, torch.Tensor], uri: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"checkpoint {uri}: tensor {name!r} holds {bad} NaN/inf values; the training "
                "run diverged before this checkpoint, drop it from the set"
            )


def parse_state_dict(
    data: bytes, uri: str, key: str | None = None, field: str = "checkpoints.uri"
) -> dict[str, torch.Tensor]:
    """Parse checkpoint bytes (.safetensors by name, else a torch file) into a finite state dict; `field` is
    the spec field that names the file (quoted in errors)."""
    if uri.endswith(".safetensors"):
        state = _load_safetensors(data, uri, key, field)
    else:
        state = _select_key(checkpoint_formats.load_torch(data, uri, field), key, uri)
    _check_finite(state, uri)
    return state


def read_state_dict(
    uri: str, key: str | None = None, field: str = "checkpoints.uri"
) -> dict[str, torch.Tensor]:
    """Read one checkpoint (.safetensors, or torch with weights_only) from a local path, file:// or s3://."""
    try:
        data = storage.read_bytes(uri)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    return parse_state_dict(data, uri, key, field)


# ------------------------------------------------------------------------------------------ listing


@dataclass
class _Probe:
    step: int | None
    numel: int | None  # from the safetensors header; None for torch files
    file_size: int


def _name_step(uri: str) -> int | None:
    digits = re.findall(r"\d+", uri.rsplit("/", 1)[-1])
    return int(digits[-1]) if digits else None


def _probe(uri: str, key: str | None, field: str = "checkpoints.uri") -> _Probe:
    """Size, step and value count of one checkpoint, reading at most its safetensors header (bounded by the
    file's size and the format's header limit)."""
    try:
        size, _ = storage.stat(uri)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    step = _name_step(uri)
    if not uri.endswith(".safetensors"):
        return _Probe(step, None, size)
    try:
        length = checkpoint_formats.header_length(storage.read_range(uri, 0, 8), size, uri, field)
        raw = storage.read_range(uri, 8, length)
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    header = checkpoint_formats.parse_header(raw, size - 8 - length, uri, field)
    meta = header.get("__metadata__") or {}
    if str(meta.get("step", "")).isdigit():
        step = int(meta["step"])
    prefix = None if key is None else key.rstrip(".") + "."
    return _Probe(step, checkpoint_formats.numel_of(header, prefix), size)


def _spec_uris(spec: CheckpointSetSpec) -> list[str]:
    if spec.paths:
        return [p if "://" in p or os.path.isabs(p) else storage.join(spec.uri, p) for p in spec.paths]
    try:
        uris = storage.list_uris(spec.uri, spec.glob, recursive=False)  # the folder itself, not subfolders
    except StorageError as exc:
        raise CheckpointError(f"cannot list `checkpoints.uri` {spec.uri}: {exc}") from exc
    if not uris:
        raise CheckpointError(
            f"no checkpoints match {spec.glob!r} in {spec.uri} (subfolders are not searched); check "
            "`checkpoints.uri` and `checkpoints.glob`"
        )
    return uris


def _probe_all(spec: CheckpointSetSpec) -> list[tuple[str, _Probe]]:
    """The set in training order: explicit `paths` keep the order given; listed files are sorted by step,
    and a listed file without a step is refused (the order is never guessed)."""
    field = "checkpoints.paths" if spec.paths else "checkpoints.uri"
    if spec.format == "diffusers":  # an adapter lists the files and their steps; the rest is the same
        from lcsc_ray.diffusers_checkpoints import list_checkpoint_files

        probes = []
        for uri, step in list_checkpoint_files(spec):
            probe = _probe(uri, spec.key, field)
            probes.append((uri, _Probe(step, probe.numel, probe.file_size)))
        return probes[-spec.last :] if spec.last else probes
    probes = [(uri, _probe(uri, spec.key, field)) for uri in _spec_uris(spec)]
    if spec.paths:
        probes = [
            (uri, p if p.step is not None else _Probe(i, p.numel, p.file_size))
            for i, (uri, p) in enumerate(probes)
        ]
    else:
        unordered = [uri.rsplit("/", 1)[-1] for uri, p in probes if p.step is None]
        if unordered:
            raise CheckpointError(
                f"cannot order the checkpoints in {spec.uri}: {len(unordered)} file(s) have no training step "
                f"(no `step` in the safetensors metadata, no digits in the name): {unordered[:10]}; rename "
                "them with their step, narrow `checkpoints.glob`, or list the files in training order with "
                "`checkpoints.paths`"
            )
        probes.sort(key=lambda item: (item[1].step, item[0]))
    return probes[-spec.last :] if spec.last else probes


def checkpoint_name(uri: str) -> str:
    """How results name a checkpoint: its file name ('checkpoint-500/unet' for a diffusers folder)."""
    from lcsc_ray.diffusers_checkpoints import checkpoint_name as diffusers_name

    return diffusers_name(uri)


def ema_file(spec: CheckpointSetSpec) -> str | None:
    """The file of `ema_uri` (with format 'diffusers' it may name a model folder such as `unet_ema`)."""
    if spec.ema_uri is None or spec.format != "diffusers":
        return spec.ema_uri
    from lcsc_ray.diffusers_checkpoints import weights_file

    return weights_file(spec.ema_uri)


def list_checkpoints(spec: CheckpointSetSpec) -> list[tuple[str, int]]:
    """(uri, training step) of the set, ordered by step (safetensors metadata 'step', else the last digits of
    the file name; explicit `paths` keep their order), with `last` applied."""
    return [(uri, probe.step) for uri, probe in _probe_all(spec)]


# ------------------------------------------------------------------------------------ checkpoint set


@dataclass
class CheckpointSet:
    """A loaded set (ordered by step), the layout kept once, and where it is kept (`placement`). In `node`
    placement `refs` holds one object-store ref per checkpoint; `ema_ref` is the EMA's ref (`node`) or its
    placed weights (`sharded`, `stream`), None without an EMA."""

    uris: list[str]
    names: list[str]
    steps: list[int]
    layout: Layout
    refs: list = field(repr=False)  # list[ray.ObjectRef], each a flat array put once (`node` placement)
    ema_ref: object | None = field(default=None, repr=False)
    nbytes: int = 0  # bytes of the set (EMA included), wherever it is kept
    # further weights of the same layout that only some evaluations combine (post-hoc EMA snapshots): a job
    # with len(uris) + len(extra_refs) coefficients combines them all, a job with len(uris) only the checkpoints
    extra_refs: list = field(default_factory=list, repr=False)
    extra_names: list[str] = field(default_factory=list)
    placement: Weights | None = field(default=None, repr=False)  # None: `node` over `refs`
    choice: Choice | None = None

    def __len__(self) -> int:
        return len(self.uris)

    def placed(self) -> PlacedSet:
        """What the evaluators are built over: the checkpoints, the EMA and the extra weights, as placed."""
        checkpoints = self.placement or NodeWeights(list(self.refs), self.layout)
        ema = self.ema_ref
        if ema is not None and not isinstance(ema, Weights):
            ema = NodeWeights([ema], self.layout)
        extra = NodeWeights(list(self.extra_refs), self.layout) if self.extra_refs else None
        return PlacedSet(checkpoints, ema, extra, self.choice or Choice("node", "placed in the object store"))


def object_store_capacity() -> int:
    """Bytes of object store the running Ray cluster offers (available, else total)."""
    import ray

    if not ray.is_initialized():
        raise CheckpointError("Ray is not initialised; call ray.init (or rayops.session.ray_session) first")
    available = ray.available_resources().get("object_store_memory")
    return int(available if available else ray.cluster_resources().get("object_store_memory", 0))


def check_fits(need_bytes: int, capacity_bytes: int, num_checkpoints: int, storage_dtype: str) -> None:
    """Refuse a set that will not fit the object store, naming the sizes and the ways out."""
    if need_bytes <= OBJECT_STORE_HEADROOM * capacity_bytes:
        return
    gib = 1024**3
    options = [
        (
            "keep the set out of one node's object store with `checkpoints.placement: sharded` (the cluster's object "
            "stores together) or `stream` (read from the files, no object store)"
        ),
        "keep fewer checkpoints with `checkpoints.last`",
        (
            "start Ray with a bigger object store (`ray.object_store_memory`, or `ray start "
            "--object-store-memory`)"
        ),
    ]
    if storage_dtype == "float32":
        half = need_bytes / 2 / gib
        options.insert(0, f"bfloat16 storage (`checkpoints.storage_dtype: bfloat16`, {half:.2f} GiB)")
    raise CheckpointError(
        f"{num_checkpoints} checkpoints need {need_bytes / gib:.2f} GiB of object store as {storage_dtype}, "
        f"which offers {capacity_bytes / gib:.2f} GiB ({OBJECT_STORE_HEADROOM:.0%} usable); options: "
        + "; ".join(options)
    )


def _estimate_bytes(probes: list[_Probe], storage_dtype: str) -> int:
    itemsize = 4 if storage_dtype == "float32" else 2
    # safetensors headers give exact sizes; torch files are estimated as float32 payloads of their file size
    return sum(p.numel * itemsize if p.numel is not None else p.file_size * itemsize // 4 for p in probes)


def _put_checked(
    uri: str,
    key: str | None,
    layout: Layout | None,
    first_uri: str | None,
    storage_dtype: str,
    field: str = "checkpoints.uri",
):
    import ray

    state = read_state_dict(uri, key, field)
    if layout is None:
        layout = Layout.from_state_dict(state, storage_dtype)
    else:
        problem = layout.mismatch(state)
        if problem:
            raise CheckpointError(f"checkpoint {uri} does not match {first_uri}: {problem}")
    flat = layout.flatten(state)
    del state
    return ray.put(flat), layout


def node_object_stores() -> dict[str, int]:
    """Object-store bytes of each alive node of the running Ray cluster, by node id."""
    import ray

    return {
        node["NodeID"]: int(node["Resources"].get("object_store_memory", 0))
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("object_store_memory", 0) > 0
    }


def load_checkpoint_set(spec: CheckpointSetSpec) -> CheckpointSet:
    """List the set, choose its placement (`checkpoints.placement`, `placement.choose`) and place it: `node`
    reads each file once, validates it against the first, flattens and `ray.put`s it; `sharded` and `stream`
    read the safetensors headers here and the tensors where they are kept. Ray must be initialised."""
    capacity = object_store_capacity()
    probed = _probe_all(spec)
    ema_uri = ema_file(spec)
    ema_probe = [_probe(ema_uri, spec.ema_key or spec.key, "checkpoints.ema_uri")] if ema_uri else []
    need = _estimate_bytes([p for _, p in probed] + ema_probe, spec.storage_dtype)
    stores = node_object_stores()
    safetensors = all(uri.endswith(".safetensors") for uri, _ in probed) and (
        ema_uri is None or ema_uri.endswith(".safetensors")
    )
    choice = choose(spec.placement, need, list(stores.values()), safetensors)
    log.info("checkpoint placement %s: %s", choice.mode, choice.reason)
    if choice.mode == "node":  # every evaluator node maps the whole set: no node may be too small for it
        largest = max(stores.values(), default=capacity)
        return _load_node(spec, probed, ema_uri, need, min(capacity, largest), choice)
    field = "checkpoints.paths" if spec.paths else "checkpoints.uri"
    uris = [uri for uri, _ in probed]
    for uri in [*uris, *([ema_uri] if ema_uri else [])]:
        require_safetensors(uri, choice.mode)
    layout = header_layout(uris[0], spec.key, spec.storage_dtype, field)
    for uri in uris[1:]:
        check_same_layout(layout, header_layout(uri, spec.key, spec.storage_dtype, field), uri, uris[0])
    ema_key = spec.ema_key or spec.key
    if ema_uri:
        ema_layout = header_layout(ema_uri, ema_key, spec.storage_dtype, "checkpoints.ema_uri")
        check_same_layout(layout, ema_layout, ema_uri, uris[0])
    names = [checkpoint_name(uri) for uri in uris]
    if choice.mode == "sharded":
        if need > HEADROOM * sum(stores.values()):
            check_fits(need, sum(stores.values()), len(probed) + len(ema_probe), spec.storage_dtype)
        nodes = sorted(stores)
        placement: Weights = place_sharded(uris, names, spec.key, layout, nodes, field)
        ema = (
            place_sharded([ema_uri], ["ema"], ema_key, layout, nodes, "checkpoints.ema_uri")
            if ema_uri
            else None
        )
    else:
        placement = StreamWeights(uris, spec.key, layout, field)
        _check_stream(placement, names)
        ema = StreamWeights([ema_uri], ema_key, layout, "checkpoints.ema_uri") if ema_uri else None
    log.info(
        "checkpoint placement %s: %d checkpoints of %.1f MB; a combination reads %.1f MB and moves %.1f MB",
        choice.mode,
        len(uris),
        layout.nbytes / 1e6,
        layout.nbytes * len(uris) / 1e6,
        (layout.numel * 4 if choice.mode == "sharded" else layout.nbytes * len(uris)) / 1e6,
    )
    return CheckpointSet(
        uris=uris,
        names=names,
        steps=[probe.step for _, probe in probed],
        layout=layout,
        refs=[],
        ema_ref=ema,
        nbytes=layout.nbytes * (len(uris) + (ema_uri is not None)),
        placement=placement,
        choice=choice,
    )


def _check_stream(weights: StreamWeights, names: list[str]) -> None:
    """Read every file of a streamed set once, tensor by tensor: finite, integer and bool tensors equal."""
    from lcsc_ray.combine import check_non_float_equal, non_float_segments
    from lcsc_ray.placement_files import iter_tensors, local_file

    layout = weights.layout
    segments = {offset for _, offset, _ in non_float_segments(layout)}
    first: list[torch.Tensor] = []
    for index, uri in enumerate(weights.uris):
        parts = [
            part
            for offset, part in iter_tensors(local_file(uri, weights.field_name), uri, weights.key, layout)
            if offset in segments
        ]
        if index == 0:
            first = parts
        elif parts:
            check_non_float_equal(
                Layout(
                    [n for n, o in zip(layout.names, layout.offsets) if o in segments],
                    [(p.numel(),) for p in parts],
                    ["int64"] * len(parts),
                    list(np.cumsum([0] + [p.numel() for p in parts[:-1]])),
                    sum(p.numel() for p in parts),
                    layout.storage_dtype,
                ),
                [torch.cat(first), torch.cat(parts)],
                [names[0], names[index]],
            )


def _load_node(
    spec: CheckpointSetSpec, probed: list, ema_uri: str | None, need: int, capacity: int, choice: Choice
) -> CheckpointSet:
    """`node`: check the object-store budget, then read each file once, validate against the first, flatten and
    `ray.put` it once."""
    ema_probe = [ema_uri] if ema_uri else []
    check_fits(need, capacity, len(probed) + len(ema_probe), spec.storage_dtype)
    refs, layout = [], None
    field = "checkpoints.paths" if spec.paths else "checkpoints.uri"
    for uri, _ in probed:
        ref, layout = _put_checked(uri, spec.key, layout, probed[0][0], spec.storage_dtype, field)
        refs.append(ref)
    ema_ref = None
    if ema_uri:
        ema_ref, _ = _put_checked(
            ema_uri,
            spec.ema_key or spec.key,
            layout,
            probed[0][0],
            spec.storage_dtype,
            "checkpoints.ema_uri",
        )
    return CheckpointSet(
        uris=[uri for uri, _ in probed],
        names=[checkpoint_name(uri) for uri, _ in probed],
        steps=[probe.step for _, probe in probed],
        layout=layout,
        refs=refs,
        ema_ref=ema_ref,
        nbytes=layout.nbytes * (len(refs) + (ema_ref is not None)),
        choice=choice,
    )
