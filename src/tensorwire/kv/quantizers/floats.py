"""Float-format kernels of the KV quantizers, bit-identical to ml_dtypes/numpy at memory speed.

* ``narrow`` / ``widen``: float32 <-> bfloat16 or float16 (round to nearest even), counting
  the finite values that overflow on the way (``cast`` refuses them);
* ``f8_quantize`` / ``f8_dequantize``: float32 <-> float8_e4m3fn scaled per row (``cast``);
* the float-bit constants and the numba decorator that the group kernels (``groups.py``)
  share.

numba has no scalar bit casts, so every kernel reads float bits through an int32 view of
the same array. The kernels are single-threaded and release the GIL: the pipeline runs
layers in threads.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from numba import njit

__all__ = ["f8_dequantize", "f8_quantize", "jit", "narrow", "widen"]

# error_model="numpy": a float division by zero gives inf instead of a Python-style check,
# which would keep every loop with a division from vectorizing.
jit = njit(nogil=True, cache=True, error_model="numpy")

ONE = np.float32(1.0)

EXPONENT = np.int32(0x7F800000)
MAGNITUDE = np.int32(0x7FFFFFFF)
F16_NORMAL = np.int32(0x38800000)  # float32 bits of 2**-14, the smallest normal float16
TEN_BINADES = np.int32(10 << 23)  # float16 keeps 10 of float32's 23 mantissa bits
F16_BIAS = np.int32(112 << 10)  # float32 exponent bias 127 - float16 bias 15, in float16 position
F16_INF = np.int32(0x7C00)
F16_MAX = np.float32(65504.0)


# ----------------------------------------------------------------------------- float8 (cast)
# ml_dtypes converts float8 one value at a time (about 0.2 GB/s here); these kernels give
# bit-identical results (the tests compare with ml_dtypes) at memory speed.

_F8_MAX = np.float32(448.0)  # largest float8_e4m3fn
_F8_NORMAL = np.int32(0x3C800000)  # float32 bits of 2**-6, the smallest normal float8_e4m3fn
_F8_BIAS = np.int32(120 << 3)  # float32 exponent bias 127 - float8 bias 7, in float8 position
ROUND_INT = np.float32(2.0**23)  # t + 2**23 - 2**23 rounds 0 <= t < 2**22 to an integer, ties to even
_F8_CHUNK = 1024  # values scaled into an L1-resident buffer before their bits are read


@jit
def _f8_encode(x, codes, scale):
    """Rows of ``x`` (rows, n) float32 -> float8_e4m3fn bits of ``x / scale``, one scale per row.

    ``scale = amax / 448`` in float32, one float32 step up where ``amax / scale > 448``
    (the rule of ``cast.py``); a row of zeros gets scale 0 and codes 0. Returns 1 (at once)
    if a row holds NaN or inf, else 0.
    """
    rows, n = x.shape
    xi = x.view(np.int32)
    sb = scale.view(np.int32)
    buf = np.empty(_F8_CHUNK, np.float32)
    bufb = buf.view(np.int32)
    for r in range(rows):
        row = xi[r]
        peak = np.int32(0)
        for j in range(n):
            a = np.int32(row[j] & MAGNITUDE)
            peak = a if a > peak else peak
        if peak >= EXPONENT:
            return 1
        sb[r] = peak
        amax = scale[r]
        s = amax / _F8_MAX
        scale[r] = s
        if amax / s > _F8_MAX:  # rounded down, or underflowed to 0: one float32 step up
            sb[r] += 1
        divisor = scale[r] if scale[r] > 0 else ONE
        xr = x[r]
        cr = codes[r]
        for c0 in range(0, n, _F8_CHUNK):
            m = min(_F8_CHUNK, n - c0)
            src = xr[c0 : c0 + m]
            dst = cr[c0 : c0 + m]
            for j in range(m):
                buf[j] = src[j] / divisor
            for j in range(m):
                b = bufb[j]
                a = b & MAGNITUDE
                normal = np.int32(((a + np.int32(0x7FFFF) + ((a >> 20) & 1)) >> 20) - _F8_BIAS)
                tiny = np.int32((np.abs(buf[j]) * np.float32(512.0) + ROUND_INT) - ROUND_INT)  # units of 2**-9
                code = normal if a >= _F8_NORMAL else tiny
                dst[j] = np.uint8(code | ((b >> 24) & 0x80))
    return 0


@jit
def _f8_decode(codes, scale, table, out):
    """``out[r] = table[codes[r]] * scale[r]``: float8 bits -> float32 (``table`` = the 256 values)."""
    rows, n = codes.shape
    for r in range(rows):
        s = scale[r]
        cr = codes[r]
        orow = out[r]
        for j in range(n):
            orow[j] = table[cr[j]] * s


_F8_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def f8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 (rows, n) -> (float8_e4m3fn codes (rows, n), float32 scales (rows,)); None if non-finite."""
    codes = np.empty(x.shape, dtype=np.uint8)
    scale = np.empty(x.shape[0], dtype=np.float32)
    if _f8_encode(x, codes, scale):
        return None
    return codes.view(ml_dtypes.float8_e4m3fn), scale


