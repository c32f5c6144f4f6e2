"""KV quantizer stages: layouts, round trips within the documented bounds, every error case."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorwire.errors import CorruptData, TensorwireError, UnrepresentableValues, UnsupportedDType
from tensorwire.kv.quantizers.cast import Cast
from tensorwire.kv.quantizers.headwise import HeadwiseMixed, head_scores, row_scores
from tensorwire.kv.quantizers.kivi import KIVI, kivi_split
from tensorwire.kv.quantizers.layerwise import LayerwiseBits
from tensorwire.kv.quantizers.uniform import Uniform
from tensorwire.testing.conformance import QuantizerSuite
from tensorwire.kv.stage import Plane, Quantizer, ShapeMismatch, Stage, StageConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)

# ----------------------------------------------------------------------------- test data


def kv_like(seed: int, shape: tuple[int, int, int, int], magnitude: float = 1.0) -> np.ndarray:
    """Heavy-tailed KV-like values: Student-t noise (4 dof) around per-channel offsets.

    Real key caches have a few channels of much larger magnitude, steady across tokens
    (a large offset, a somewhat larger spread); two such outlier channels per layer here.
    Clipped to +-30000 so float16 group parameters can hold them (a 1-bit group spanning
    [-30000, 30000] has scale 60000 <= 65504).
    """
    rng = np.random.default_rng(seed)
    _, h, _, d = shape
    offset = rng.standard_normal((1, h, 1, d)) * 0.5
    spread = rng.lognormal(0.0, 0.5, size=(1, h, 1, d))
    if d:
        outliers = rng.choice(d, size=min(2, d), replace=False)
        offset[..., outliers] = rng.choice([-1.0, 1.0], size=outliers.size) * rng.uniform(
            20.0, 50.0, size=outliers.size
        )
        spread[..., outliers] *= 3.0
    x = offset + spread * rng.standard_t(4, size=shape)
    return np.clip(x * magnitude, -3e4, 3e4).astype(np.float32)


SPECIALS = ("none", "zero_head", "constant", "signed_zeros", "repeated", "tiny")


@st.composite
def layers(draw, max_tokens: int = 300):
    """``(keys, values)`` of awkward shapes (1 token, 7, 300, ...) and awkward contents."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 4))
    t = draw(st.sampled_from([1, 2, 7, 31, 32, 33, 129, 300]) | st.integers(1, max_tokens))
    d = draw(st.sampled_from([2, 8, 48, 64]))
    seed = draw(st.integers(0, 2**32 - 1))
    magnitude = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    keys = kv_like(seed, (b, h, t, d), magnitude)
    values = kv_like(seed + 1, (b, h, t, d), magnitude / 4)
    special = draw(st.sampled_from(SPECIALS))
    rng = np.random.default_rng(seed)
    for x in (keys, values):
        if special == "zero_head":
            x[rng.integers(b), rng.integers(h)] = 0.0
        elif special == "constant":
            x[...] = np.float32(rng.choice([0.1, -3.3, 1000.7]))
        elif special == "signed_zeros":
            x[x < 0.5] = -0.0
            x[x > 2] = 0.0
        elif special == "repeated":
            x[:, :, :, : d // 2] = x[:, :, :, d // 2 :]
        elif special == "tiny":
            x *= np.float32(1e-30)  # float16 parameters underflow to subnormals (or zero)
    return keys, values


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


# ----------------------------------------------------------------------------- the stages

STAGES: list[Quantizer] = [
    Cast("F32"),
    Cast("BF16"),
    Cast("F16"),
    Cast("F8_E4M3"),
    Uniform(bits=1, group_size=32, axis="token"),
    Uniform(bits=3, group_size=48, axis="token"),
    Uniform(bits=8, group_size=128, axis="token"),
    Uniform(bits=2, group_size=32, axis="channel"),
    Uniform(bits=6, group_size=7, axis="channel"),
    KIVI(),
    KIVI(k_bits=4, v_bits=2, group_size=16, residual=5),
    KIVI(k_bits=8, v_bits=1, group_size=64, residual=0),
    HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.5, score="key_outlier", group_size=16, residual=8),
    HeadwiseMixed(high_bits=8, low_bits=1, high_fraction=0.3, score="variance", group_size=32, residual=0),
    LayerwiseBits(early_bits=4, late_bits=2, early_fraction=0.25, group_size=32, residual=16),
]
IDS = [f"{s.id}-{i}" for i, s in enumerate(STAGES)]


