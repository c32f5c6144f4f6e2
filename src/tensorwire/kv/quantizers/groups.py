"""Group quantization, the numba kernels of ``uniform``, ``kivi``, ``headwise`` and ``layerwise``.

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

import numpy as np

from ...errors import UnrepresentableValues
from .floats import EXPONENT, F16_BIAS, F16_INF, F16_MAX, F16_NORMAL, MAGNITUDE, ONE, TEN_BINADES, jit

__all__ = [
    "AXES",
    "BITS",
    "dequantize_groups",
    "f16_round",
    "group_error_bound",
    "param_shape",
    "quantize_groups",
]

BITS = (1, 2, 3, 4, 6, 8)  # code widths a group quantizer accepts
AXES = ("token", "channel")

STATUS_OK, STATUS_NONFINITE, STATUS_OVERFLOW = 0, 1, 2
TOKEN_CHUNK = 32  # tokens whose group parameters the per-token kernel computes in one batch

_SIGN_OFF = np.int32(0x7FFFFFFF)
_F32 = np.float32
_HALF = np.float32(0.5)


# ----------------------------------------------------------------------------- float16 rounding
# Float16 parameters are computed in float32 arithmetic, 8 lanes at a time: a finite
# float32 x lies on the float16 grid of spacing q(x) = 2**(floor(log2|x|) - 10) (2**-24
# below 2**-14), so rounding toward -inf / +inf is floor(x / q) * q / ceil(x / q) * q,
# exact because q is a power of two. q comes from x's exponent bits; the bits are read
# through an int32 view of the same array (numba has no scalar bit casts).



@jit
def _round_f16(x, xb, n, up, q, qb, out):
    """``out[:n]`` = ``x[:n]`` (finite) rounded to float16 toward +inf (``up``) or -inf, as float32.

    IEEE directed rounding: beyond ±65504 the result is ±65504 when rounding toward zero
    and beyond ±65504 (an overflow the caller reports) when rounding away from zero.
    ``xb``/``qb`` are int32 views of ``x``/``q``; ``out`` may be ``x``.
    """
    for k in range(n):
        qb[k] = np.int32(max(xb[k] & EXPONENT, F16_NORMAL) - TEN_BINADES)
    # (explicit selects: numba's min/max on floats carry NaN branches that block vectorization)
    if up:
        for k in range(n):
            v = np.ceil(x[k] / q[k]) * q[k]
            out[k] = v if v > -F16_MAX else -F16_MAX
    else:
        for k in range(n):
            v = np.floor(x[k] / q[k]) * q[k]
            out[k] = v if v < F16_MAX else F16_MAX


@jit
def _f16_bits(v, vb, n, out):
    """Float16 bits of ``v[:n]`` (float32 values on the float16 grid) into ``out[:n]``.

    Magnitudes beyond 65504 become ±inf.
    """
    for k in range(n):
        a = vb[k] & MAGNITUDE
        normal = np.int32((a >> 13) - F16_BIAS)
        tiny = np.int32(np.abs(v[k]) * np.float32(2.0**24))  # float16 subnormal: a multiple of 2**-24
        h = normal if a >= F16_NORMAL else tiny
        h = h if h < F16_INF else F16_INF
        out[k] = np.uint16(h | ((vb[k] >> 16) & 0x8000))


@jit
def _params(lo, hi, lob, hib, n, levels, zero_out, scale_out, at, ws, wsb):
    """Zero and scale of ``n`` groups (rule steps 1-3 of the module docstring).

    Writes float16 bits to ``zero_out/scale_out[at:at+n]``, and float32 ``zero`` and
    ``1/scale`` to ``ws[0, :n]`` and ``ws[1, :n]``. ``ws`` is a (4, >= n) float32
    workspace and ``wsb`` its int32 view; ``lob``/``hib`` are int32 views of ``lo``/``hi``.
    Returns a status code.
    """
    worst = np.int32(0)
    for k in range(n):
        worst = max(worst, lob[k] & MAGNITUDE, hib[k] & MAGNITUDE)
    if worst >= EXPONENT:
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
                qb[k] = np.int32(max(svb[k] & EXPONENT, F16_NORMAL) - TEN_BINADES)
                sv[k] += q[k]
    over = 0
    for k in range(n):
        over += (zf[k] < -F16_MAX) | (sv[k] > F16_MAX)
        invf[k] = ONE / sv[k] if sv[k] > 0 else _F32(0.0)  # 3. a constant group has scale 0
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


@jit
def _key(u):
    """Float bits (int32) -> an int32 with the same order as the floats (NaNs beyond ±inf)."""
    return np.int32(u ^ ((u >> 31) & _SIGN_OFF))


@jit
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


@jit
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


@jit
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


@jit
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


def group_error_bound(scale: np.ndarray, x: np.ndarray) -> float:
    """The documented bound ``max(s) * (1/2 + 2**-11) + 2**-23 * max|x|`` (0 for no groups)."""
    s = float(np.max(scale.astype(np.float32), initial=0.0))
    amax = float(np.max(np.abs(x), initial=0.0))
    return s * (0.5 + 2.0**-11) + 2.0**-23 * amax
