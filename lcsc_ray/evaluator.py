"""FID evaluator actors: combine the checkpoints with given coefficients, sample with fixed noise, score.

An evaluation of N samples is cut into chunks of `batch_size`; chunk j draws its noise from a seed derived
from (seed, j), and chunk statistics are merged along a fixed binary tree over the chunk indices. Any
aligned block of that tree gives the same float64 sums wherever it is computed, so an evaluation split over
several actors merges to exactly the statistics one actor would compute (the pool splits large
evaluations this way, `lcsc_ray.pool`). That arithmetic is `lcsc_ray.chunks`; `draw_chunk` draws one chunk's
samples, for the evaluators and for `lcsc_ray.candidate_samples` alike.

Device and precision: with `evaluators.num_gpus` > 0 the evaluator runs on the GPU Ray gave it
(`select_device`); the checkpoints are copied there once, combined there and sampled there. Sampling may run
under float16/bfloat16 autocast (`evaluators.dtype`, `sampling_precision`); the combination and the features
stay float32.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import ray
import torch

from lcsc_ray.checkpoints import CheckpointSet, Layout
from lcsc_ray.chunks import (  # noqa: F401 - merge_blocks, split_point, tree_blocks re-exported for pool.py, tests
    chunk_seed,
    chunk_sizes,
    merge_blocks,
    split_point,
    tree_blocks,
    tree_merge,
)
from lcsc_ray.combine import check_coefficients
from lcsc_ray.fid import FIDStats, fid_from_stats
from lcsc_ray.placement import NodeWeights, PlacedSet
from lcsc_ray.plugins import build, resolve
from schemas.errors import CheckpointError, LcscCheckfreeError, SpecError
from schemas.search import SearchSpec


class CandidateError(LcscCheckfreeError):
    """A candidate's combined weights or samples are not finite (huge coefficients can blow up)."""

    def __init__(self, message: str, coefficients: Sequence[float] | None = None):
        self.coefficients = list(coefficients or [])
        super().__init__(message)


