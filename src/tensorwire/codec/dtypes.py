"""Dtype names (safetensors strings), their on-disk codes, and numpy/torch equivalents.

The numeric codes are part of the frame format: never renumber one, only add.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from ..errors import UnsupportedDType

__all__ = ["DTYPE_CODES", "CODE_DTYPES", "numpy_dtype", "dtype_name_of"]

DTYPE_CODES: dict[str, int] = {
    "BF16": 1, "F16": 2, "F32": 3, "F64": 4, "F8_E4M3": 5, "F8_E5M2": 6, "I8": 7, "U8": 8,
    "I16": 9, "U16": 10, "I32": 11, "U32": 12, "I64": 13, "U64": 14, "BOOL": 15,
}  # fmt: skip
CODE_DTYPES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}

_NUMPY: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "BOOL": np.dtype("bool"),
}  # fmt: skip
_BY_NUMPY: dict[np.dtype, str] = {dt: name for name, dt in _NUMPY.items()}


def numpy_dtype(name: str) -> np.dtype:
    try:
        return _NUMPY[name]
    except KeyError:
        raise UnsupportedDType(f"dtype {name!r} is not supported; expected one of {sorted(_NUMPY)}") from None


def dtype_name_of(dtype) -> str:
    """The safetensors name of a numpy dtype (byte order normalised to little-endian)."""
    try:
        return _name_of(dtype)
    except TypeError:  # unhashable dtype spec: not cacheable, still answered
        return _name_of.__wrapped__(dtype)


@functools.lru_cache(maxsize=64)  # the KV payload writer asks once per plane: ~12 us uncached
def _name_of(dtype) -> str:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise UnsupportedDType(f"big-endian dtype {dt} is not supported; convert with .astype('{dt.newbyteorder('<')}')")
    name = _BY_NUMPY.get(dt.newbyteorder("=") if dt.byteorder == "<" else dt) or _BY_NUMPY.get(dt)
    if name is None:
        raise UnsupportedDType(f"dtype {dt} is not supported; expected one of {sorted(_NUMPY)}")
    return name
