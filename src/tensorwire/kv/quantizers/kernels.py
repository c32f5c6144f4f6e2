"""Shared numba kernels of the KV quantizers, and the checks they all make.

* group quantization (``uniform``, ``kivi``, ``headwise``, ``layerwise``): below;
* float casts to bfloat16, float16 and scaled float8_e4m3fn (``cast``), bit-identical to
  ml_dtypes/numpy but at memory speed;
* head scores (``headwise``).

One layer's keys (or values) arrive as a C-contiguous float32 array viewed as
``(rows, tokens, head_dim)``, a row being one ``(batch, kv_head)`` pair. A kernel call
quantizes the first ``t1`` tokens of the rows listed in ``heads`` (KIVI keeps the most
recent tokens aside, and the head-wise quantizer gives different heads different bits).

Groups (the unit that shares one zero point and one scale):

* ``axis="token"``: ``group`` consecutive channels of one token; a token's ``head_dim``
  channels split into ``ceil(head_dim / group)`` groups, the last one shorter when
  ``group`` does not divide ``head_dim``. Parameters: ``(rows, t1, ceil(head_dim/group))``.
* ``axis="channel"``: ``group`` consecutive tokens of one channel; ``t1`` tokens split into
  ``ceil(t1 / group)`` groups, the last one shorter. Parameters:
  ``(rows, ceil(t1/group), head_dim)``.

The rule, for a group with minimum ``lo``, maximum ``hi`` and ``L = 2**bits - 1`` levels
(every step is exact IEEE arithmetic, so the numpy reference in the tests reproduces the
kernels bit for bit):

1. ``zero = f16_down(lo)``: ``lo`` rounded toward -inf to float16, so ``zero <= lo``.
2. ``scale = f16_up(float32((float64(hi) - float64(zero)) / L))``, and one float16 step
   larger if still ``float64(zero) + L * float64(scale) < float64(hi)``: the codes cover
   ``[zero, zero + L*scale] ⊇ [lo, hi]``, so no value is clipped.
3. ``inv = float32(1) / scale`` (0 when ``scale == 0``, a constant group) and
   ``code = uint8(min((x - zero) * inv + 0.5, L))`` in float32: round half up.
4. Decoding: ``x̂ = zero + float32(code) * scale`` in float32.

Error bound (per group, ``s`` = the stored float16 scale)::

    |x̂ - x| <= s * (1/2 + 2**-11) + 2**-23 * max|x|

The ``1/2`` is the rounding of the code; ``2**-11`` covers the float32 rounding of
``(x - zero) * inv + 0.5`` (at most ``6.2e-5`` code steps for ``L <= 255``), the last term
the float32 rounding of the decode. Rounding the parameters to float16 costs nothing
beyond that: it is already inside ``s``, which is at most
``((hi - lo) + ulp16(lo)) / L * (1 + 2**-10) + 2**-24`` (``ulp16(lo)`` = the float16
spacing in the binade of ``|lo|``, at least ``2**-24``; the last term is the float16
subnormal spacing, for tiny ranges).

Float16 parameters bound what can be quantized: a group needs ``lo >= -65504`` (so that
``zero`` is finite) and a finite float16 ``scale`` (about ``(hi - zero) / L <= 65504``).
NaN and ±inf cannot be coded at all. Both raise :class:`UnrepresentableValues`. The
minimum and maximum are taken over the float bits mapped to ordered integers
(``u ^ ((u >> 31) & 0x7fffffff)``): integer min/max vectorize without fast-math, and NaNs
sort beyond the infinities, so a NaN cannot hide in a group.

The kernels are single-threaded and release the GIL: the pipeline runs layers in threads.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from numba import njit

from ...errors import CorruptData, UnrepresentableValues, UnsupportedDType
from ..stage import Plane, ShapeMismatch

__all__ = [
    "AXES",
    "BITS",
    "UnrepresentableValues",
    "check_kv",
    "check_shape",
    "dequantize_groups",
    "expect_plane",
    "f8_dequantize",
    "f8_quantize",
    "f16_round",
    "group_error_bound",
    "kv_buffer",
    "narrow",
    "param_shape",
    "quantize_groups",
    "row_scores",
    "widen",
]

BITS = (1, 2, 3, 4, 6, 8)  # code widths a group quantizer accepts
AXES = ("token", "channel")

STATUS_OK, STATUS_NONFINITE, STATUS_OVERFLOW = 0, 1, 2
TOKEN_CHUNK = 32  # tokens whose group parameters the per-token kernel computes in one batch

# error_model="numpy": a float division by zero gives inf instead of a Python-style check,
# which would keep every loop with a division from vectorizing.
_jit = njit(nogil=True, cache=True, error_model="numpy")

_SIGN_OFF = np.int32(0x7FFFFFFF)
_F32 = np.float32
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


# ----------------------------------------------------------------------------- float16 rounding
# Float16 parameters are computed in float32 arithmetic, 8 lanes at a time: a finite
# float32 x lies on the float16 grid of spacing q(x) = 2**(floor(log2|x|) - 10) (2**-24
# below 2**-14), so rounding toward -inf / +inf is floor(x / q) * q / ceil(x / q) * q,
# exact because q is a power of two. q comes from x's exponent bits; the bits are read
# through an int32 view of the same array (numba has no scalar bit casts).

_EXPONENT = np.int32(0x7F800000)
_MAGNITUDE = np.int32(0x7FFFFFFF)
_F16_NORMAL = np.int32(0x38800000)  # float32 bits of 2**-14, the smallest normal float16
_TEN_BINADES = np.int32(10 << 23)  # float16 keeps 10 of float32's 23 mantissa bits
_F16_BIAS = np.int32(112 << 10)  # float32 exponent bias 127 - float16 bias 15, in float16 position
_F16_INF = np.int32(0x7C00)
_F16_MAX = np.float32(65504.0)


@_jit
def _round_f16(x, xb, n, up, q, qb, out):
    """``out[:n]`` = ``x[:n]`` (finite) rounded to float16 toward +inf (``up``) or -inf, as float32.

    IEEE directed rounding: beyond ±65504 the result is ±65504 when rounding toward zero
    and beyond ±65504 (an overflow the caller reports) when rounding away from zero.
    ``xb``/``qb`` are int32 views of ``x``/``q``; ``out`` may be ``x``.
    """
    for k in range(n):
        qb[k] = np.int32(max(xb[k] & _EXPONENT, _F16_NORMAL) - _TEN_BINADES)
    # (explicit selects: numba's min/max on floats carry NaN branches that block vectorization)
    if up:
        for k in range(n):
            v = np.ceil(x[k] / q[k]) * q[k]
            out[k] = v if v > -_F16_MAX else -_F16_MAX
    else:
        for k in range(n):
            v = np.floor(x[k] / q[k]) * q[k]
            out[k] = v if v < _F16_MAX else _F16_MAX


@_jit
def _f16_bits(v, vb, n, out):
    """Float16 bits of ``v[:n]`` (float32 values on the float16 grid) into ``out[:n]``.

    Magnitudes beyond 65504 become ±inf.
    """
    for k in range(n):
        a = vb[k] & _MAGNITUDE
        normal = np.int32((a >> 13) - _F16_BIAS)
        tiny = np.int32(np.abs(v[k]) * np.float32(2.0**24))  # float16 subnormal: a multiple of 2**-24
        h = normal if a >= _F16_NORMAL else tiny
        h = h if h < _F16_INF else _F16_INF
        out[k] = np.uint16(h | ((vb[k] >> 16) & 0x8000))


@_jit
def _params(lo, hi, lob, hib, n, levels, zero_out, scale_out, at, ws, wsb):
    """Zero and scale of ``n`` groups (rule steps 1-3 of the module docstring).

    Writes float16 bits to ``zero_out/scale_out[at:at+n]``, and float32 ``zero`` and
    ``1/scale`` to ``ws[0, :n]`` and ``ws[1, :n]``. ``ws`` is a (4, >= n) float32
    workspace and ``wsb`` its int32 view; ``lob``/``hib`` are int32 views of ``lo``/``hi``.
    Returns a status code.
    """
    worst = np.int32(0)
    for k in range(n):
        worst = max(worst, lob[k] & _MAGNITUDE, hib[k] & _MAGNITUDE)
    if worst >= _EXPONENT:
        return STATUS_NONFINITE
    zf, invf, sv, q = ws[0], ws[1], ws[2], ws[3]
    zfb, svb, qb = wsb[0], wsb[2], wsb[3]
    big_l = np.float64(levels)
    _round_f16(lo, lob, n, False, q, qb, zf)  # 1. zero
    for k in range(n):
        sv[k] = np.float32((np.float64(hi[k]) - np.float64(zf[k])) / big_l)
    _round_f16(sv, svb, n, True, q, qb, sv)  # 2. scale
    short = 0
    for k in range(n):
        short += np.float64(zf[k]) + big_l * np.float64(sv[k]) < np.float64(hi[k])
    if short:  # the float32 rounding of the ratio fell short: one float16 step up (rare)
        for k in range(n):
            if np.float64(zf[k]) + big_l * np.float64(sv[k]) < np.float64(hi[k]):
                qb[k] = np.int32(max(svb[k] & _EXPONENT, _F16_NORMAL) - _TEN_BINADES)
                sv[k] += q[k]
    over = 0
    for k in range(n):
        over += (zf[k] < -_F16_MAX) | (sv[k] > _F16_MAX)
        invf[k] = _ONE / sv[k] if sv[k] > 0 else _F32(0.0)  # 3. a constant group has scale 0
    _f16_bits(zf, zfb, n, zero_out[at : at + n])  # (a slice: an offset index would add a
    _f16_bits(sv, svb, n, scale_out[at : at + n])  # wrap-around check per element)
    return STATUS_OVERFLOW if over else STATUS_OK


def f16_round(x: np.ndarray, up: bool) -> np.ndarray:
    """Finite float32 values rounded to float16 toward +inf (``up``) or -inf: the kernels' rule."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    q = np.empty_like(x)
    out = np.empty_like(x)
    bits = np.empty(x.size, dtype=np.uint16)
    _round_f16(x, x.view(np.int32), x.size, up, q, q.view(np.int32), out)
    _f16_bits(out, out.view(np.int32), x.size, bits)
    return bits.view(np.float16)


