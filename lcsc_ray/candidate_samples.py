"""The samples a search scored, drawn again without Ray: for samples.png and `lcsc-ray samples`.

A candidate is what the evaluators score: coefficients over the checkpoint set (None: the run's EMA), or the
weights of an exported `combined.safetensors`. Its weights are built the evaluators' way (each checkpoint
flattened with the set's layout, `combine.accumulate` into one float32 buffer, streamed one file at a time),
the model is bound to that buffer (`evaluator.bind_flat`) and sampled chunk by chunk (`evaluator.draw_chunk`:
chunk j of an evaluation with noise `seed` draws its noise from `chunk_seed(seed, j)`). The chunk statistics
merge along the evaluators' canonical tree, so on the device the search scored on the FID equals the reported
one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lcsc_ray.checkpoints import (
    Layout,
    as_tensor,
    checkpoint_name,
    ema_file,
    list_checkpoints,
    read_state_dict,
)
from lcsc_ray.combine import accumulate, check_coefficients, non_float_segments
from lcsc_ray.evaluator import CandidateError, bind_flat, chunk_sizes, draw_chunk, refresh_copied, tree_merge
from lcsc_ray.fid import FIDStats, fid_from_stats, reference_stats_for
from lcsc_ray.plugins import build, resolve
from schemas.errors import CheckpointError, SpecError
from schemas.search import CandidateScore, SearchResult, SearchSpec

log = logging.getLogger(__name__)

EMA = None  # the coefficients that stand for the run's EMA weights, as in `Evaluator.evaluate`


@dataclass
class Candidate:
    """A model to sample: a label, its coefficients (None: the run's EMA; [] with `weights_uri`) and, when the
    search reported it, its score."""

    label: str
    coefficients: list[float] | None
    score: CandidateScore | None = None
    weights_uri: str | None = None


# ---------------------------------------------------------------------------------------- which candidate


def _rows(result: SearchResult) -> list[CandidateScore]:
    return [result.best, *result.baselines]


def find_candidate(result: SearchResult, name: str) -> Candidate:
    """'best' (the LCSC winner), 'last', 'ema' (the run's EMA) or any reported label ('uniform',
    'best-sparse-ema@0.9', 'lcsc', ...)."""
    label = {"best": "lcsc", "ema": "run-ema"}.get(name, name)
    row = next((r for r in _rows(result) if r.label == label), None)
    if row is None:
        labels = ["best", "last", "ema", *(r.label for r in result.baselines)]
        raise SpecError(
            f"the search reported no candidate {name!r}; choose one of {labels}", source="--candidate"
        )
    if label == "run-ema":
        return Candidate(label, EMA, row)
    if not row.coefficients:
        raise SpecError(
            f"candidate {name!r} is no combination of the checkpoints (a post-hoc EMA of snapshots): its samples "
            "cannot be drawn from the checkpoint set; choose another candidate",
            source="--candidate",
        )
    return Candidate(label, list(row.coefficients), row)


def grid_candidates(result: SearchResult) -> list[Candidate]:
    """The rows of samples.png: the winner, the last checkpoint, the run's EMA (when reported) and the best
    baseline that can be drawn (when it is none of those, else that row's label says it is the best)."""
    rows = [find_candidate(result, "best"), find_candidate(result, "last")]
    if any(b.label == "run-ema" for b in result.baselines):
        rows.append(find_candidate(result, "ema"))
    drawable = [b for b in result.baselines if b.coefficients or b.label == "run-ema"]
    finite = [b for b in drawable if np.isfinite(b.fid)]
    if finite:
        best = min(finite, key=lambda b: b.fid)
        shown = next((c for c in rows if c.label == best.label), None)
        if shown is None:
            rows.append(find_candidate(result, best.label))
        else:
            shown.label = f"{shown.label} (best baseline)"
    return rows


# ---------------------------------------------------------------------------------------------- weights


def _read(uri: str, key: str | None, layout: Layout | None, storage_dtype: str, field: str):
    state = read_state_dict(uri, key, field)
    layout = layout or Layout.from_state_dict(state, storage_dtype)
    problem = layout.mismatch(state)
    if problem:
        raise CheckpointError(f"checkpoint {uri} does not match the checkpoint set: {problem}")
    return layout, as_tensor(layout.flatten(state))


def combined_flats(
    spec: SearchSpec, coefficient_rows: Sequence[list[float] | None]
) -> tuple[Layout, list[torch.Tensor]]:
    """One float32 flat buffer per row of coefficients (None: the run's EMA), each file read once, the way the
    evaluators combine (`combine.combine_flat`): floating tensors sum_i alpha_i theta_i in checkpoint order,
    integer and bool tensors copied from the last checkpoint."""
    checkpoints = spec.checkpoints
    uris = [uri for uri, _ in list_checkpoints(checkpoints)]
    rows = [None if c is None else check_coefficients(c, len(uris)) for c in coefficient_rows]
    layout, flats, source = None, [None] * len(rows), None
    for index, uri in enumerate(uris):
        layout, source = _read(uri, checkpoints.key, layout, checkpoints.storage_dtype, "checkpoints.uri")
        if index == 0:
            flats = [torch.empty(layout.numel, dtype=torch.float32) for _ in rows]
        for flat, alphas in zip(flats, rows):
            if alphas is not None:
                # LCSC (Liu et al., ICLR 2025, Sec. 3): theta = sum_i alpha_i theta_i, accumulated in place
                accumulate(flat, source, alphas[index], first=index == 0)
    for flat, alphas in zip(flats, rows):
        if alphas is not None:
            for _name, offset, numel in non_float_segments(layout):
                flat[offset : offset + numel].copy_(source[offset : offset + numel])
    if any(alphas is None for alphas in rows):
        ema_flat = _ema_flat(spec, layout)
        for flat, alphas in zip(flats, rows):
            if alphas is None:
                flat.copy_(ema_flat)
    return layout, flats


def _ema_flat(spec: SearchSpec, layout: Layout) -> torch.Tensor:
    uri = ema_file(spec.checkpoints)
    if uri is None:
        raise CheckpointError(
            "the run's EMA was asked for, but the spec has no `checkpoints.ema_uri`; set it"
        )
    key = spec.checkpoints.ema_key or spec.checkpoints.key
    return _read(uri, key, layout, spec.checkpoints.storage_dtype, "checkpoints.ema_uri")[1]


def weights_flat(spec: SearchSpec, uri: str) -> tuple[Layout, torch.Tensor]:
    """An exported combination (`combined.safetensors`) as a float32 flat buffer in the set's layout."""
    first = list_checkpoints(spec.checkpoints)[0][0]
    layout = Layout.from_state_dict(
        read_state_dict(first, spec.checkpoints.key), spec.checkpoints.storage_dtype
    )
    state = read_state_dict(uri, None, "--weights")
    flat = torch.empty(layout.numel, dtype=torch.float32)
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets):
        if name not in state or tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{uri} does not fit the checkpoints of the search ({checkpoint_name(first)}): tensor {name!r} is "
                "missing or has another shape; pass the combined.safetensors of this search"
            )
        flat[offset : offset + state[name].numel()].copy_(state[name].reshape(-1))
    return layout, flat