class TestQuantizerConformance(QuantizerSuite):
    stages = STAGES


def test_lossless_flag():
    assert Cast("F32").lossless is True
    assert [s.lossless for s in STAGES if not (isinstance(s, Cast) and s.dtype == "F32")] == [False] * (len(STAGES) - 1)


@settings(max_examples=25)
@pytest.mark.parametrize("stage", STAGES, ids=IDS)
@given(layer=layers(), layer_index=st.integers(0, 7))
def test_roundtrip_within_bound(stage, layer, layer_index):
    keys, values = layer
    planes = stage.quantize(layer_index, 8, keys, values)
    for name, plane in planes.items():
        assert isinstance(plane, Plane) and isinstance(name, str)
        if plane.bits is None:
            assert plane.data.dtype in (np.float32, np.float16, BF16, np.dtype(ml_dtypes.float8_e4m3fn)), name
        else:
            assert plane.data.dtype == np.uint8
            assert plane.data.size == 0 or int(plane.data.max()) < 1 << plane.bits, name
    k, v = stage.dequantize(layer_index, 8, planes, keys.shape)
    assert k.dtype == v.dtype == np.float32 and k.shape == v.shape == keys.shape
    bound = stage.error_bound(keys, values)
    if isinstance(stage, LayerwiseBits):  # the layer's own bound is at most the stage's
        assert stage.layer_quantizer(layer_index, 8).error_bound(keys, values) <= bound
    assert max(max_error(k, keys), max_error(v, values)) <= bound
    if stage.lossless:
        assert k.tobytes() == keys.tobytes() and v.tobytes() == values.tobytes()


@pytest.mark.parametrize("stage", STAGES, ids=IDS)
def test_readonly_planes_decode_the_same(stage):
    keys = kv_like(1, (2, 3, 150, 64))
    values = kv_like(2, (2, 3, 150, 64))
    planes = stage.quantize(0, 4, keys, values)
    expected = stage.dequantize(0, 4, planes, keys.shape)
    frozen = {}
    for name, p in planes.items():  # as an encoder hands them back: fresh, read-only buffers
        data = np.frombuffer(p.data.tobytes(), dtype=p.data.dtype).reshape(p.data.shape)
        frozen[name] = Plane(data, bits=p.bits)
    got = stage.dequantize(0, 4, frozen, keys.shape)
    for a, b in zip(expected, got):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("stage", STAGES, ids=IDS)
def test_empty_token_axis(stage):
    keys = np.zeros((1, 2, 0, 64), dtype=np.float32)
    planes = stage.quantize(0, 1, keys, keys)
    k, v = stage.dequantize(0, 1, planes, keys.shape)
    assert k.shape == v.shape == keys.shape


# ----------------------------------------------------------------------------- layouts


def test_uniform_layout():
    keys = kv_like(3, (2, 3, 300, 64))
    planes = Uniform(bits=4, group_size=32, axis="token").quantize(0, 1, keys, keys)
    assert planes["k.codes"].data.shape == (2, 3, 300, 64) and planes["k.codes"].bits == 4
    assert planes["k.zero"].data.shape == planes["k.scale"].data.shape == (2, 3, 300, 2)
    assert planes["v.zero"].data.dtype == np.float16
    planes = Uniform(bits=2, group_size=128, axis="channel").quantize(0, 1, keys, keys)
    assert planes["k.scale"].data.shape == (2, 3, 3, 64)  # 300 tokens: 128 + 128 + a tail of 44
    planes = Uniform(bits=2, group_size=128, axis="token").quantize(0, 1, keys, keys)
    assert planes["k.scale"].data.shape == (2, 3, 300, 1)  # group_size >= head_dim: one group per token