log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(
    num_gpus: float, gpu_ids: Sequence, cuda_available: bool, visible_devices: str | None
) -> torch.device:
    """The evaluator's device: the CPU without GPUs; with `num_gpus` > 0 the GPU Ray assigned (`gpu_ids` from
    `ray.get_gpu_ids()`). Ray sets CUDA_VISIBLE_DEVICES to those GPUs, so the first visible one is cuda:0; when
    it does not (`visible_devices` None), the assigned id itself. Asking for a GPU without CUDA is an error."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not cuda_available:
        raise SpecError(
            f"`evaluators.num_gpus` is {num_gpus}, but torch {torch.__version__} in the evaluator sees no CUDA GPU; "
            "install a CUDA build of torch on the GPU nodes, or set `evaluators.num_gpus: 0` to evaluate on CPUs",
            source="evaluators.num_gpus",
        )
    if visible_devices is None and gpu_ids:
        return torch.device("cuda", int(gpu_ids[0]))
    return torch.device("cuda", 0)


def sampling_precision(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The context sampling runs in: torch.autocast to float16/bfloat16 on `device`, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype not in DTYPES:
        raise SpecError(
            f"`evaluators.dtype` is {dtype!r}; choose one of {sorted(DTYPES)}", source="evaluators.dtype"
        )
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def bind_flat(
    model: torch.nn.Module, layout: Layout, flat: torch.Tensor, target: str
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Make `model`'s float32 tensors views of the flat combination buffer (so combining IS loading); returns
    the model and the views of its other tensors, which `refresh_copied` copies in after each combination."""
    views = layout.unflatten(flat)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(views)), sorted(set(views) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"model {target} does not match the checkpoints: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    copied = {n: v for n, v in views.items() if own[n].dtype != torch.float32}
    bound = {n: v for n, v in views.items() if n not in copied}
    model.load_state_dict(bound, strict=False, assign=True)
    return model, copied


def refresh_copied(model: torch.nn.Module, copied: Mapping[str, torch.Tensor]) -> None:
    """Copy the combination's non-float32 tensors (`bind_flat`'s second value) into the model."""
    if copied:
        state = model.state_dict()
        for name, view in copied.items():
            state[name].copy_(view)


@torch.inference_mode()
def draw_chunk(
    spec: SearchSpec, sampler, model: torch.nn.Module, device: torch.device, seed: int, index: int, size: int
) -> torch.Tensor:
    """The `size` images (B, C, H, W), float32, of chunk `index` of an evaluation with noise `seed`: the very
    samples that are scored (its noise seed is `chunk_seed(seed, index)`, not `seed`). Non-finite samples raise
    CandidateError."""
    with sampling_precision(device, spec.evaluators.dtype):
        images = sampler(
            model,
            size,
            chunk_seed(seed, index),
            spec.sampler.nfe,
            spec.evaluators.batch_size,
            **spec.sampler.kwargs,
        )
    images = images.float()  # features in float32 whatever precision sampled
    if not bool(torch.isfinite(images).all()):
        raise CandidateError(
            f"samples of chunk {index} (seed {seed}) hold NaN/inf: the combined model "
            "diverges; the search should score this candidate as failed"
        )
    return images


class Evaluator:
    """Holds the placed checkpoints (`lcsc_ray.placement`), model, sampler, feature network and reference stats
    of one actor; it asks the placement for each candidate's combined weights, wherever the set is kept."""

    def __init__(
        self,
        spec: SearchSpec,
        checkpoint_refs: list | CheckpointSet | PlacedSet,
        layout: Layout | None = None,
        reference_mu: np.ndarray | None = None,
        reference_sigma: np.ndarray | None = None,
        ema_ref=None,
        extra_refs: list | None = None,
    ):
        if isinstance(checkpoint_refs, CheckpointSet):
            checkpoint_refs = checkpoint_refs.placed()
        if not isinstance(checkpoint_refs, PlacedSet):  # object refs of a `node` set (or arrays)
            if layout is None:
                raise ValueError("Evaluator needs the layout with a list of checkpoint refs")
            checkpoint_refs = PlacedSet(
                NodeWeights(list(checkpoint_refs), layout),
                None if ema_ref is None else NodeWeights([ema_ref], layout),
                NodeWeights(list(extra_refs), layout) if extra_refs else None,
            )
        if reference_mu is None or reference_sigma is None:
            raise ValueError("Evaluator needs the reference mu and sigma")
        torch.set_num_threads(spec.evaluators.torch_threads)
        self.spec, self.weights, self.layout = spec, checkpoint_refs, checkpoint_refs.layout
        self.device = select_device(
            spec.evaluators.num_gpus,
            ray.get_gpu_ids() if ray.is_initialized() else [],
            torch.cuda.is_available(),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.weights.open(self.device)  # `node`: zero-copy views of the object store (a GPU copy once)
        self.reference_mu = np.asarray(reference_mu, np.float64)
        self.reference_sigma = np.asarray(reference_sigma, np.float64)
        self.flat = torch.empty(self.layout.numel, dtype=torch.float32, device=self.device)
        self.model = self._bind_model(build(spec.model))
        self.sampler = resolve(spec.sampler.target)
        self.feature_net = build(spec.fid.features).to(self.device).eval()
        self.combinations = {"count": 0, "seconds": 0.0, "read_bytes": 0, "moved_bytes": 0}

    def _bind_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Make the model's float32 tensors views of the combination buffer, so combining IS loading."""
        model, self.copied = bind_flat(model, self.layout, self.flat, self.spec.model.target)
        return model.to(self.device).eval()

    def _load(self, coefficients: Sequence[float] | None) -> None:
        key = None if coefficients is None else tuple(coefficients)
        if getattr(self, "_loaded", False) and self._loaded_key == key:
            return  # several blocks of one split evaluation: combine once
        self._loaded = False
        start = time.perf_counter()
        moved = self.weights.combine_into(self.flat, coefficients)
        self._count_combination(moved, time.perf_counter() - start)
        low, high = torch.aminmax(self.flat)  # NaN propagates; no P-sized temporary, unlike isfinite(flat)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise CandidateError(
                f"combined weights are not finite for coefficients {coefficients}", coefficients
            )
        refresh_copied(self.model, self.copied)
        self._loaded, self._loaded_key = True, key

    def _count_combination(self, moved: dict, seconds: float) -> None:
        """Count a combination's bytes and time; the first is logged with the placement that made it."""
        totals = self.combinations
        totals["count"] += 1
        totals["seconds"] += seconds
        for name in ("read_bytes", "moved_bytes"):
            totals[name] += int(moved[name])
        if totals["count"] == 1:
            log.info(
                "combination (placement %s): %.1f MB read, %.1f MB moved in %.2f s",
                self.weights.checkpoints.mode,
                moved["read_bytes"] / 1e6,
                moved["moved_bytes"] / 1e6,
                seconds,
            )

    @torch.inference_mode()
    def _chunk_stats(self, seed: int, index: int, size: int, timings: dict) -> FIDStats:
        start = time.perf_counter()
        images = draw_chunk(self.spec, self.sampler, self.model, self.device, seed, index, size)
        mid = time.perf_counter()
        features = self.feature_net(images.to(self.device))  # (B, d)
        self._check_features(features)
        stats = FIDStats.empty(features.shape[1]).update(features)
        timings["sample_s"] += mid - start
        timings["features_s"] += time.perf_counter() - mid
        return stats

    def _check_sampler(self) -> None:
        """The sampler must accept sampler(model, n, seed, nfe, batch_size, **sampler.kwargs)."""
        if getattr(self, "_sampler_checked", False):
            return
        sampler = self.spec.sampler
        try:
            inspect.signature(self.sampler).bind(
                self.model, 1, 0, sampler.nfe, self.spec.evaluators.batch_size, **sampler.kwargs
            )
        except TypeError as exc:
            raise SpecError(
                f"sampler {sampler.target} cannot be called as sampler(model, n, seed, nfe, batch_size, "
                f"**sampler.kwargs) with kwargs {sorted(sampler.kwargs)}: {exc}; fix `sampler.target` or "
                "`sampler.kwargs`"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): the first call will tell
        self._sampler_checked = True

    def _check_features(self, features: torch.Tensor) -> None:
        """Features must be (B, d) with d the reference statistics' dimension."""
        dim = self.reference_mu.shape[0]
        if features.ndim != 2 or features.shape[1] != dim:
            raise SpecError(
                f"feature network {self.spec.fid.features.target} gives features of shape "
                f"{tuple(features.shape)}, but the reference statistics have dimension {dim}; the reference must "
                "come from the same feature network (`fid.reference`, `fid.features`)"
            )

    def _stats(self, coefficients, seed: int, lo: int, hi: int, num_samples: int, timings: dict) -> FIDStats:
        self._check_sampler()
        start = time.perf_counter()
        self._load(coefficients)
        timings["combine_s"] += time.perf_counter() - start
        sizes = chunk_sizes(num_samples, self.spec.evaluators.batch_size)
        if not 0 <= lo < hi <= len(sizes):
            raise ValueError(f"chunks [{lo}, {hi}) outside the {len(sizes)} chunks of {num_samples} samples")
        return tree_merge(
            lo, hi, lambda a, b: self._chunk_stats(seed, a, sizes[a], timings) if b - a == 1 else None
        )

    def evaluate_stats(
        self,
        coefficients: Sequence[float] | None,
        seed: int,
        chunk_indices: Sequence[int],
        num_samples: int | None = None,
        raise_nonfinite: bool = True,
    ) -> dict:
        """FIDStats dict of a contiguous block of chunks (pass blocks from `tree_blocks` for exact merges).
        `num_samples` None means every chunk is a full batch; coefficients None means the run's EMA. Non-finite
        weights or samples raise CandidateError, or with raise_nonfinite=False return {'nonfinite': True}."""
        indices = list(chunk_indices)
        if not indices or indices != list(range(indices[0], indices[-1] + 1)):
            raise ValueError(f"chunk_indices must be a non-empty contiguous range, got {indices[:10]}")
        coefficients = self._checked(coefficients)
        num_samples = num_samples or (indices[-1] + 1) * self.spec.evaluators.batch_size
        timings = dict.fromkeys(("combine_s", "sample_s", "features_s"), 0.0)
        try:
            stats = self._stats(coefficients, seed, indices[0], indices[-1] + 1, num_samples, timings)
        except CandidateError:
            if raise_nonfinite:
                raise
            return {"nonfinite": True}
        return stats.to_dict()

    def _checked(self, coefficients):
        if coefficients is None:
            if self.weights.ema is None:
                raise CheckpointError("no EMA weights were loaded; set `checkpoints.ema_uri`")
            return None
        count, extra = len(self.weights.checkpoints), self.weights.extra
        if extra is not None and len(coefficients) == count + len(extra):
            return check_coefficients(coefficients, len(coefficients))  # checkpoints, then the extra weights
        return check_coefficients(coefficients, count)

    def evaluate(
        self,
        coefficients: Sequence[float] | None,
        num_samples: int,
        seed: int,
        raise_nonfinite: bool = True,
        return_stats: bool = False,
    ) -> dict:
        """FID of the combination at `num_samples` samples with noise `seed` (coefficients None: the run's
        EMA). Non-finite weights or samples raise CandidateError, or with raise_nonfinite=False give fid=inf
        and nonfinite=True. The payload is small: `stats` holds the count and feature sum; the (d, d)
        `sum_outer` (32 MB at d=2048) is returned only with `return_stats`."""
        coefficients = self._checked(coefficients)
        timings = dict.fromkeys(("combine_s", "sample_s", "features_s"), 0.0)
        start = time.perf_counter()
        try:
            n_chunks = len(chunk_sizes(num_samples, self.spec.evaluators.batch_size))
            stats = self._stats(coefficients, seed, 0, n_chunks, num_samples, timings)
        except CandidateError:
            if raise_nonfinite:
                raise
            return {
                "fid": float("inf"),
                "num_samples": num_samples,
                "seed": seed,
                "stats": None,
                "nonfinite": True,
                "timings": {**timings, "total_s": time.perf_counter() - start},
            }
        fid = fid_from_stats(stats, self.reference_mu, self.reference_sigma)
        timings["total_s"] = time.perf_counter() - start
        return {
            "fid": fid,
            "num_samples": num_samples,
            "seed": seed,
            "stats": stats.to_dict() if return_stats else {"count": stats.count, "sum": stats.sum},
            "nonfinite": False,
            "timings": timings,
        }

    def score(self, stats: dict) -> float:
        """FID of merged statistics against this actor's reference."""
        return fid_from_stats(FIDStats.from_dict(stats), self.reference_mu, self.reference_sigma)

    def info(self) -> dict:
        """Process facts for tests and benchmarks: pid, device, array writeability, memory (RSS/USS/PSS)."""
        import psutil

        memory = psutil.Process().memory_full_info()
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            **self.weights.checkpoints.info(),
            "combinations": dict(self.combinations),
            "batch_size": self.spec.evaluators.batch_size,
            "rss": memory.rss,
            "uss": memory.uss,
            "pss": getattr(memory, "pss", None),
        }


