"""Group-quantization kernels against a numpy reference written from the documented rule.

The reference below is the module docstring of ``groups.py`` in numpy: float16 rounding
by numpy's cast plus ``nextafter``, group minima and maxima by numpy reductions. The numba
kernels must reproduce it bit for bit, and stay within the documented bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorwire.errors import UnrepresentableValues
from tensorwire.kv.quantizers import floats, groups
from tensorwire.kv.quantizers.groups import BITS, dequantize_groups, param_shape, quantize_groups

from .test_quantizers import kv_like

# ----------------------------------------------------------------------------- reference


def f16_directed(a: np.ndarray, up: bool) -> np.ndarray:
    """float32 -> float16 rounded toward +inf (``up``) or -inf, with numpy only."""
    a = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore"):
        r = np.array(a.astype(np.float16))
        wrong = r.astype(np.float32) < a if up else r.astype(np.float32) > a
        r[wrong] = np.nextafter(r[wrong], np.float16(np.inf if up else -np.inf))
    return r


def group_slices(axis: str, t1: int, d: int, group: int):
    """(index into the parameter array, slice of the (rows, t1, d) data) for every group."""
    if axis == "token":
        for g in range(-(-d // group)):
            yield (slice(None), slice(None), g), (slice(None), slice(None), slice(g * group, (g + 1) * group))
    else:
        for g in range(-(-t1 // group)):
            yield (slice(None), g, slice(None)), (slice(None), slice(g * group, (g + 1) * group), slice(None))


def reference(x3: np.ndarray, rows: np.ndarray, t1: int, axis: str, group: int, bits: int):
    """codes (len(rows), t1, d) uint8, zero and scale (len(rows), ...) float16, decoded float32."""
    x = x3[rows, :t1]
    levels = (1 << bits) - 1
    pshape = (rows.size, *param_shape(axis, rows.size, t1, x3.shape[2], group)[1:])
    zero = np.zeros(pshape, dtype=np.float16)
    scale = np.zeros(pshape, dtype=np.float16)
    codes = np.zeros(x.shape, dtype=np.uint8)
    decoded = np.zeros(x.shape, dtype=np.float32)
    reduce_axis = 2 if axis == "token" else 1
    for p, s in group_slices(axis, t1, x3.shape[2], group):
        seg = x[s]
        lo, hi = seg.min(axis=reduce_axis), seg.max(axis=reduce_axis)
        z16 = f16_directed(lo, up=False)
        z = z16.astype(np.float32)
        ratio = ((hi.astype(np.float64) - z.astype(np.float64)) / levels).astype(np.float32)
        s16 = f16_directed(ratio, up=True)
        short = z.astype(np.float64) + levels * s16.astype(np.float64) < hi.astype(np.float64)
        s16[short] = np.nextafter(s16[short], np.float16(np.inf))
        sc = s16.astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(sc > 0, np.float32(1) / sc, np.float32(0)).astype(np.float32)
        zb, ib, sb = (np.expand_dims(a, reduce_axis) for a in (z, inv, sc))
        v = (seg - zb) * ib + np.float32(0.5)
        c = np.minimum(v, np.float32(levels)).astype(np.uint8)
        zero[p], scale[p], codes[s] = z16, s16, c
        decoded[s] = zb + c.astype(np.float32) * sb
    return codes, zero, scale, decoded


def run_kernels(x3, rows, t1, axis, group, bits):
    pshape = param_shape(axis, x3.shape[0], t1, x3.shape[2], group)
    zero = np.full(pshape, 0xFFFF, dtype=np.uint16)  # a NaN pattern: rows not quantized stay so
    scale = np.full(pshape, 0xFFFF, dtype=np.uint16)
    codes = quantize_groups(x3, rows, t1, axis, group, bits, zero, scale)
    out = np.full(x3.shape, np.nan, dtype=np.float32)
    dequantize_groups(
        codes, rows, axis, group, floats.widen(zero.view(np.float16)), floats.widen(scale.view(np.float16)), out
    )
    return codes, zero.view(np.float16), scale.view(np.float16), out


# ----------------------------------------------------------------------------- float16 rounding

AWKWARD_F32 = np.array(
    [0.0, -0.0, 1.0, -1.0, 65504.0, -65504.0, 65505.0, -65505.0, 65519.0, 65520.0, 1e5, -1e5, 3e38,
     2.0**-14, -(2.0**-14), 2.0**-24, -(2.0**-24), 2.0**-25, 3 * 2.0**-26, 1e-30, -1e-30, 1e-45, -1e-45,
     1.0000001, -1.0000001, 0.99999994, -0.99999994, 6.1e-5, -6.1e-5, 2047.9, 2048.0, 2049.0],
    dtype=np.float32,
)  # fmt: skip


@given(hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_f16_directed_rounding_matches_numpy(values):
    values = np.concatenate([values, AWKWARD_F32])
    for up in (False, True):
        got = groups.f16_round(values, up)
        want = f16_directed(values, up)
        assert got.tobytes() == want.tobytes()
        finite = np.isfinite(got)
        assert np.all(got[finite] >= values[finite]) if up else np.all(got[finite] <= values[finite])


def test_f16_rounding_of_every_float16_and_its_neighbours():
    """Every finite float16 is kept; the float32 values just beside it round to it or its neighbour."""
    every = np.arange(0x7C00, dtype=np.uint16).view(np.float16)
    every = np.concatenate([every, -every]).astype(np.float32)
    for up in (False, True):
        assert groups.f16_round(every, up).tobytes() == every.astype(np.float16).tobytes()
    for direction in (np.float32(-np.inf), np.float32(np.inf)):
        near = np.nextafter(every, direction)
        for up in (False, True):
            assert groups.f16_round(near, up).tobytes() == f16_directed(near, up).tobytes()


# ----------------------------------------------------------------------------- kernels = reference


@st.composite
def group_cases(draw):
    rows_n = draw(st.integers(1, 6))
    tokens = draw(st.sampled_from([1, 3, 32, 33, 100]) | st.integers(1, 130))
    d = draw(st.sampled_from([2, 6, 8, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["kv", "raw", "tiny", "constant"]))
    rng = np.random.default_rng(seed)
    if kind == "kv":
        x = kv_like(seed, (1, rows_n, tokens, d), draw(st.sampled_from([1.0, 1e-3, 100.0]))).reshape(rows_n, tokens, d)
    elif kind == "raw":  # arbitrary float32 bit patterns of moderate magnitude, subnormals included
        bits = rng.integers(0, 2**32, size=(rows_n, tokens, d), dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        x = np.where(np.isfinite(x) & (np.abs(x) < 1e3), x, np.float32(1.5)).astype(np.float32)
    elif kind == "tiny":
        x = (rng.standard_normal((rows_n, tokens, d)) * 1e-6).astype(np.float32)
    else:
        x = np.full((rows_n, tokens, d), np.float32(rng.choice([0.0, -0.0, 0.1, -7.3, 4097.0])), dtype=np.float32)
    t1 = draw(st.integers(0, tokens))
    rows = np.array(sorted(draw(st.sets(st.integers(0, rows_n - 1), min_size=1))), dtype=np.int64)
    axis = draw(st.sampled_from(["token", "channel"]))
    group = draw(st.sampled_from([1, 2, 3, 32, 64]) | st.integers(1, 70))
    bits = draw(st.sampled_from(BITS))
    return np.ascontiguousarray(x), rows, t1, axis, group, bits


@given(group_cases())
def test_kernels_match_reference(case):
    x3, rows, t1, axis, group, bits = case
    codes, zero, scale, out = run_kernels(x3, rows, t1, axis, group, bits)
    ref_codes, ref_zero, ref_scale, ref_out = reference(x3, rows, t1, axis, group, bits)
    assert codes.tobytes() == ref_codes.tobytes()
    # numpy's min may pick -0.0 or +0.0 among equal zeros; the values agree
    np.testing.assert_array_equal(zero[rows], ref_zero)
    assert scale[rows].tobytes() == ref_scale.tobytes()
    np.testing.assert_array_equal(out[rows, :t1], ref_out)
    others = np.setdiff1d(np.arange(x3.shape[0]), rows)
    assert np.all(np.isnan(zero[others])) and np.all(np.isnan(out[others]))  # untouched
    assert np.all(np.isnan(out[:, t1:]))


@given(group_cases())
def test_bounds_per_group(case):
    """|x̂ - x| <= s (1/2 + 2**-11) + 2**-23 max|x| with the group's own scale; and the bound on s."""
    x3, rows, t1, axis, group, bits = case
    _, zero, scale, out = run_kernels(x3, rows, t1, axis, group, bits)
    x = x3[rows, :t1].astype(np.float64)
    levels = (1 << bits) - 1
    reduce_axis = 2 if axis == "token" else 1
    for p, s in group_slices(axis, t1, x3.shape[2], group):
        seg = x[s]
        sc = scale[rows][p].astype(np.float64)
        amax = np.abs(seg).max(axis=reduce_axis)
        err = np.abs(out[rows, :t1][s] - seg).max(axis=reduce_axis)
        assert np.all(err <= sc * (0.5 + 2.0**-11) + 2.0**-23 * amax)
        lo, hi = seg.min(axis=reduce_axis), seg.max(axis=reduce_axis)
        with np.errstate(divide="ignore"):
            binade = np.where(lo != 0, np.floor(np.log2(np.abs(lo))), -30)
        ulp16 = np.exp2(np.maximum(binade, -14) - 10)
        assert np.all(sc <= ((hi - lo) + ulp16) / levels * (1 + 2.0**-10) + 2.0**-24)
        assert np.all(zero[rows][p].astype(np.float64) <= lo)


