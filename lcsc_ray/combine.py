"""The LCSC combination theta = sum_i alpha_i theta_i, streamed into one preallocated buffer.

Pure functions over flat arrays (numpy float32, uint16 bfloat16 bits, or torch tensors on any device).
On the CPU the buffer is walked in cache-sized chunks so that each input is read from memory once and the
output written once: (K reads + 1 write) x P values, the minimum. On a GPU the whole buffer is one chunk.

The same weighted sum (`accumulate`) serves both routes: the evaluators' flat buffers (`combine_flat`) and the
exported state dicts (`combine_states`, used by a search's `combined.safetensors` and by `lcsc-ray combine`).
Only floating-point tensors are combined, always in at least float32 (bfloat16/float16 inputs are widened before
they are scaled). Integer and bool tensors (counters, indices) are never combined: they must be equal across
the set and are copied from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from lcsc_ray.layout import Layout, as_tensor
from schemas.errors import CheckpointError, LcscCheckfreeError

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
    start: bool = True,
) -> torch.Tensor | np.ndarray:
    """Write sum_i alphas[i] * arrays[i] into `out` in one streaming pass (no K temporaries); returns `out`.
    With `start` False the terms are added to what `out` holds (a sum continued with further inputs, in the
    same per-element order as one pass over all of them).

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
    for begin in range(0, flat.numel(), step):
        stop = min(begin + step, flat.numel())
        acc = flat[begin:stop]
        for index, (alpha, tensor) in enumerate(zip(coefficients, inputs)):
            accumulate(acc, _on(tensor[begin:stop], acc), alpha, first=start and index == 0)
    return out


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, alpha: float, first: bool) -> None:
    """acc = alpha * tensor (first) or acc += alpha * tensor, computed in acc's dtype: a bfloat16 input is
    widened before it is scaled, never rounded to bfloat16 after."""
    term = tensor if tensor.dtype == acc.dtype else tensor.to(acc.dtype)
    # LCSC (Liu et al., ICLR 2025, Sec. 3): theta = sum_i alpha_i theta_i, accumulated in place
    if first:
        torch.mul(term, alpha, out=acc)
    else:
        acc.add_(term, alpha=alpha)


def is_float_dtype(dtype: str | torch.dtype) -> bool:
    """Whether a tensor of this dtype (a torch dtype or its name, e.g. 'int64') is combined."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return dtype.is_floating_point


def non_float_segments(layout: Layout) -> list[tuple[str, int, int]]:
    """(name, offset, numel) of every tensor that is copied, not combined (integer and bool tensors)."""
    return [
        (name, offset, int(np.prod(shape, dtype=np.int64)))
        for name, shape, dtype, offset in zip(layout.names, layout.shapes, layout.dtypes, layout.offsets)
        if not is_float_dtype(dtype)
    ]


def check_non_float_equal(
    layout: Layout, arrays: Sequence[np.ndarray | torch.Tensor], names: Sequence[str]
) -> None:
    """Integer and bool tensors must hold the same values in every checkpoint of the set (flat arrays in
    step order, `names` naming each); the error names the tensor and the first checkpoint that differs."""
    tensors = [as_tensor(a) for a in arrays]
    for name, offset, numel in non_float_segments(layout):
        first = tensors[0][offset : offset + numel]
        for index in range(1, len(tensors)):
            if not torch.equal(tensors[index][offset : offset + numel], first):
                raise CheckpointError(_differs(name, names[0], names[index]))


def _differs(name: str, first: str, other: str) -> str:
    return (
        f"non-float tensor {name!r} differs between checkpoints {first} and {other}: integer and bool "
        "tensors (counters, indices) cannot be combined and must be equal across the set; drop the "
        "checkpoints that differ, or remove that buffer from the saved state dicts"
    )


def combine_flat(
    out: torch.Tensor,
    sources: Sequence[np.ndarray | torch.Tensor],
    coefficients: Sequence[float],
    layout: Layout,
    start: bool = True,
) -> torch.Tensor:
    """The combination in a flat buffer: floating tensors weighted and summed (`combine_into`; `start` False
    continues the sum already in `out`), integer and bool tensors copied from the last checkpoint (they are
    equal across the set, `check_non_float_equal`)."""
    combine_into(out, sources, coefficients, start=start)
    last = as_tensor(sources[-1])
    for _name, offset, numel in non_float_segments(layout):
        out[offset : offset + numel].copy_(_on(last[offset : offset + numel], out))
    return out


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> float32, float64 stays float64


def combine_states(
    states: Iterable[tuple[str, Mapping[str, torch.Tensor]]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """theta = sum_i alpha_i theta_i over (name, state dict) pairs in step order, holding one input at a time.

    Floating tensors come out in float32 (float64 when stored as float64); integer and bool tensors must be
    equal in every state and are copied from the last one. The states must share names and shapes."""
    combined: dict[str, torch.Tensor] = {}
    first_name = ""
    count = 0
    for index, (alpha, (name, state)) in enumerate(zip(coefficients, states)):
        if index == 0:
            first_name = name
            combined = {
                key: torch.empty(t.shape, dtype=_accumulation_dtype(t.dtype))
                if t.is_floating_point()
                else t.clone()
                for key, t in state.items()
            }
        _check_same_tensors(combined, state, first_name, name)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                accumulate(combined[key], tensor.reshape(combined[key].shape), alpha, first=index == 0)
            elif not torch.equal(tensor, combined[key]):
                raise CheckpointError(_differs(key, first_name, name))
            else:
                combined[key] = tensor.clone()  # copied from the last checkpoint (equal in all)
        count += 1
    if count != len(coefficients):
        raise CoefficientError(
            f"got {len(coefficients)} coefficients for {count} checkpoints; "
            "give one coefficient per checkpoint, in step order"
        )
    return combined


def _check_same_tensors(
    combined: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], first: str, name: str
) -> None:
    for key in set(combined) | set(state):
        if key not in state or key not in combined:
            where = name if key not in state else first
            raise CheckpointError(f"checkpoint {where} has no tensor {key!r}, unlike the rest of the set")
        if tuple(state[key].shape) != tuple(combined[key].shape):
            raise CheckpointError(
                f"tensor {key!r} of checkpoint {name} has shape {tuple(state[key].shape)}, "
                f"{first} has {tuple(combined[key].shape)}"
            )
        if state[key].is_floating_point() != combined[key].is_floating_point():
            raise CheckpointError(
                f"tensor {key!r} of checkpoint {name} has dtype {state[key].dtype}, which "
                f"differs in kind from {first}'s"
            )


def _on(chunk: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return chunk if chunk.device == like.device else chunk.to(like.device, non_blocking=True)


def combine_naive(arrays: Sequence[np.ndarray], alphas: Sequence[float]) -> np.ndarray:
    """Reference implementation in float64 numpy (K temporaries; for tests only)."""
    return sum(float(a) * np.asarray(x, dtype=np.float64) for a, x in zip(alphas, arrays))