def test_uniform_groups_decode_as_documented():
    """x̂ = zero + code * scale with each value's own group, for both axes and a tail group."""
    keys = kv_like(4, (1, 2, 45, 8))
    for axis in ("token", "channel"):
        q = Uniform(bits=3, group_size=6, axis=axis)
        planes = q.quantize(0, 1, keys, keys)
        codes = planes["k.codes"].data.astype(np.float32)
        zero = planes["k.zero"].data.astype(np.float32)
        scale = planes["k.scale"].data.astype(np.float32)
        if axis == "token":
            zero, scale = np.repeat(zero, 6, axis=3)[..., :8], np.repeat(scale, 6, axis=3)[..., :8]
        else:
            zero, scale = np.repeat(zero, 6, axis=2)[:, :, :45], np.repeat(scale, 6, axis=2)[:, :, :45]
        k, _ = q.dequantize(0, 1, planes, keys.shape)
        assert k.tobytes() == (zero + codes * scale).tobytes()


def test_kivi_split_and_layout():
    assert kivi_split(300, 32, 128) == (160, 172)  # 172 value tokens; keys: 5 whole groups
    assert kivi_split(100, 32, 128) == (0, 0)  # shorter than the residual: nothing quantized
    assert kivi_split(128, 32, 0) == (128, 128)
    keys = kv_like(5, (1, 2, 300, 64))
    values = kv_like(6, (1, 2, 300, 64))
    q = KIVI(k_bits=2, v_bits=4, group_size=32, residual=128)
    planes = q.quantize(0, 1, keys, values)
    shapes = {name: (p.data.shape, p.data.dtype, p.bits) for name, p in planes.items()}
    assert shapes == {
        "k.codes": ((1, 2, 160, 64), np.uint8, 2),
        "k.zero": ((1, 2, 5, 64), np.float16, None),
        "k.scale": ((1, 2, 5, 64), np.float16, None),
        "k.residual": ((1, 2, 140, 64), BF16, None),
        "v.codes": ((1, 2, 172, 64), np.uint8, 4),
        "v.zero": ((1, 2, 172, 2), np.float16, None),
        "v.scale": ((1, 2, 172, 2), np.float16, None),
        "v.residual": ((1, 2, 128, 64), BF16, None),
    }
    k, v = q.dequantize(0, 1, planes, keys.shape)
    # the residual tokens come back as bfloat16 rounded them, nothing else
    assert k[:, :, 160:].tobytes() == keys[:, :, 160:].astype(BF16).astype(np.float32).tobytes()
    assert v[:, :, 172:].tobytes() == values[:, :, 172:].astype(BF16).astype(np.float32).tobytes()


def test_kivi_keys_per_channel_values_per_token():
    """KIVI's codes equal uniform's with keys per channel and values per token."""
    keys = kv_like(7, (1, 3, 64, 64))
    values = kv_like(8, (1, 3, 64, 64))
    planes = KIVI(k_bits=2, v_bits=4, group_size=32, residual=0).quantize(0, 1, keys, values)
    per_channel = Uniform(bits=2, group_size=32, axis="channel").quantize(0, 1, keys, values)
    per_token = Uniform(bits=4, group_size=32, axis="token").quantize(0, 1, keys, values)
    for name in ("codes", "zero", "scale"):
        assert planes[f"k.{name}"].data.tobytes() == per_channel[f"k.{name}"].data.tobytes()
        assert planes[f"v.{name}"].data.tobytes() == per_token[f"v.{name}"].data.tobytes()


def test_kivi_outlier_channels_hurt_per_token_keys_more():
    """Why KIVI quantizes keys per channel: with outlier channels it is far more accurate."""
    keys = kv_like(9, (1, 2, 512, 64))
    per_channel, _ = Uniform(2, 32, "channel").dequantize(
        0, 1, Uniform(2, 32, "channel").quantize(0, 1, keys, keys), keys.shape
    )
    per_token, _ = Uniform(2, 32, "token").dequantize(
        0, 1, Uniform(2, 32, "token").quantize(0, 1, keys, keys), keys.shape
    )
    assert np.mean((per_channel - keys) ** 2) < np.mean((per_token - keys) ** 2)