# --------------------------------------------------------------------------------------------- sampling


class CandidateModel:
    """The spec's model bound to one flat buffer on `device`, with the spec's sampler."""

    def __init__(self, spec: SearchSpec, layout: Layout, device: torch.device):
        self.spec, self.device = spec, device
        self.flat = torch.empty(layout.numel, dtype=torch.float32, device=device)
        model, self.copied = bind_flat(build(spec.model, "model"), layout, self.flat, spec.model.target)
        self.model = model.to(device).eval()
        self.sampler = resolve(spec.sampler.target, "sampler")

    def load(self, flat: torch.Tensor, label: str) -> None:
        """Copy a candidate's weights in; non-finite weights are a CandidateError naming it."""
        self.flat.copy_(flat)
        low, high = torch.aminmax(self.flat)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise CandidateError(f"the combined weights of {label} are not finite")
        refresh_copied(self.model, self.copied)

    def chunk(self, seed: int, index: int, size: int) -> torch.Tensor:
        """Chunk `index` of an evaluation with noise `seed` (`evaluator.draw_chunk`)."""
        return draw_chunk(self.spec, self.sampler, self.model, self.device, seed, index, size)


def default_device(spec: SearchSpec) -> torch.device:
    """Where the search's evaluators sampled: a GPU when they had one and this process sees one, else the CPU."""
    return torch.device("cuda" if spec.evaluators.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def preview_images(
    spec: SearchSpec, candidates: Sequence[Candidate], num: int, seed: int, device: torch.device | None = None
) -> list[np.ndarray]:
    """`num` images (num, C, H, W) in [-1, 1] per candidate, all from the same noise (chunk 0 of `seed`)."""
    device = device or default_device(spec)
    layout, flats = combined_flats(spec, [c.coefficients for c in candidates])
    model = CandidateModel(spec, layout, device)
    images = []
    for candidate, flat in zip(candidates, flats):
        model.load(flat, candidate.label)
        images.append(model.chunk(seed, 0, num).clamp(-1, 1).cpu().numpy())
    return images


@torch.inference_mode()
def scored_samples(
    spec: SearchSpec,
    model: CandidateModel,
    num_samples: int,
    seed: int,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
) -> float:
    """FID of `num_samples` samples with noise `seed`, drawn and merged exactly as an evaluator does;
    `on_chunk(first_index, images)` sees each chunk's images in order (to write them out)."""
    feature_net = build(spec.fid.features, "fid.features").to(model.device).eval()
    mu, sigma = reference_stats_for(spec)
    sizes = chunk_sizes(num_samples, spec.evaluators.batch_size)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def leaf(lo: int, hi: int) -> FIDStats | None:
        if hi - lo > 1:
            return None
        images = model.chunk(seed, lo, sizes[lo])
        if on_chunk is not None:
            on_chunk(int(starts[lo]), images)
        features = feature_net(images.to(model.device))  # (B, d)
        return FIDStats.empty(features.shape[1]).update(features)

    stats = tree_merge(0, len(sizes), leaf)
    return fid_from_stats(stats, mu, sigma)


def reported_fid(score: CandidateScore | None, spec: SearchSpec, num_samples: int, seed: int) -> float | None:
    """The FID the search reported for this candidate at this sample count and seed, if it reported one."""
    if score is None or score.num_samples != num_samples:
        return None
    if seed == spec.fid.seed:
        return score.fid
    holdout = dict(zip(spec.fid.holdout_seeds, score.holdout_fids))
    return holdout.get(seed)
