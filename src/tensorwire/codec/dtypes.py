"""Dtype names (safetensors strings), their on-disk codes, and numpy/torch equivalents.

The numeric codes are part of the frame format: never renumber one, only add.

bf16 and fp8 numpy dtypes come from ml_dtypes, imported on first use only: its extension
takes about 0.6 s to import, a third of a small model's cold start, and decoding into
torch tensors never needs it.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from ..errors import UnsupportedDType

__all__ = ["DTYPE_CODES", "CODE_DTYPES", "numpy_dtype", "dtype_name_of"]

DTYPE_CODES: dict[str, int] = {
    "BF16": 1, "F16": 2, "F32": 3, "F64": 4, "F8_E4M3": 5, "F8_E5M2": 6, "I8": 7, "U8": 8,
    "I16": 9, "U16": 10, "I32": 11, "U32": 12, "I64": 13, "U64": 14, "BOOL": 15,
}  # fmt: skip
CODE_DTYPES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}

_PLAIN: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "BOOL": np.dtype("bool"),
}  # fmt: skip
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@functools.cache
def _all_dtypes() -> tuple[dict[str, np.dtype], dict[np.dtype, str]]:
    """Every name's numpy dtype and the reverse map (imports ml_dtypes)."""
    import ml_dtypes

    by_name = {**_PLAIN, **{name: np.dtype(getattr(ml_dtypes, attr)) for name, attr in _ML_DTYPES.items()}}
    return by_name, {dt: name for name, dt in by_name.items()}


def numpy_dtype(name: str) -> np.dtype:
    plain = _PLAIN.get(name)
    if plain is not None:
        return plain
    if name not in _ML_DTYPES:
        raise UnsupportedDType(f"dtype {name!r} is not supported; expected one of {sorted(DTYPE_CODES)}")
    return _all_dtypes()[0][name]


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
    # A bf16/fp8 dtype can only exist once ml_dtypes is imported: then the full map is free.
    by_numpy = _all_dtypes()[1] if "ml_dtypes" in sys.modules else {dt: name for name, dt in _PLAIN.items()}
    name = by_numpy.get(dt.newbyteorder("=") if dt.byteorder == "<" else dt) or by_numpy.get(dt)
    if name is None:
        raise UnsupportedDType(f"dtype {dt} is not supported; expected one of {sorted(DTYPE_CODES)}")
    return name