def test_headwise_layout_and_choice():
    keys = kv_like(10, (2, 4, 200, 64)) / 40  # mild heads ...
    values = kv_like(11, (2, 4, 200, 64))
    keys[1, 2, :, 5] *= 400  # ... but row 6 = (1, 2) has an outlier channel
    keys[0, 1, :, 9] *= 100  # ... and row 1 a smaller one
    q = HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.25, score="key_outlier", group_size=32, residual=64)
    planes = q.quantize(0, 1, keys, values)
    mask = planes["heads.high"].data
    assert planes["heads.high"].bits == 1 and mask.dtype == np.uint8 and mask.shape == (2, 4)
    assert np.flatnonzero(mask).tolist() == [1, 6]  # round(0.25 * 8) = 2 rows
    tk, tv = kivi_split(200, 32, 64)
    assert planes["k.codes.high"].data.shape == (2, tk, 64) and planes["k.codes.high"].bits == 4
    assert planes["k.codes.low"].data.shape == (6, tk, 64) and planes["k.codes.low"].bits == 2
    assert planes["v.codes.high"].data.shape == (2, tv, 64) and planes["v.codes.low"].data.shape == (6, tv, 64)
    assert planes["k.zero"].data.shape == (2, 4, tk // 32, 64)
    # the high rows are coded exactly as KIVI at high bits codes them (same zero/scale rules)
    high_kivi = KIVI(k_bits=4, v_bits=4, group_size=32, residual=64).quantize(0, 1, keys, values)
    assert planes["k.codes.high"].data.tobytes() == high_kivi["k.codes"].data.reshape(8, tk, 64)[[1, 6]].tobytes()
    k, v = q.dequantize(0, 1, planes, keys.shape)
    assert max(max_error(k, keys), max_error(v, values)) <= q.error_bound(keys, values)


def test_headwise_fraction_edges_and_ties():
    keys = np.ones((1, 4, 40, 8), dtype=np.float32)  # every score ties
    for fraction, expected in ((0.0, []), (1.0, [0, 1, 2, 3]), (0.5, [0, 1]), (0.125, [0]), (0.1, [])):
        q = HeadwiseMixed(high_bits=8, low_bits=2, high_fraction=fraction, group_size=8, residual=8)
        planes = q.quantize(0, 1, keys, keys)
        assert np.flatnonzero(planes["heads.high"].data).tolist() == expected, fraction
        k, _ = q.dequantize(0, 1, planes, keys.shape)
        assert k.tobytes() == keys.tobytes()


def test_head_scores():
    keys = kv_like(12, (1, 3, 50, 16))
    values = kv_like(13, (1, 3, 50, 16))
    keys[0, 0] = 0.0
    outlier = head_scores("key_outlier", keys, values)
    assert outlier[0] == 0.0
    assert np.allclose(outlier[1:], [np.abs(keys[0, i]).max() / np.abs(keys[0, i]).mean() for i in (1, 2)])
    variance = head_scores("variance", keys, values)
    assert np.allclose(
        variance, [keys[0, i].var(dtype=np.float64) + values[0, i].var(dtype=np.float64) for i in range(3)]
    )


def test_headwise_decoder_follows_the_mask():
    """The decoder reads the classes from heads.high, never from scores it recomputes."""
    keys = kv_like(14, (1, 4, 100, 32))
    q = HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.5, score="variance", group_size=16, residual=0)
    planes = q.quantize(0, 1, keys, keys)
    k, _ = q.dequantize(0, 1, planes, keys.shape)
    other = HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.5, score="key_outlier", group_size=16, residual=0)
    k2, _ = other.dequantize(0, 1, planes, keys.shape)
    assert k.tobytes() == k2.tobytes()


def test_layerwise_bits_per_layer():
    q = LayerwiseBits(early_bits=4, late_bits=2, early_fraction=0.25)
    assert [q.bits(i, 8) for i in range(8)] == [4, 4, 2, 2, 2, 2, 2, 2]
    assert [q.bits(i, 30) for i in range(30)].count(4) == 8  # 7.5 rounds half up
    assert [q.bits(i, 2) for i in range(2)] == [4, 2]  # 0.5 rounds half up
    assert LayerwiseBits(early_fraction=0.0).bits(0, 5) == 2
    assert LayerwiseBits(early_fraction=1.0).bits(4, 5) == 4
    keys = kv_like(15, (1, 2, 200, 64))
    early = q.quantize(0, 8, keys, keys)
    late = q.quantize(7, 8, keys, keys)
    assert early["k.codes"].bits == 4 and late["v.codes"].bits == 2
    assert early["k.codes"].data.tobytes() == KIVI(4, 4, 32, 128).quantize(0, 8, keys, keys)["k.codes"].data.tobytes()
    with pytest.raises(CorruptData):  # a late layer's planes do not decode as an early layer
        q.dequantize(0, 8, late, keys.shape)


