"""The flat layout of a checkpoint set: where each tensor lives inside one contiguous array.

Each checkpoint is one flat array (float32, or bfloat16 stored as uint16 bits), whichever placement keeps it
(`lcsc_ray.placement`); the layout is kept once per set.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from schemas.errors import CheckpointError

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Layout:
    """Where each tensor lives inside a flat checkpoint array (kept once per set)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]  # original dtypes, e.g. 'float32'
    offsets: list[int]
    numel: int
    storage_dtype: str = "float32"

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], storage_dtype: str = "float32"
    ) -> Layout:
        """The layout of `state_dict` in its own key order."""
        names, shapes, dtypes, offsets, total = [], [], [], [], 0
        for name, tensor in state_dict.items():
            names.append(name)
            shapes.append(tuple(tensor.shape))
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            offsets.append(total)
            total += tensor.numel()
        return cls(names, shapes, dtypes, offsets, total, storage_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of one flat array in the storage dtype."""
        return self.numel * (4 if self.storage_dtype == "float32" else 2)

    def mismatch(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """A sentence naming the first tensor of `state_dict` that differs from this layout, or None."""
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            if name not in state_dict:
                return f"tensor {name!r} is missing"
            tensor = state_dict[name]
            if tuple(tensor.shape) != shape:
                return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            if str(tensor.dtype).removeprefix("torch.") != dtype:
                return f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}"
        extra = [name for name in state_dict if name not in set(self.names)]
        return f"tensor {extra[0]!r} is unexpected" if extra else None

    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One contiguous array: float32, or bfloat16 bits as uint16 (see `as_tensor`)."""
        flat = torch.empty(self.numel, dtype=STORAGE_DTYPES[self.storage_dtype])
        for name, offset in zip(self.names, self.offsets):
            tensor = state_dict[name]
            flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        if self.storage_dtype == "bfloat16":
            return flat.view(torch.uint16).numpy()
        return flat.numpy()

    def unflatten(self, flat: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> tensor views into `flat` (no copies), in the storage dtype."""
        tensor = as_tensor(flat)
        if tensor.numel() != self.numel:
            raise CheckpointError(f"flat array has {tensor.numel()} values, the layout expects {self.numel}")
        return {
            name: tensor[offset : offset + int(np.prod(shape, dtype=np.int64))].view(shape)
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }


def as_tensor(flat: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a flat array (uint16 bits become bfloat16); read-only arrays are never written."""
    if isinstance(flat, torch.Tensor):
        return flat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays: we only read them
        tensor = torch.from_numpy(flat)
    return tensor.view(torch.bfloat16) if flat.dtype == np.uint16 else tensor
