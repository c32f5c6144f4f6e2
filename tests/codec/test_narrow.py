"""Mode 3 (narrow): values with zero low mantissa bits, coded as a narrower float, and its errors."""

import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.codec import blocks
from tensorwire.codec.chunks import decode_chunk, encode_chunk
from tensorwire.codec.planes import LAYOUTS, narrow_shifts, narrowed
from tensorwire.errors import CorruptData, FormatError, Truncated
from tensorwire.testing.strategies import awkward_values, weight_like

SHIFTS = {name: list(narrow_shifts(layout)) for name, layout in LAYOUTS.items()}


def upcast(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Words of a checkpoint cast up from bf16: f32 (16 zero bits) or f16 (3, except subnormals)."""
    bf16 = weight_like(LAYOUTS["BF16"], n, seed=seed)
    if name == "F32":
        return bf16.astype(np.uint32) << 16
    return bf16.view(ml_dtypes.bfloat16).astype(np.float16).view(np.uint16)


def both_impls(words: np.ndarray, name: str, level: str) -> np.ndarray:
    """Encode with numba and the reference (same bytes), decode with both (same words)."""
    stream = encode_chunk(words, name, level, impl="cpu")
    assert bytes(encode_chunk(words, name, level, impl="reference")) == bytes(stream)
    for impl in ("cpu", "reference"):
        out = decode_chunk(stream, name, words.size, impl=impl)
        assert out.view(LAYOUTS[name].uint).tobytes() == words.tobytes()
    return stream


def test_usable_shifts_keep_a_symbol_in_a_byte():
    assert SHIFTS == {"BF16": [], "F16": [1, 2, 3, 8, 9, 10], "F32": [8, 16], "F8_E4M3": [1, 2, 3], "F8_E5M2": [1, 2]}
    assert narrowed(LAYOUTS["F32"], 16) == narrowed(LAYOUTS["F32"], 16)
    assert narrowed(LAYOUTS["F32"], 16).raw_bytes == 1 and narrowed(LAYOUTS["F32"], 16).uint == np.uint16
    assert narrowed(LAYOUTS["F16"], 3).uint == np.uint16 and narrowed(LAYOUTS["F16"], 3).rem_bits == 0


@pytest.mark.parametrize("level", ["fast", "max"])
def test_f32_from_bf16_compresses_like_bf16_twice(level):
    words = upcast("F32", 100_000)
    stream = both_impls(words, "F32", level)
    assert stream[0] == blocks.MODE_NARROW and stream[1] == 16
    as_bf16 = encode_chunk((words >> 16).astype(np.uint16), "BF16", level)
    assert stream.size == as_bf16.size + blocks.NARROW_HEADER.size  # no exceptions: the bf16 stream + 12 bytes


@pytest.mark.parametrize("level", ["fast", "max"])
def test_f16_from_bf16_patches_its_subnormals(level):
    words = upcast("F16", 100_000, seed=3)
    assert np.count_nonzero(words & 7) > 0  # bf16 values below f16's normal range keep low bits
    stream = both_impls(words, "F16", level)
    assert stream[0] == blocks.MODE_NARROW and stream[1] == 3
    assert struct.unpack_from("<I", stream, 8)[0] == np.count_nonzero(words & 7)


@pytest.mark.parametrize("name", ["F16", "F32", "F8_E4M3", "F8_E5M2"])
@given(data=st.data())
def test_roundtrip_property(name, data):
    """Any shift the layout allows, any count of exceptions (mode 3 or not, always exact)."""
    layout = LAYOUTS[name]
    n = data.draw(st.integers(1, 3000))
    shift = data.draw(st.sampled_from(SHIFTS[name]))
    words = weight_like(layout, n, seed=data.draw(st.integers(0, 100)))
    words &= layout.uint.type(~((1 << shift) - 1) & ((1 << layout.bits) - 1))
    special = awkward_values(layout)
    at = data.draw(st.lists(st.integers(0, n - 1), max_size=20))
    words[at] = special[np.arange(len(at)) % special.size]
    for level in ("fast", "max"):
        both_impls(words, name, level)


@pytest.mark.parametrize("level", ["fast", "max"])
def test_f32_from_f16_drops_8_of_its_13_zero_bits(level):
    """Two byte planes (raw_bytes 2): the kernels' plane loops must not touch a third one."""
    words = weight_like(LAYOUTS["F16"], 50_000, seed=5).view(np.float16).astype(np.float32).view(np.uint32)
    stream = both_impls(words, "F32", level)
    assert stream[0] == blocks.MODE_NARROW and stream[1] == 8


def test_values_with_set_low_bits_are_not_narrowed():
    words = weight_like(LAYOUTS["F32"], 10_000)
    assert encode_chunk(words, "F32", "fast")[0] == blocks.MODE_LANES


def narrow_stream() -> tuple[np.ndarray, bytearray]:
    words = upcast("F16", 5000, seed=1)
    stream = bytearray(encode_chunk(words, "F16", "fast"))
    assert stream[0] == blocks.MODE_NARROW and struct.unpack_from("<I", stream, 8)[0] >= 2
    return words, stream


def decode(stream, n=5000):
    return decode_chunk(np.frombuffer(bytes(stream), dtype=np.uint8), "F16", n)


def test_every_truncation_is_detected():
    _, stream = narrow_stream()
    for cut in list(range(0, 40)) + [len(stream) - 1]:
        with pytest.raises((Truncated, CorruptData)):
            decode(stream[:cut])


@pytest.mark.parametrize(
    "offset, value, match",
    [(1, 0, "shift"), (1, 5, "shift"), (1, 11, "shift"), (2, 1, "reserved"), (4, 4999, "values"), (8, 5001, "exceptions")],
)
def test_bad_header_fields(offset, value, match):
    _, stream = narrow_stream()
    if offset in (4, 8):
        struct.pack_into("<I", stream, offset, value)
    else:
        stream[offset] = value
    with pytest.raises(CorruptData, match=match):
        decode(stream)


def test_exception_positions_must_ascend():
    _, stream = narrow_stream()
    first, second = struct.unpack_from("<II", stream, 12)
    struct.pack_into("<II", stream, 12, second, first)
    with pytest.raises(CorruptData, match="ascending"):
        decode(stream)


def test_exception_word_must_agree_with_the_coded_value():
    _, stream = narrow_stream()
    x = struct.unpack_from("<I", stream, 8)[0]
    word_at = 12 + 4 * x
    stream[word_at + 1] ^= 0x40  # an exponent bit of the first exception's word
    with pytest.raises(CorruptData, match="disagree"):
        decode(stream)


def test_inner_stream_must_be_mode_1_or_2():
    _, stream = narrow_stream()
    x = struct.unpack_from("<I", stream, 8)[0]
    stream[12 + 6 * x] = blocks.MODE_NARROW
    with pytest.raises(CorruptData, match="mode 1 or 2"):
        decode(stream)


def test_narrow_chunk_of_a_dtype_without_floats_is_rejected():
    _, stream = narrow_stream()
    with pytest.raises(FormatError):
        decode_chunk(np.frombuffer(bytes(stream), dtype=np.uint8), "I16", 5000)