# ----------------------------------------------------------------------------- cast


def test_cast_f32_is_bit_exact_with_nan_payloads():
    keys = kv_like(16, (1, 2, 9, 8))
    bits = keys.view(np.uint32)
    bits[0, 0, 0, :4] = [0x7FC00001, 0xFFBADBAD, 0x7F800000, 0x00000001]  # NaN payloads, inf, a subnormal
    k, v = Cast("F32").dequantize(0, 1, Cast("F32").quantize(0, 1, keys, keys), keys.shape)
    assert k.tobytes() == keys.tobytes() and v.tobytes() == keys.tobytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_cast_keeps_nan_and_inf(dtype):
    keys = kv_like(17, (1, 1, 4, 8))
    keys[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    q = Cast(dtype)
    k, _ = q.dequantize(0, 1, q.quantize(0, 1, keys, keys), keys.shape)
    assert np.isnan(k[0, 0, 0, 0]) and k[0, 0, 0, 1] == np.inf and k[0, 0, 0, 2] == -np.inf
    finite = np.isfinite(keys)
    assert max_error(k[finite], keys[finite]) <= q.error_bound(keys, keys)


def test_cast_rounds_to_nearest_even():
    keys = kv_like(18, (1, 2, 30, 64))
    for dtype, target in (("BF16", BF16), ("F16", np.float16)):
        planes = Cast(dtype).quantize(0, 1, keys, keys)
        assert planes["k"].data.tobytes() == keys.astype(target).tobytes()


def test_cast_f8_scale_and_no_saturation():
    keys = kv_like(19, (2, 3, 50, 64))
    keys[1, 2] = 0.0  # a head of zeros
    keys[0, 1] *= np.float32(1e-42)  # subnormal float32 values: amax / 448 underflows
    q = Cast("F8_E4M3")
    planes = q.quantize(0, 1, keys, keys)
    scale = planes["k.scale"].data
    assert scale.dtype == np.float32 and scale.shape == (2, 3) and scale[1, 2] == 0.0
    amax = np.abs(keys).max(axis=(2, 3))
    assert np.all(amax / np.where(scale > 0, scale, np.float32(1)) <= 448)  # in float32, as documented
    assert np.all(np.isfinite(planes["k"].data.astype(np.float32)))  # no NaN: nothing went past 448
    k, _ = q.dequantize(0, 1, planes, keys.shape)
    assert np.all(k[1, 2] == 0.0)
    assert max_error(k, keys) <= q.error_bound(keys, keys)
    # per value: 3 mantissa bits, so a relative error of at most 2**-4 above the float8
    # subnormals (heads with a normal float32 scale; float32 rounding adds < 2**-18)
    s = scale[:, :, None, None]
    big = (np.abs(keys) >= s * 2.0**-6) & (s >= np.float32(2.0**-126))
    assert big.sum() > 1000
    assert np.all(np.abs(k - keys)[big] <= 2.0**-4 * np.abs(keys)[big] * (1 + 2.0**-18))


# ----------------------------------------------------------------------------- input errors

LOSSY_CODED = [s for s in STAGES if not isinstance(s, Cast)] + [Cast("F8_E4M3")]


@pytest.mark.parametrize("stage", LOSSY_CODED, ids=lambda s: s.id)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["old", "recent"])
def test_non_finite_input_is_rejected(stage, bad, where):
    keys = kv_like(20, (1, 2, 300, 64))
    values = kv_like(21, (1, 2, 300, 64))
    values[0, 1, 3 if where == "old" else 299, 17] = bad  # quantized tokens, or the residual ones
    with pytest.raises(UnrepresentableValues, match="non-finite|NaN"):
        stage.quantize(0, 4, keys, values)
    with pytest.raises(ValueError):  # callers that only know the built-ins
        stage.error_bound(keys, values)