# ----------------------------------------------------------------------------- kernels
# Hot loops index flat arrays with unsigned (uint64) offsets: numba adds a negative-index
# wrap-around to every signed index, and a view per row costs a reference count; both kept
# these loops from vectorizing (measured 2-4x slower). Index arithmetic stays in uint64
# (mixing uint64 with int64 gives float64 in numba).


@_jit
def _key(u):
    """Float bits (int32) -> an int32 with the same order as the floats (NaNs beyond ±inf)."""
    return np.int32(u ^ ((u >> 31) & _SIGN_OFF))


@_jit
def _quantize_tokens(x, heads, t1, group, levels, codes, zero, scale):
    """Per-token groups. x (rows, T, D) f32; codes (len(heads), t1, D) u8; zero/scale (rows, t1, G) u16."""
    tokens, d = x.shape[1], x.shape[2]
    n_groups = (d + group - 1) // group
    top = _F32(levels)
    xf = x.reshape(-1)
    xi = xf.view(np.int32)
    cf = codes.reshape(-1)
    zero_flat = zero.reshape(-1)
    scale_flat = scale.reshape(-1)
    width = TOKEN_CHUNK * n_groups
    lo = np.empty(width, np.float32)
    hi = np.empty(width, np.float32)
    lob = lo.view(np.int32)
    hib = hi.view(np.int32)
    ws = np.empty((4, width), np.float32)
    wsb = ws.view(np.int32)
    zf, invf = ws[0], ws[1]
    status = STATUS_OK
    for i in range(heads.size):
        r = heads[i]
        for t0 in range(0, t1, TOKEN_CHUNK):
            tc = min(TOKEN_CHUNK, t1 - t0)
            # pass 1: min and max of every group of the chunk, on order-preserving integer keys
            for tt in range(tc):
                row = (r * tokens + t0 + tt) * d
                for g in range(n_groups):
                    a = np.uint64(row + g * group)
                    b = np.uint64(row + min(g * group + group, d))
                    kmin = np.int32(0x7FFFFFFF)
                    kmax = np.int32(-0x80000000)
                    for j in range(a, b):
                        key = _key(xi[j])
                        kmin = min(kmin, key)
                        kmax = max(kmax, key)
                    lob[tt * n_groups + g] = _key(kmin)
                    hib[tt * n_groups + g] = _key(kmax)
            at = (r * t1 + t0) * n_groups
            found = _params(lo, hi, lob, hib, tc * n_groups, levels, zero_flat, scale_flat, at, ws, wsb)
            if found == STATUS_NONFINITE:
                return found
            status = max(status, found)
            # pass 2: the codes (the chunk is still in cache)
            for tt in range(tc):
                row = (r * tokens + t0 + tt) * d
                crow = (i * t1 + t0 + tt) * d
                for g in range(n_groups):
                    z = zf[tt * n_groups + g]
                    inv = invf[tt * n_groups + g]
                    a = np.uint64(row + g * group)
                    ca = np.uint64(crow + g * group)
                    n = np.uint64(min(group, d - g * group))
                    for j in range(n):
                        v = (xf[a + j] - z) * inv + _HALF
                        cf[ca + j] = np.uint8(v if v < top else top)
    return status


