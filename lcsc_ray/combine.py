"""The LCSC combination theta = sum_i alpha_i theta_i, streamed into one preallocated buffer.

Pure functions over flat arrays (numpy float32, uint16 bfloat16 bits, or torch tensors on any device).
On the CPU the buffer is walked in cache-sized chunks so that each input is read from memory once and the
output written once: (K reads + 1 write) x P values, the minimum. On a GPU the whole buffer is one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lcsc_ray.checkpoints import as_tensor
from schemas.errors import LcscCheckfreeError

CPU_CHUNK = 1 << 18  # 256k float32 = 1 MiB of output: stays in L2 while K inputs stream past it (benchmarked)


class CoefficientError(LcscCheckfreeError, ValueError):
    """Coefficients that do not fit the checkpoint set (wrong count, not finite)."""


def check_coefficients(alphas: Sequence[float] | np.ndarray, num_checkpoints: int) -> list[float]:
    """Coefficients as Python floats; wrong length or non-finite values are errors naming the counts."""
    values = [float(a) for a in np.asarray(alphas, dtype=np.float64).reshape(-1)]
    if len(values) != num_checkpoints:
        raise CoefficientError(
            f"got {len(values)} coefficients for {num_checkpoints} checkpoints; "
            "give one coefficient per checkpoint, in step order"
        )
    if not all(np.isfinite(values)):
        raise CoefficientError(f"coefficients must be finite, got {values}")
    return values


def combine_into(
    out: torch.Tensor | np.ndarray,
    arrays: Sequence[np.ndarray | torch.Tensor],
    alphas: Sequence[float] | np.ndarray,
    chunk_size: int | None = None,
) -> torch.Tensor | np.ndarray:
    """Write sum_i alphas[i] * arrays[i] into `out` in one streaming pass (no K temporaries); returns `out`.

    `arrays` may live on the host while `out` is on a GPU: each chunk is then copied over once.
    `chunk_size` None picks CPU_CHUNK on the CPU and the whole buffer on a GPU.
    """
    coefficients = check_coefficients(alphas, len(arrays))
    target = as_tensor(out)
    inputs = [as_tensor(a) for a in arrays]
    for index, tensor in enumerate(inputs):
        if tensor.numel() != target.numel():
            raise CoefficientError(
                f"checkpoint {index} has {tensor.numel()} values, the output {target.numel()}"
            )
    flat = target.view(-1)
    step = chunk_size or (flat.numel() if flat.is_cuda else CPU_CHUNK)
    for start in range(0, flat.numel(), step):
        stop = min(start + step, flat.numel())
        acc = flat[start:stop]
        # LCSC (Liu et al., ICLR 2025, Sec. 3): theta = sum_i alpha_i theta_i, accumulated in place
        torch.mul(_on(inputs[0][start:stop], acc), coefficients[0], out=acc)
        for alpha, tensor in zip(coefficients[1:], inputs[1:]):
            acc.add_(_on(tensor[start:stop], acc), alpha=alpha)
    return out


def _on(chunk: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return chunk if chunk.device == like.device else chunk.to(like.device, non_blocking=True)


def combine_naive(arrays: Sequence[np.ndarray], alphas: Sequence[float]) -> np.ndarray:
    """Reference implementation in float64 numpy (K temporaries; for tests only)."""
    return sum(float(a) * np.asarray(x, dtype=np.float64) for a, x in zip(alphas, arrays))
