"""Each candidate's float64 chunk-block statistics, kept so that a promotion continues instead of restarting.

An evaluation of N samples with noise `seed` draws chunk j from `chunk_seed(seed, j)`; the first N samples of an
M-sample evaluation are therefore the N-sample evaluation's own, as long as its chunks are full batches. The
blocks of full chunks are stored per (coefficients, seed, batch size) as one .npz (written atomically, stamped
with the inputs' identity), so a candidate promoted from N to M samples draws only chunks N/b .. M/b - 1, and a
resumed search continues from the same blocks. At d = 2048 features each block is 32 MB; at the MNIST
recipe's d = 128, 128 KB.
"""

from __future__ import annotations

import io

import numpy as np

from lcsc_ray.evaluation_store import evaluation_key
from lcsc_ray.fid import FIDStats
from rayops import storage
from schemas.errors import StorageNotFoundError

Blocks = dict[tuple[int, int], FIDStats]


class CandidateStats:
    """Block statistics by (coefficients, seed, batch size) under `uri`, for the inputs named by `identity`."""

    def __init__(self, uri: str, identity: str):
        self.uri, self.identity = uri, identity

    def _file(self, alphas, seed: int, batch_size: int) -> str:
        key = evaluation_key(alphas, 0, seed).replace("-n0-", "-")
        return storage.join(self.uri, f"{key}-b{batch_size}.npz")

    def load(self, alphas, seed: int, batch_size: int) -> Blocks:
        """The stored blocks (lo, hi) -> stats of full chunks; {} when none (or made over other inputs)."""
        try:
            data = storage.read_bytes(self._file(alphas, seed, batch_size))
        except StorageNotFoundError:
            return {}
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if str(npz["identity"]) != self.identity:
                return {}
            return {
                (int(lo), int(hi)): FIDStats(int(n), s.copy(), o.copy())
                for lo, hi, n, s, o in zip(npz["lo"], npz["hi"], npz["count"], npz["sum"], npz["sum_outer"])
            }

    def save(self, alphas, seed: int, batch_size: int, blocks: Blocks) -> None:
        """Store the blocks whose chunks are all full batches (only those continue into a larger evaluation)."""
        full = {k: v for k, v in sorted(blocks.items()) if v.count == (k[1] - k[0]) * batch_size}
        if not full:
            return
        buffer = io.BytesIO()
        np.savez(
            buffer,
            identity=np.array(self.identity),
            lo=np.array([k[0] for k in full], np.int64),
            hi=np.array([k[1] for k in full], np.int64),
            count=np.array([v.count for v in full.values()], np.int64),
            sum=np.stack([v.sum for v in full.values()]),
            sum_outer=np.stack([v.sum_outer for v in full.values()]),
        )
        storage.write_bytes(self._file(alphas, seed, batch_size), buffer.getvalue())


def reusable_prefix(blocks: Blocks, sizes: list[int], batch_size: int) -> Blocks:
    """The stored blocks that tile a prefix [0, k) of an evaluation with chunk `sizes` whose chunks there are
    full batches (the same samples); the longest such prefix."""
    out: Blocks = {}
    at = 0
    while True:
        nxt = next(((a, b) for a, b in blocks if a == at), None)
        if nxt is None or nxt[1] > len(sizes) or any(s != batch_size for s in sizes[nxt[0] : nxt[1]]):
            return out
        out[nxt] = blocks[nxt]
        at = nxt[1]