@_jit
def _quantize_channels(x, heads, t1, group, levels, codes, zero, scale):
    """Per-channel groups. x (rows, T, D) f32; codes (len(heads), t1, D) u8;
    zero/scale (rows, ceil(t1/group), D) u16."""
    tokens, d = x.shape[1], x.shape[2]
    n_groups = (t1 + group - 1) // group
    top = _F32(levels)
    xf = x.reshape(-1)
    xi = xf.view(np.int32)
    cf = codes.reshape(-1)
    zero_flat = zero.reshape(-1)
    scale_flat = scale.reshape(-1)
    kmin = np.empty(d, np.int32)
    kmax = np.empty(d, np.int32)
    lo = np.empty(d, np.float32)
    hi = np.empty(d, np.float32)
    lob = lo.view(np.int32)
    hib = hi.view(np.int32)
    ws = np.empty((4, d), np.float32)
    wsb = ws.view(np.int32)
    zf, invf = ws[0], ws[1]
    ud = np.uint64(d)
    status = STATUS_OK
    for i in range(heads.size):
        r = heads[i]
        for g in range(n_groups):
            a = g * group
            b = min(a + group, t1)
            kmin[:] = 0x7FFFFFFF
            kmax[:] = -0x80000000
            # pass 1: element-wise over channels, so every statement is a vector operation
            for t in range(a, b):
                row = np.uint64((r * tokens + t) * d)
                for c in range(ud):
                    key = _key(xi[row + c])
                    kmin[c] = min(kmin[c], key)
                    kmax[c] = max(kmax[c], key)
            for c in range(ud):
                lob[c] = _key(kmin[c])
                hib[c] = _key(kmax[c])
            at = (r * n_groups + g) * d
            found = _params(lo, hi, lob, hib, d, levels, zero_flat, scale_flat, at, ws, wsb)
            if found == STATUS_NONFINITE:
                return found
            status = max(status, found)
            # pass 2: the group's group*D block is still in L1
            for t in range(a, b):
                row = np.uint64((r * tokens + t) * d)
                crow = np.uint64((i * t1 + t) * d)
                for c in range(ud):
                    v = (xf[row + c] - zf[c]) * invf[c] + _HALF
                    cf[crow + c] = np.uint8(v if v < top else top)
    return status


