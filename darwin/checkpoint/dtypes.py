"""A tensor's dtype as the shard header names it (its safetensors code), and its raw bits in numpy or torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: `darwin merge` on CPU runs without it
    import torch

# A tensor's dtype is its safetensors code (as in the shard header): the torch dtype of that name, and the numpy
# dtype that holds its bits. bf16 and fp8 have no numpy dtype; their bits ride in integers of the same width.
DTYPES = {
    "BOOL": ("bool", np.bool_), "U8": ("uint8", np.uint8), "I8": ("int8", np.int8), "I16": ("int16", np.int16),
    "I32": ("int32", np.int32), "I64": ("int64", np.int64), "U16": ("uint16", np.uint16),
    "U32": ("uint32", np.uint32), "U64": ("uint64", np.uint64), "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.int16), "F32": ("float32", np.float32), "F64": ("float64", np.float64),
    "F8_E4M3": ("float8_e4m3fn", np.uint8), "F8_E5M2": ("float8_e5m2", np.uint8),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
_BY_TORCH_NAME = {name: code for code, (name, _) in DTYPES.items()}


def dtype_name(code: str) -> str:
    """bfloat16 for BF16: the name users know from torch."""
    return DTYPES[code][0]


def raw_dtype(code: str) -> np.dtype:
    return np.dtype(DTYPES[code][1])


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[code][0])


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype."""
    return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


def to_torch(raw: np.ndarray, code: str) -> torch.Tensor:
    """A tensor of dtype `code` over the memory of its raw bits (no copy)."""
    import torch

    return torch.from_numpy(raw).view(torch_dtype(code))


def to_raw(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as a CPU numpy array (a view when the tensor is already contiguous on the CPU)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(getattr(torch, raw_dtype(st_dtype(tensor.dtype)).name)).numpy()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * raw_dtype(self.dtype).itemsize