def test_every_code_is_used_on_a_ramp():
    """A linear ramp over one group uses all 2**bits codes: the scale is not wasted."""
    for bits in BITS:
        levels = (1 << bits) - 1
        x3 = np.linspace(-1.0, 3.0, 256, dtype=np.float32).reshape(1, 256, 1)
        codes, *_ = run_kernels(x3, np.array([0]), 256, "channel", 256, bits)
        assert np.unique(codes).tolist() == list(range(levels + 1))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "nan_payload"])
@pytest.mark.parametrize("where", [(0, 0, 0), (2, 99, 63), (1, 64, 33)])  # first, last (a tail group), middle
def test_non_finite_anywhere(axis, bad, where):
    x3 = kv_like(3, (1, 3, 100, 64)).reshape(3, 100, 64)
    if bad == "nan_payload":
        x3.view(np.uint32)[where] = 0xFF800001  # a negative NaN: sorts below -inf as an integer
    else:
        x3[where] = bad
    with pytest.raises(UnrepresentableValues, match="NaN|infinite"):
        run_kernels(x3, np.arange(3), 100, axis, 48, 4)
    # rows and tokens the kernel is not asked for are not read
    run_kernels(x3, np.array([r for r in range(3) if r != where[0]]), 100, axis, 48, 4)
    run_kernels(x3, np.arange(3), where[1], axis, 48, 4)


def test_overflow_status_names_the_range():
    x3 = np.zeros((1, 4, 8), dtype=np.float32)
    x3[0, 0, 0] = -1e5
    with pytest.raises(UnrepresentableValues, match=r"-100000.*65504"):
        run_kernels(x3, np.array([0]), 4, "token", 8, 2)