@_jit
def _dequantize_tokens(codes, heads, group, zero, scale, out):
    """Inverse of ``_quantize_tokens``: writes ``out[heads[i], :t1]``; zero/scale are float32."""
    t1, d = codes.shape[1], codes.shape[2]
    tokens = out.shape[1]
    n_groups = (d + group - 1) // group
    cf = codes.reshape(-1)
    of = out.reshape(-1)
    zero_flat = zero.reshape(-1)
    scale_flat = scale.reshape(-1)
    for i in range(heads.size):
        r = heads[i]
        for t in range(t1):
            crow = (i * t1 + t) * d
            orow = (r * tokens + t) * d
            prow = (r * t1 + t) * n_groups
            for g in range(n_groups):
                z = zero_flat[prow + g]
                s = scale_flat[prow + g]
                ca = np.uint64(crow + g * group)
                oa = np.uint64(orow + g * group)
                n = np.uint64(min(group, d - g * group))
                for j in range(n):
                    of[oa + j] = z + _F32(cf[ca + j]) * s


@_jit
def _dequantize_channels(codes, heads, group, zero, scale, out):
    """Inverse of ``_quantize_channels``: writes ``out[heads[i], :t1]``; zero/scale are float32."""
    t1, d = codes.shape[1], codes.shape[2]
    tokens = out.shape[1]
    n_groups = (t1 + group - 1) // group
    cf = codes.reshape(-1)
    of = out.reshape(-1)
    zero_flat = zero.reshape(-1)
    scale_flat = scale.reshape(-1)
    ud = np.uint64(d)
    for i in range(heads.size):
        r = heads[i]
        for t in range(t1):
            ca = np.uint64((i * t1 + t) * d)
            oa = np.uint64((r * tokens + t) * d)
            pa = np.uint64((r * n_groups + t // group) * d)
            for c in range(ud):
                of[oa + c] = zero_flat[pa + c] + _F32(cf[ca + c]) * scale_flat[pa + c]


# ----------------------------------------------------------------------------- float8 (cast)
# ml_dtypes converts float8 one value at a time (about 0.2 GB/s here); these kernels give
# bit-identical results (the tests compare with ml_dtypes) at memory speed.

_F8_MAX = np.float32(448.0)  # largest float8_e4m3fn
_F8_NORMAL = np.int32(0x3C800000)  # float32 bits of 2**-6, the smallest normal float8_e4m3fn
_F8_BIAS = np.int32(120 << 3)  # float32 exponent bias 127 - float8 bias 7, in float8 position
_ROUND_INT = np.float32(2.0**23)  # t + 2**23 - 2**23 rounds 0 <= t < 2**22 to an integer, ties to even
_F8_CHUNK = 1024  # values scaled into an L1-resident buffer before their bits are read


@_jit
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
            a = np.int32(row[j] & _MAGNITUDE)
            peak = a if a > peak else peak
        if peak >= _EXPONENT:
            return 1
        sb[r] = peak
        amax = scale[r]
        s = amax / _F8_MAX
        scale[r] = s
        if amax / s > _F8_MAX:  # rounded down, or underflowed to 0: one float32 step up
            sb[r] += 1
        divisor = scale[r] if scale[r] > 0 else _ONE
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
                a = b & _MAGNITUDE
                normal = np.int32(((a + np.int32(0x7FFFF) + ((a >> 20) & 1)) >> 20) - _F8_BIAS)
                tiny = np.int32((np.abs(buf[j]) * np.float32(512.0) + _ROUND_INT) - _ROUND_INT)  # units of 2**-9
                code = normal if a >= _F8_NORMAL else tiny
                dst[j] = np.uint8(code | ((b >> 24) & 0x80))
    return 0


@_jit
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


@_jit
def _narrow(x, out, to_f16):
    """float32 -> bfloat16 (or float16 when ``to_f16``) bits in ``out``; returns how many finite values overflowed."""
    xb = x.view(np.int32)
    overflow = 0
    for j in range(x.size):
        b = xb[j]
        a = b & _MAGNITUDE
        if to_f16:
            normal = np.int32(((a + _F16_ROUND + ((a >> 13) & 1)) >> 13) - _F16_BIAS)
            tiny = np.int32((np.abs(x[j]) * np.float32(2.0**24) + _ROUND_INT) - _ROUND_INT)
            h = normal if a >= _F16_NORMAL else tiny
            h = h if h < _F16_INF else _F16_INF
            h = h if a <= _EXPONENT else np.int32(0x7E00)  # NaN stays NaN (quiet)
            sign = (b >> 16) & 0x8000
        else:
            h = np.int32((a + _BF16_ROUND + ((a >> 16) & 1)) >> 16)
            h = h if a <= _EXPONENT else np.int32((a >> 16) | 0x40)  # NaN stays NaN (quiet)
            sign = (b >> 16) & 0x8000
        overflow += (a < _EXPONENT) & (h == (_F16_INF if to_f16 else np.int32(0x7F80)))
        out[j] = np.uint16(h | sign)
    return overflow


@_jit
def _widen(h, out, from_f16):
    """bfloat16 (or float16 when ``from_f16``) bits -> float32, exactly."""
    ob = out.view(np.int32)
    for j in range(h.size):
        v = np.int32(h[j])
        sign = (v & 0x8000) << 16
        if from_f16:
            a = v & 0x7FFF
            e = a >> 10
            normal = np.int32((a << 13) + (_F16_BIAS << 13))
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


# ----------------------------------------------------------------------------- head scores (headwise)


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})
def _row_scores(x, variance, out):
    """Per row of ``x`` (rows, n): ``max|x| / mean|x|`` (0 for a row of zeros), or the variance.

    Sums run in float64 and may be reassociated (vectorized): the scores only rank heads,
    and the decoder never recomputes them.
    """
    rows, n = x.shape
    word = np.empty(1, np.int32)  # to read the largest magnitude's bits back as a float
    for r in range(rows):
        row = x[r]
        if variance:
            total = 0.0
            for j in range(n):
                total += np.float64(row[j])
            mean = total / n
            squares = 0.0
            for j in range(n):
                dev = np.float64(row[j]) - mean
                squares += dev * dev
            out[r] = squares / n
        else:
            bits = row.view(np.int32)
            peak = np.int32(0)
            total = 0.0
            for j in range(n):
                a = np.int32(bits[j] & _MAGNITUDE)
                peak = a if a > peak else peak
                total += np.abs(np.float64(row[j]))
            word[0] = peak
            out[r] = np.float64(word.view(np.float32)[0]) / (total / n) if total > 0 else 0.0


