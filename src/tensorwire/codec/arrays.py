"""Zero-copy conversion between torch tensors and numpy arrays of the same bytes.

The codec works on numpy arrays; torch is optional and imported only when a torch tensor
is given or asked for. bf16 and fp8 tensors become ml_dtypes arrays over the same bytes.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedDType, require
from .dtypes import dtype_name_of, numpy_dtype

__all__ = ["as_numpy", "to_numpy", "from_numpy", "torch_dtype", "TORCH_NAMES"]

TORCH_NAMES = {
    "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int8": "I8", "uint8": "U8",
    "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64",
    "uint64": "U64", "bool": "BOOL",
}  # fmt: skip


def dtype_name(tensor) -> str:
    key = str(tensor.dtype).removeprefix("torch.")
    if key not in TORCH_NAMES:
        raise UnsupportedDType(f"torch dtype {tensor.dtype} is not supported; expected one of {sorted(TORCH_NAMES)}")
    return TORCH_NAMES[key]


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name."""
    torch = require("torch")
    return getattr(torch, {v: k for k, v in TORCH_NAMES.items()}[name])


def as_numpy(value) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor; anything else through ``np.asarray``."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return to_numpy(value)
    return np.asarray(value)


def to_numpy(tensor) -> np.ndarray:
    """The tensor's values as a numpy array (bf16/float8 as ml_dtypes), sharing memory when it can."""
    torch = require("torch")
    name = dtype_name(tensor)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    itemsize = t.element_size()
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=numpy_dtype(name))
    raw = t.view(torch.uint8) if itemsize == 1 else t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize])
    return raw.numpy().view(numpy_dtype(name)).reshape(tuple(t.shape))


def from_numpy(array: np.ndarray, device: str = "cpu"):
    """A torch tensor over the array's bytes (copied only when moved to another device)."""
    torch = require("torch")
    name = dtype_name_of(array.dtype)
    target = torch_dtype(name)
    arr = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d shapes
    if arr.size == 0:
        return torch.empty(arr.shape, dtype=target, device=device)
    itemsize = arr.dtype.itemsize
    carrier = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[itemsize]
    t = torch.from_numpy(arr.view(carrier)).view(target)
    return t.to(device) if device != "cpu" else t