def f8_dequantize(codes: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`f8_quantize`: ``float32(code) * scale`` per row (into ``out`` when given)."""
    out = np.empty(codes.shape, dtype=np.float32) if out is None else out
    _f8_decode(
        np.ascontiguousarray(codes).view(np.uint8), np.ascontiguousarray(scale, dtype=np.float32), _F8_TABLE, out
    )
    return out


# ----------------------------------------------------------------------------- float casts (cast)
# numpy's float16 cast runs near 0.2 GB/s here and ml_dtypes' bfloat16 cast near 1 GB/s;
# these give the same bits (round to nearest even; the tests compare) at memory speed, and
# count the finite values that overflow to inf on the way, which ``cast`` refuses.

_BF16_ROUND = np.int32(0x7FFF)
_F16_ROUND = np.int32(0xFFF)


@jit
def _narrow(x, out, to_f16):
    """float32 -> bfloat16 (or float16 when ``to_f16``) bits in ``out``; returns how many finite values overflowed."""
    xb = x.view(np.int32)
    overflow = 0
    for j in range(x.size):
        b = xb[j]
        a = b & MAGNITUDE
        if to_f16:
            normal = np.int32(((a + _F16_ROUND + ((a >> 13) & 1)) >> 13) - F16_BIAS)
            tiny = np.int32((np.abs(x[j]) * np.float32(2.0**24) + ROUND_INT) - ROUND_INT)
            h = normal if a >= F16_NORMAL else tiny
            h = h if h < F16_INF else F16_INF
            h = h if a <= EXPONENT else np.int32(0x7E00)  # NaN stays NaN (quiet)
            sign = (b >> 16) & 0x8000
        else:
            h = np.int32((a + _BF16_ROUND + ((a >> 16) & 1)) >> 16)
            h = h if a <= EXPONENT else np.int32((a >> 16) | 0x40)  # NaN stays NaN (quiet)
            sign = (b >> 16) & 0x8000
        overflow += (a < EXPONENT) & (h == (F16_INF if to_f16 else np.int32(0x7F80)))
        out[j] = np.uint16(h | sign)
    return overflow


@jit
def _widen(h, out, from_f16):
    """bfloat16 (or float16 when ``from_f16``) bits -> float32, exactly."""
    ob = out.view(np.int32)
    for j in range(h.size):
        v = np.int32(h[j])
        sign = (v & 0x8000) << 16
        if from_f16:
            a = v & 0x7FFF
            e = a >> 10
            normal = np.int32((a << 13) + (F16_BIAS << 13))
            special = np.int32(0x7F800000 | ((a & 0x3FF) << 13))
            ob[j] = (special if e == 31 else normal) | sign
        else:
            ob[j] = v << 16
    if from_f16:  # float16 subnormals (and zeros): multiples of 2**-24
        for j in range(h.size):
            a = np.int32(h[j]) & 0x7FFF
            if a < 0x400:
                tiny = np.float32(a) * np.float32(2.0**-24)
                out[j] = -tiny if h[j] & 0x8000 else tiny


def narrow(x: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """float32 -> bfloat16 or float16 (round to nearest even) and the count of finite values that overflowed."""
    out = np.empty(x.shape, dtype=np.uint16)
    overflow = _narrow(np.ascontiguousarray(x).reshape(-1), out.reshape(-1), dtype == np.float16)
    return out.view(dtype), int(overflow)


def widen(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 or float16 -> float32 (into ``out``, C-contiguous, when given), exactly."""
    out = np.empty(h.shape, dtype=np.float32) if out is None else out
    _widen(np.ascontiguousarray(h).view(np.uint16).reshape(-1), out.reshape(-1), h.dtype == np.float16)
    return out
