"""The checks every KV quantizer makes on what it is given, and the buffer it decodes into."""

from __future__ import annotations

import numpy as np

from ...errors import CorruptData, ShapeMismatch, UnsupportedDType
from ..stage import Plane

__all__ = ["check_kv", "check_shape", "expect_plane", "kv_buffer"]


def kv_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """Uninitialized float32 ``(2, *shape)``: decoded keys and values share one allocation.

    One large block instead of two also keeps glibc from returning it to the system after
    each layer; freshly mapped pages cost about 2 us each on first touch on a small VM
    (measured by benchmarks/kv/quantizer_speed.py), more than decoding into them.
    """
    return np.empty((2, *shape), dtype=np.float32)


def check_kv(stage_id: str, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values as C-contiguous float32 ``(batch, kv_heads, tokens, head_dim)`` arrays."""
    for name, a in (("keys", keys), ("values", values)):
        if not isinstance(a, np.ndarray) or a.ndim != 4:
            raise ShapeMismatch(
                f"stage {stage_id!r}: {name} must be a 4-d numpy array (batch, kv_heads, tokens, head_dim), "
                f"got {type(a).__name__} with shape {getattr(a, 'shape', None)}"
            )
        if a.dtype != np.float32:
            raise UnsupportedDType(
                f"stage {stage_id!r}: {name} must be float32 (the pipeline's working dtype), got {a.dtype}; "
                "convert with .astype(np.float32)"
            )
    if keys.shape != values.shape:
        raise ShapeMismatch(
            f"stage {stage_id!r}: keys have shape {keys.shape} but values {values.shape}; they must match"
        )
    return np.ascontiguousarray(keys), np.ascontiguousarray(values)


def check_shape(stage_id: str, shape) -> tuple[int, int, int, int]:
    """``shape`` as a tuple of four non-negative ints (the layer shape given to ``dequantize``)."""
    try:
        dims = tuple(int(n) for n in shape)
        ok = len(dims) == 4 and all(n >= 0 for n in dims) and all(int(n) == n for n in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ShapeMismatch(
            f"stage {stage_id!r}: a layer shape is (batch, kv_heads, tokens, head_dim) as four non-negative "
            f"integers, got {shape!r}"
        )
    return dims  # type: ignore[return-value]


def expect_plane(
    stage_id: str, planes: dict[str, Plane], name: str, dtype: np.dtype, shape: tuple[int, ...], bits: int | None = None
) -> np.ndarray:
    """The data of plane ``name``, checked against what ``quantize`` produces for this shape."""
    plane = planes.get(name)
    if plane is None:
        raise CorruptData(
            f"stage {stage_id!r}: the payload has no plane {name!r} (it has {sorted(planes)}); "
            "it was not written by this quantizer configuration"
        )
    data = plane.data
    if data.dtype != np.dtype(dtype) or plane.bits != bits:
        raise CorruptData(
            f"stage {stage_id!r}: plane {name!r} holds {data.dtype} with bits={plane.bits}, "
            f"expected {np.dtype(dtype)} with bits={bits}; the payload was written with another configuration"
        )
    if tuple(data.shape) != tuple(shape):
        raise ShapeMismatch(
            f"stage {stage_id!r}: plane {name!r} has shape {tuple(data.shape)}, expected {tuple(shape)} "
            "for the cache shape given to dequantize"
        )
    return data
