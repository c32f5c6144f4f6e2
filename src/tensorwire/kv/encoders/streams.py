"""What every encoder checks on the planes and streams it is given, and the float byte layout.

Array encoders get a :class:`~tensorwire.kv.stage.Plane` to encode and, to decode, the
dtype, shape and bits a payload header declares (:func:`check_request`); bytes encoders
get a declared decoded size (:func:`check_size`). Header values come from the wire, so
each is checked before anything is allocated.
"""

from __future__ import annotations

import numpy as np

from ...codec.dtypes import dtype_name_of
from ...codec.planes import DTYPE_ITEMSIZE, LAYOUTS
from ...errors import CorruptData, Truncated, UnsupportedDType
from ..stage import Plane

__all__ = [
    "as_bytes",
    "check_request",
    "check_size",
    "decode_floats",
    "encode_floats",
    "float_dtype_name",
    "plane_values",
]


def float_dtype_name(dtype) -> str:
    """The safetensors name (``"F32"``, ``"BF16"``, ...) of a float plane's dtype.

    Raises :class:`~tensorwire.errors.UnsupportedDType` for anything but the float
    dtypes the codec has a bit layout for.
    """
    try:
        name = dtype_name_of(dtype)
    except UnsupportedDType:
        name = None
    if name not in LAYOUTS:
        raise UnsupportedDType(
            f"a float plane must be one of float32, float16, bfloat16, float8_e4m3fn, float8_e5m2; got {np.dtype(dtype)}. "
            "Quantized codes are uint8 planes with bits set"
        )
    return name


def plane_values(plane: Plane) -> tuple[np.ndarray, str | None]:
    """A plane's values as a flat C-contiguous array, and its float dtype name (None for codes)."""
    if not isinstance(plane, Plane):
        raise TypeError(f"an array encoder takes a Plane, got {type(plane).__name__}")
    name = None if plane.bits is not None else float_dtype_name(plane.data.dtype)
    return np.ascontiguousarray(plane.data).reshape(-1), name


def check_request(dtype, shape, bits) -> tuple[np.dtype, str | None, tuple[int, ...], int]:
    """Check a decoder's ``(dtype, shape, bits)``; return ``(dtype, float name or None, shape, n values)``.

    These come from a payload header, so a bad value means a corrupt or foreign payload.
    """
    dtype = np.dtype(dtype)
    if bits is None:
        name = float_dtype_name(dtype)
    else:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
            raise CorruptData(f"a code plane has 1..8 bits per value, got bits={bits!r}")
        if dtype != np.uint8:
            raise UnsupportedDType(f"a code plane (bits={bits}) decodes to uint8, got dtype {dtype}")
        name = None
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise CorruptData(f"a plane shape is a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise CorruptData(f"a plane shape has no negative sizes, got {dims}")
    n = 1
    for d in dims:
        n *= d
    return dtype, name, dims, n


def check_size(size, data_size: int, max_ratio: int, codec: str) -> int:
    """Check a bytes decoder's declared ``size`` before anything is allocated.

    ``max_ratio`` is the most output bytes one input byte can produce in ``codec``'s
    format, so a size beyond ``max_ratio * data_size`` cannot be right.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise CorruptData(f"a decoded size is a non-negative int, got {size!r}")
    if size > max_ratio * data_size:
        kind = Truncated if data_size == 0 else CorruptData
        raise kind(
            f"{data_size} bytes of {codec} cannot decode to {size} bytes (at most {max_ratio}x); "
            "the payload header is corrupt"
        )
    return int(size)


def as_bytes(data) -> np.ndarray:
    """A stream (bytes, bytearray, memoryview or numpy array) as a flat uint8 array, without a copy."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def encode_floats(values: np.ndarray) -> bytes:
    """The little-endian bytes of a flat float array (dtype names are little-endian already)."""
    return values.tobytes()


def decode_floats(data, dtype: np.dtype, name: str, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Inverse of :func:`encode_floats`: a writable copy, after an exact length check."""
    buf = as_bytes(data)
    expected = n * DTYPE_ITEMSIZE[name]
    if buf.size != expected:
        kind = Truncated if buf.size < expected else CorruptData
        raise kind(
            f"{n} {name} values are {expected} bytes, the stream has {buf.size}; "
            "the payload is damaged or was written for another shape"
        )
    return buf.view(dtype).reshape(shape).copy()