@pytest.mark.parametrize("stage", [s for s in STAGES if not isinstance(s, Cast)] + [Cast("F16")], ids=lambda s: s.id)
def test_values_beyond_float16_are_rejected(stage):
    keys = kv_like(22, (1, 2, 300, 64))
    keys[0, 0, 5, 3] = -7e4  # a group minimum float16 cannot hold (and beyond F16 for the cast)
    with pytest.raises(UnrepresentableValues, match="65504"):
        stage.quantize(0, 4, keys, keys)


def test_group_range_beyond_float16_scale():
    keys = np.zeros((1, 1, 4, 64), dtype=np.float32)
    keys[0, 0, :, 0] = [-4e4, 4e4, 0.0, 1e4]
    assert Uniform(bits=2, group_size=32, axis="channel").quantize(0, 1, keys, keys)["k.scale"].data.max() > 2e4
    with pytest.raises(UnrepresentableValues, match="65504"):  # 1 bit: scale 8e4
        Uniform(bits=1, group_size=32, axis="channel").quantize(0, 1, keys, keys)
    keys[0, 0, :, 0] = [6e4, 7e4, 1e5, 6.5e4]  # large but positive: zero is finite, scale small
    k, _ = Uniform(bits=4, group_size=4, axis="channel").dequantize(
        0, 1, Uniform(bits=4, group_size=4, axis="channel").quantize(0, 1, keys, keys), keys.shape
    )
    assert max_error(k, keys) <= Uniform(bits=4, group_size=4, axis="channel").error_bound(keys, keys)


def test_errors_are_tensorwire_errors():
    assert issubclass(UnrepresentableValues, TensorwireError) and issubclass(UnrepresentableValues, ValueError)


@pytest.mark.parametrize(
    "stage", [Cast("BF16"), Uniform(), KIVI(), HeadwiseMixed(), LayerwiseBits()], ids=lambda s: s.id
)
def test_bad_inputs(stage):
    good = np.zeros((1, 2, 8, 64), dtype=np.float32)
    with pytest.raises(UnsupportedDType, match="float32"):
        stage.quantize(0, 1, good.astype(np.float64), good)
    with pytest.raises(ShapeMismatch, match="4-d"):
        stage.quantize(0, 1, good[0], good[0])
    with pytest.raises(ShapeMismatch, match="must match"):
        stage.quantize(0, 1, good, good[:, :, :4])


# ----------------------------------------------------------------------------- payload errors


def _planes(stage):
    keys = kv_like(23, (1, 2, 200, 64))
    return keys.shape, stage.quantize(0, 2, keys, keys)


@pytest.mark.parametrize("stage", STAGES, ids=IDS)
def test_missing_plane(stage):
    shape, planes = _planes(stage)
    name = min(planes)
    del planes[name]
    with pytest.raises(CorruptData, match=name.replace(".", r"\.")):
        stage.dequantize(0, 2, planes, shape)


@pytest.mark.parametrize("stage", STAGES, ids=IDS)
def test_wrong_plane_dtype(stage):
    shape, planes = _planes(stage)
    name = max(planes)
    p = planes[name]
    planes[name] = Plane(p.data.astype(np.float64)) if p.bits is None else Plane(p.data, bits=p.bits % 8 + 1)
    with pytest.raises(CorruptData, match="expected"):
        stage.dequantize(0, 2, planes, shape)


@pytest.mark.parametrize("stage", STAGES, ids=IDS)
def test_wrong_shape(stage):
    shape, planes = _planes(stage)
    with pytest.raises(ShapeMismatch):
        stage.dequantize(0, 2, planes, (shape[0], shape[1], shape[2] + 1, shape[3]))
    with pytest.raises(ShapeMismatch, match="four non-negative"):
        stage.dequantize(0, 2, planes, shape[:3])


def test_headwise_mask_out_of_range():
    q = HeadwiseMixed(group_size=32, residual=16)
    shape, planes = _planes(q)
    planes["heads.high"] = Plane(np.full((1, 2), 2, dtype=np.uint8), bits=2)
    with pytest.raises(CorruptData):
        q.dequantize(0, 2, planes, shape)
    planes["heads.high"] = Plane(np.array([[1, 1]], dtype=np.uint8), bits=1)  # not the rows the codes were for
    with pytest.raises(ShapeMismatch):
        q.dequantize(0, 2, planes, shape)