EvaluatorActor = ray.remote(Evaluator)


def evaluator_options(spec: SearchSpec) -> dict:
    """Ray options of an evaluator actor: its resources, no restart by Ray and no task retries.

    A lost evaluator is replaced by the pool's slots (a new actor over the same refs) and the pool decides where
    a lost evaluation runs again. A restart by Ray would need the constructor's object-store arguments to outlive
    the actor (Ray warns that such a restart can fail), and would hide a lost node from the pool."""
    return {
        "num_cpus": spec.evaluators.num_cpus,
        "num_gpus": spec.evaluators.num_gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
    }


def start_evaluators(
    spec: SearchSpec,
    checkpoint_set: CheckpointSet,
    reference_stats: tuple[np.ndarray, np.ndarray],
    wait_s: float | None = 300.0,
) -> list:
    """Start `spec.evaluators.num_actors` evaluator actors (no restarts, no task retries) sharing the
    object-store checkpoints; waits until they are constructed unless wait_s is None."""
    mu_ref, sigma_ref = ray.put(np.asarray(reference_stats[0])), ray.put(np.asarray(reference_stats[1]))
    actors = [
        EvaluatorActor.options(**evaluator_options(spec)).remote(
            spec, checkpoint_set.placed(), None, mu_ref, sigma_ref
        )
        for _ in range(spec.evaluators.num_actors)
    ]
    if wait_s is not None:
        try:
            ray.get([actor.info.remote() for actor in actors], timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            raise LcscCheckfreeError(
                f"{len(actors)} evaluator actors ({spec.evaluators.num_cpus} CPU, {spec.evaluators.num_gpus} "
                f"GPU each) did not start in {wait_s:.0f} s; cluster resources: {ray.cluster_resources()}; "
                "lower `evaluators.num_actors` or their resources"
            ) from None
    return actors
