"""How an evaluation of N samples is cut into chunks, seeded and merged, as pure functions.

Chunk j of an evaluation with noise `seed` has `batch_size` samples (the last one the remainder) and draws its
noise from `chunk_seed(seed, j)`. Chunk statistics merge along a fixed binary tree over the chunk indices
(`tree_merge`), so any aligned block of that tree (`tree_blocks`) gives the same float64 sums wherever it is
computed, and blocks computed on several actors merge (`merge_blocks`) to exactly one actor's statistics.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lcsc_ray.fid import FIDStats


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The noise seed of chunk `chunk_index` of an evaluation with `seed` (independent of the split)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, chunk_index]).generate_state(1)[0])


def chunk_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Samples per chunk: full batches, then the remainder."""
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def split_point(lo: int, hi: int) -> int:
    """Where the canonical merge tree splits [lo, hi): after the largest power of two below its length."""
    return lo + (1 << ((hi - lo - 1).bit_length() - 1))


def tree_blocks(num_chunks: int, num_parts: int) -> list[tuple[int, int]]:
    """Split [0, num_chunks) into at least `num_parts` blocks of the canonical tree (if it has as many)."""
    blocks = [(0, num_chunks)]
    while len(blocks) < num_parts and any(hi - lo > 1 for lo, hi in blocks):
        lo, hi = max(blocks, key=lambda b: b[1] - b[0])
        blocks.remove((lo, hi))
        blocks += [(lo, split_point(lo, hi)), (split_point(lo, hi), hi)]
    return sorted(blocks)


def tree_merge(lo: int, hi: int, leaf) -> FIDStats:
    """Merge statistics over [lo, hi) along the canonical tree; `leaf(lo, hi)` returns a block's stats or
    None to recurse (single chunks must be returned)."""
    known = leaf(lo, hi)
    if known is not None:
        return known
    mid = split_point(lo, hi)
    return tree_merge(lo, mid, leaf).merge(tree_merge(mid, hi, leaf))


def merge_blocks(num_chunks: int, block_stats: Mapping[tuple[int, int], FIDStats]) -> FIDStats:
    """Merge the statistics of `tree_blocks(num_chunks, ...)` blocks along the canonical tree: the result equals
    exactly what one evaluator computes over all chunks."""
    return tree_merge(0, num_chunks, lambda lo, hi: block_stats.get((lo, hi)))