def row_scores(x: np.ndarray, variance: bool) -> np.ndarray:
    """float64 score per row of a (rows, n) float32 array (see ``_row_scores``)."""
    out = np.zeros(x.shape[0], dtype=np.float64)
    _row_scores(np.ascontiguousarray(x), variance, out)
    return out


# ----------------------------------------------------------------------------- numpy glue


def param_shape(axis: str, rows: int, t1: int, head_dim: int, group: int) -> tuple[int, int, int]:
    """Shape of the zero and scale arrays of ``rows`` rows whose first ``t1`` tokens are quantized."""
    if axis == "token":
        return (rows, t1, -(-head_dim // group))
    return (rows, -(-t1 // group), head_dim)


def quantize_groups(
    x: np.ndarray,
    heads: np.ndarray,
    t1: int,
    axis: str,
    group: int,
    bits: int,
    zero: np.ndarray,
    scale: np.ndarray,
) -> np.ndarray:
    """Quantize tokens ``[0, t1)`` of rows ``heads`` of ``x`` (rows, tokens, head_dim).

    ``zero`` and ``scale`` are uint16 arrays of :func:`param_shape` that receive the
    float16 bits of the rows' parameters (other rows are left alone, so several calls with
    different ``bits`` can fill one pair). Returns the uint8 codes, shape
    ``(len(heads), t1, head_dim)``. Raises :class:`UnrepresentableValues`.
    """
    codes = np.empty((heads.size, t1, x.shape[2]), dtype=np.uint8)
    kernel = _quantize_tokens if axis == "token" else _quantize_channels
    status = kernel(x, heads, t1, group, (1 << bits) - 1, codes, zero, scale)
    if status != STATUS_OK:
        part = x[heads, :t1]
        if status == STATUS_NONFINITE:
            raise UnrepresentableValues(
                f"found {int(np.isnan(part).sum())} NaN and {int(np.isinf(part).sum())} infinite values in the "
                "keys/values to quantize; a quantizer codes finite numbers only. Non-finite KV comes from the model "
                "or a transform: fix it there (or use the 'cast' quantizer, which carries NaN/inf as they are)"
            )
        raise UnrepresentableValues(
            f"keys/values span [{float(part.min()):.6g}, {float(part.max()):.6g}]: beyond what float16 group "
            f"parameters hold (a group's minimum >= -65504 and (max - min) / {(1 << bits) - 1} <= 65504 at "
            f"{bits} bits); use the 'cast' quantizer with BF16 or F32, more bits, or a transform that rescales "
            "the cache"
        )
    return codes


def dequantize_groups(
    codes: np.ndarray, heads: np.ndarray, axis: str, group: int, zero: np.ndarray, scale: np.ndarray, out: np.ndarray
) -> None:
    """Decode ``codes`` into ``out[heads, :t1]``; ``zero``/``scale`` as float32 (see :func:`widen`)."""
    kernel = _dequantize_tokens if axis == "token" else _dequantize_channels
    kernel(np.ascontiguousarray(codes), heads, group, zero, scale, out)


def kv_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """Uninitialized float32 ``(2, *shape)``: decoded keys and values share one allocation.

    One large block instead of two also keeps glibc from returning it to the system after
    each layer; freshly mapped pages cost about 2 us each on first touch on a small VM
    (measured by benchmarks/kv/quantizer_speed.py), more than decoding into them.
    """
    return np.empty((2, *shape), dtype=np.float32)


def group_error_bound(scale: np.ndarray, x: np.ndarray) -> float:
    """The documented bound ``max(s) * (1/2 + 2**-11) + 2**-23 * max|x|`` (0 for no groups)."""
    s = float(np.max(scale.astype(np.float32), initial=0.0))
    amax = float(np.max(np.abs(x), initial=0.0))
    return s * (0.5 + 2.0**-11) + 2.0**-23 * amax


# ----------------------------------------------------------------------------- checks


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
