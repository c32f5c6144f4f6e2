"""``cast``: keys and values stored as a narrower float (the uncompressed baselines).

Planes, for a layer of shape ``(B, H, T, D)``::

    dtype="F32"       k, v         float32         (B, H, T, D)   bit-exact (lossless)
    dtype="BF16"      k, v         bfloat16        (B, H, T, D)
    dtype="F16"       k, v         float16         (B, H, T, D)
    dtype="F8_E4M3"   k, v         float8_e4m3fn   (B, H, T, D)   x / scale
                      k.scale,     float32         (B, H)         one scale per (batch, kv_head)
                      v.scale

BF16, F16 and F8_E4M3 round to nearest, ties to even (bit-identical to ml_dtypes and
numpy casts). For F8_E4M3, ``scale`` is ``amax / 448`` in float32 (``amax`` = the largest
``|x|`` of the head, 448 = the largest float8_e4m3fn), made one float32 step larger where
``amax / scale`` (in float32) would exceed 448, so no value saturates; the stored value is
the float32 quotient ``x / scale`` rounded to float8. A head of zeros has ``scale = 0`` and
codes 0. Decoding is ``float32(x8) * scale`` in float32.

Error bounds (``amax`` over the finite values)::

    F32       0 (bit-exact, NaN payloads included)
    BF16      2**-8  * |x| + 2**-134      (8 significant bits)
    F16       2**-11 * |x| + 2**-25       (11 significant bits)
    F8_E4M3   per head: 16 * scale * (1 + 2**-20) + 2**-23 * amax + 2**-149
              (half the float8 spacing at 448 is 16; also <= 2**-4 * |x| + 2**-10 * scale
              plus the float32 rounding, per value)

Non-finite values: F32, BF16 and F16 carry NaN and ±inf as they are (a float format can
hold them; in BF16/F16 a NaN stays a NaN of the same sign, quiet, its payload truncated).
A finite value that would round to inf (``|x| >= 65520`` for F16, ``>= 3.3962e38`` for
BF16) raises :class:`~tensorwire.errors.UnrepresentableValues` instead of
silently becoming inf. F8_E4M3 rejects NaN and ±inf the same way: float8_e4m3fn has no
infinity, and one NaN would make its head's scale NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np

from ..stage import Plane, Quantizer
from ...errors import UnrepresentableValues
from .checks import check_kv, check_shape, expect_plane, kv_buffer
from .floats import f8_dequantize, f8_quantize, narrow, widen

__all__ = ["CAST_DTYPES", "Cast"]

CAST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
_RELATIVE = {"F32": 0.0, "BF16": 2.0**-8, "F16": 2.0**-11}  # half a unit in the last place, relative
_ABSOLUTE = {"F32": 0.0, "BF16": 2.0**-134, "F16": 2.0**-25}  # half the subnormal spacing


@dataclass(frozen=True)
class Cast(Quantizer):
    """Store keys and values as ``dtype`` (``"F32"``, ``"BF16"``, ``"F16"`` or ``"F8_E4M3"``).

    Parameters
    ----------
    dtype : str
        Target float format; ``"F8_E4M3"`` adds one float32 scale per (batch, kv_head).

    Examples
    --------
    >>> import numpy as np
    >>> kv = np.random.default_rng(0).standard_normal((1, 2, 7, 64)).astype(np.float32)
    >>> q = Cast("F8_E4M3")
    >>> planes = q.quantize(0, 1, kv, kv)
    >>> planes["k"].data.dtype.name, planes["k.scale"].data.shape
    ('float8_e4m3fn', (1, 2))
    >>> k, v = q.dequantize(0, 1, planes, kv.shape)
    >>> bool(np.abs(k - kv).max() <= q.error_bound(kv, kv))
    True
    >>> Cast("F32").lossless
    True
    """

    id = "cast"
    # Offline search candidates; F32 is left out: it is the pipeline without a quantizer.
    search_space: ClassVar[dict[str, tuple]] = {"dtype": ("BF16", "F16", "F8_E4M3")}

    dtype: str = "BF16"

    def __post_init__(self) -> None:
        self.check(self.dtype in CAST_DTYPES, f"dtype must be one of {sorted(CAST_DTYPES)}, got {self.dtype!r}")

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        """True for F32: dequantize(quantize(x)) is bit-exact."""
        return self.dtype == "F32"

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        keys, values = check_kv(self.id, keys, values)
        planes: dict[str, Plane] = {}
        for prefix, x in (("k", keys), ("v", values)):
            if self.dtype == "F8_E4M3":
                data, scale = self._to_f8(prefix, x)
                planes[prefix] = Plane(data)
                planes[f"{prefix}.scale"] = Plane(scale)
            else:
                planes[prefix] = Plane(self._cast(prefix, x))
        return planes

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        shape = check_shape(self.id, shape)
        target = CAST_DTYPES[self.dtype]
        out = kv_buffer(shape)
        for x, prefix in zip(out, ("k", "v")):
            data = expect_plane(self.id, planes, prefix, target, shape)
            if self.dtype == "F8_E4M3":
                scale = expect_plane(self.id, planes, f"{prefix}.scale", np.float32, shape[:2])
                b, h, t, d = shape
                f8_dequantize(data.reshape(b * h, t * d), scale.reshape(b * h), x.reshape(b * h, t * d))
            elif self.dtype == "F32":
                x[...] = data  # a copy: callers may modify the result
            else:
                widen(data, x)
        return out[0], out[1]

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """The bound of the module docstring for these inputs (over their finite values)."""
        keys, values = check_kv(self.id, keys, values)
        if self.dtype == "F8_E4M3":
            bound = 0.0
            for prefix, x in (("k", keys), ("v", values)):
                if x.size:
                    _, scale = self._to_f8(prefix, x)
                    amax = np.abs(x).max(axis=(2, 3)).astype(np.float64)
                    bound = max(
                        bound, float(np.max(16.0 * scale.astype(np.float64) * (1 + 2.0**-20) + 2.0**-23 * amax))
                    )
            return bound + 2.0**-149
        amax = max(float(np.max(np.abs(x), where=np.isfinite(x), initial=0.0)) for x in (keys, values))
        return _RELATIVE[self.dtype] * amax + _ABSOLUTE[self.dtype]

    # ------------------------------------------------------------------ helpers

    def _cast(self, prefix: str, x: np.ndarray) -> np.ndarray:
        if self.dtype == "F32":
            return x
        y, overflow = narrow(x, CAST_DTYPES[self.dtype])
        if overflow:
            big = float(np.max(np.abs(x), where=np.isfinite(x), initial=0.0))
            raise UnrepresentableValues(
                f"stage 'cast': {'keys' if prefix == 'k' else 'values'} hold {overflow} finite value(s) up to "
                f"|x| = {big:.6g}, beyond the largest {self.dtype} "
                f"({float(ml_dtypes.finfo(CAST_DTYPES[self.dtype]).max):.6g}); a cast does not turn finite values "
                f"into inf. Use dtype={'F32' if self.dtype == 'BF16' else 'BF16'!r} (or rescale the cache)"
            )
        return y

    def _to_f8(self, prefix: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, h, t, d = x.shape
        result = f8_quantize(x.reshape(b * h, t * d))
        if result is None:
            raise UnrepresentableValues(
                f"stage 'cast' (F8_E4M3): {'keys' if prefix == 'k' else 'values'} hold "
                f"{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} infinite values; float8_e4m3fn has no "
                "infinity and a NaN would poison its head's scale. Non-finite KV comes from the model or a "
                "transform: fix it there (or use dtype='BF16', which carries NaN/inf as they are)"
            )
        codes, scale = result
        return codes.reshape(x.shape), scale.reshape(b, h)
