"""FID at infinite samples from one evaluation's chunk blocks (Chong and Forsyth, "Effectively Unbiased FID").

FID measured with n samples is biased upward by about c/n. An evaluation of N samples whose statistics are kept
per block of chunks gives the FID of the whole (n = N), of each half (n = N/2) and of each quarter (n = N/4), all
from the same samples; averaging the parts of one size and fitting FID_n = FID_inf + c/n by least squares gives
FID_inf, a score comparable across sample counts. Pure functions over `FIDStats`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from lcsc_ray.fid import FIDStats, fid_from_stats

LEVELS = (1, 2, 4)  # the whole, halves, quarters


def level_bounds(num_chunks: int, parts: int) -> list[int] | None:
    """Chunk indices that cut [0, num_chunks) into `parts` equal parts, or None when they do not divide it."""
    if num_chunks % parts:
        return None
    step = num_chunks // parts
    return [i * step for i in range(parts + 1)]


def block_bounds(num_chunks: int, reused: Sequence[int]) -> list[int]:
    """Boundaries of the blocks an evaluation of `num_chunks` chunks keeps: every level's cuts, and the
    boundaries of the blocks reused from a smaller evaluation of the same candidate (`reused`, from 0)."""
    cuts = {0, num_chunks, *(b for b in reused if b <= num_chunks)}
    for parts in LEVELS:
        bounds = level_bounds(num_chunks, parts)
        if bounds:
            cuts.update(bounds)
    return sorted(cuts)


def merged(blocks: dict[tuple[int, int], FIDStats], lo: int, hi: int) -> FIDStats | None:
    """The statistics of chunks [lo, hi) from the blocks that tile it (merged in order), or None when they
    do not tile it exactly."""
    out, at = None, lo
    while at < hi:
        nxt = next(((a, b) for a, b in blocks if a == at and b <= hi), None)
        if nxt is None:
            return None
        out = blocks[nxt] if out is None else out.merge(blocks[nxt])
        at = nxt[1]
    return out


def fit_points(
    blocks: dict[tuple[int, int], FIDStats], num_chunks: int, mu: np.ndarray, sigma: np.ndarray
) -> list[tuple[float, float]]:
    """(mean sample count, mean FID) of each level whose parts the blocks tile, each part with >= 2 samples."""
    points = []
    for parts in LEVELS:
        bounds = level_bounds(num_chunks, parts)
        if bounds is None:
            continue
        stats = [merged(blocks, a, b) for a, b in itertools.pairwise(bounds)]
        if any(s is None or s.count < 2 for s in stats):
            continue
        points.append(
            (
                float(np.mean([s.count for s in stats])),
                float(np.mean([fid_from_stats(s, mu, sigma) for s in stats])),
            )
        )
    return points


def fit_fid_inf(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(FID_inf, c) of the least-squares line FID_n = FID_inf + c / n through (n, FID_n) points, or None with
    fewer than two distinct sample counts."""
    if len({n for n, _ in points}) < 2:
        return None
    inv_n = np.array([1.0 / n for n, _ in points])
    fids = np.array([f for _, f in points])
    design = np.stack([np.ones_like(inv_n), inv_n], axis=1)
    (fid_inf, slope), *_ = np.linalg.lstsq(design, fids, rcond=None)
    return float(fid_inf), float(slope)