def test_mixed_bits_are_kivi_per_layer():
    from tensorwire.kv.quantizers.mixed import MixedBits

    q = MixedBits(k_bits=(4, 2, 8), v_bits=(3, 6, 1), group_size=16, residual=4)
    keys, values = kv_like(16, (1, 2, 120, 64)), kv_like(17, (1, 2, 120, 64))
    for layer in range(3):
        kivi = KIVI(k_bits=q.k_bits[layer], v_bits=q.v_bits[layer], group_size=16, residual=4)
        planes = q.quantize(layer, 3, keys, values)
        assert planes["k.codes"].bits == q.k_bits[layer] and planes["v.codes"].bits == q.v_bits[layer]
        assert all(planes[n].data.tobytes() == p.data.tobytes() for n, p in kivi.quantize(layer, 3, keys, values).items())
        k, v = q.dequantize(layer, 3, planes, keys.shape)
        assert max(max_error(k, keys), max_error(v, values)) <= q.error_bound(keys, values)
    with pytest.raises(ShapeMismatch, match="widths for 3 layers, this cache has 4"):
        q.quantize(0, 4, keys, values)  # allocated for another model: refused, never shifted


def test_layerwise_layer_out_of_range():
    q = LayerwiseBits()
    for layer, n in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ShapeMismatch, match="layer_index"):
            q.bits(layer, n)


# ----------------------------------------------------------------------------- config errors

BAD_CONFIGS = [
    ("cast", {"dtype": "F8_E5M2"}, "dtype"),
    ("cast", {"dtype": "bf16"}, "dtype"),
    ("uniform", {"bits": 5}, "bits"),
    ("uniform", {"bits": "4"}, "bits"),
    ("uniform", {"bits": True}, "bits"),
    ("uniform", {"group_size": 0}, "group_size"),
    ("uniform", {"group_size": 2.5}, "group_size"),
    ("uniform", {"axis": "head"}, "axis"),
    ("uniform", {"scale_dtype": "F32"}, "no parameter"),
    ("kivi", {"k_bits": 0}, "k_bits"),
    ("kivi", {"v_bits": 16}, "v_bits"),
    ("kivi", {"residual": -1}, "residual"),
    ("kivi", {"group_size": -32}, "group_size"),
    ("headwise", {"high_bits": 2, "low_bits": 4}, "high_bits"),
    ("headwise", {"high_fraction": 1.5}, "high_fraction"),
    ("headwise", {"high_fraction": True}, "high_fraction"),
    ("headwise", {"score": "entropy"}, "score"),
    ("headwise", {"residual": 1.0}, "residual"),
    ("layerwise", {"early_bits": 2, "late_bits": 4}, "early_bits"),
    ("layerwise", {"early_fraction": -0.1}, "early_fraction"),
    ("layerwise", {"late_bits": 7}, "late_bits"),
    ("mixed", {"k_bits": [], "v_bits": []}, "one width per layer"),
    ("mixed", {"k_bits": [4, 5], "v_bits": [4, 4]}, "k_bits"),
    ("mixed", {"k_bits": [4, 4], "v_bits": [4]}, "same layers"),
    ("mixed", {"k_bits": 4, "v_bits": [4]}, "one width per layer"),
]


@pytest.mark.parametrize("stage_id,params,match", BAD_CONFIGS)
def test_bad_config(stage_id, params, match):
    with pytest.raises(StageConfigError, match=match):
        Stage.from_config({"id": stage_id, **params})


def test_row_scores():
    x = kv_like(30, (1, 5, 40, 16)).reshape(5, -1)
    x[2] = 0.0
    peak, mean = np.abs(x).max(axis=1), np.abs(x).mean(axis=1, dtype=np.float64)
    np.testing.assert_allclose(
        row_scores(x, False), np.where(mean > 0, peak / np.maximum(mean, 1e-300), 0), rtol=1e-12
    )
    np.testing.assert_allclose(row_scores(x, True), x.var(axis=1, dtype=np.float64), rtol=1e-10)
