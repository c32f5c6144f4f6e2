"""Float-format kernels (bf16/f16 narrow and widen, scaled float8) against numpy and ml_dtypes, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorwire.kv.quantizers import floats


# ----------------------------------------------------------------------------- float8 cast


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(0, 2100)),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    st.sampled_from([1.0, 1e-40, 1e-3, 3e4, 0.0]),
)
def test_f8_kernels_match_ml_dtypes(x, magnitude):
    """Scale rule of cast.py in numpy + ml_dtypes' float8 rounding = the kernels, bit for bit."""
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(np.clip(x, -1e30, 1e30) * np.float32(magnitude), dtype=np.float32)
    x[0, : x.shape[1] // 3] = -0.0
    codes, scale = floats.f8_quantize(x)
    amax = np.abs(x).max(axis=1, initial=0.0)
    want = amax / np.float32(448)
    with np.errstate(divide="ignore", invalid="ignore"):
        short = amax / want > 448
    want[short] = np.nextafter(want[short], np.float32(np.inf))
    assert scale.tobytes() == want.tobytes()
    ref = (x / np.where(want > 0, want, np.float32(1))[:, None]).astype(ml_dtypes.float8_e4m3fn)
    assert codes.tobytes() == ref.tobytes()
    back = floats.f8_dequantize(codes, scale)
    assert back.tobytes() == (ref.astype(np.float32) * want[:, None]).tobytes()


def test_f8_rejects_non_finite():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 10), dtype=np.float32)
        x[1, 4] = bad
        assert floats.f8_quantize(x) is None


# ----------------------------------------------------------------------------- float casts

SPECIAL_F32 = np.array(
    [np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 3.38e38, 65519.0, 65520.0, -65520.0,
     1e-45, -1e-45, 2.0**-24, 3 * 2.0**-26, 2.0**-25, 5.9e-8, 1e-40, -0.0, 0.0],
    dtype=np.float32,
)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)], ids=["bf16", "f16"])
@given(hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(width=32)))
def test_narrow_and_widen_match_numpy(dtype, x):
    x = np.concatenate([x, SPECIAL_F32])
    got, overflow = floats.narrow(x, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype)
    nan = np.isnan(x)
    assert np.all(np.isnan(got[nan].astype(np.float32)))
    assert got[~nan].tobytes() == want[~nan].tobytes()
    assert overflow == int(np.sum(np.isfinite(x) & np.isinf(want.astype(np.float32))))
    back = floats.widen(got)
    assert np.all(np.isnan(back[nan]))
    assert back[~nan].tobytes() == want[~nan].astype(np.float32).tobytes()


def test_widen_every_float16_and_bfloat16():
    every = np.arange(1 << 16, dtype=np.uint16)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        h = every.view(dtype)
        want = h.astype(np.float32)
        got = floats.widen(h)
        nan = np.isnan(want)
        assert np.all(np.isnan(got[nan])) and got[~nan].tobytes() == want[~nan].tobytes()
