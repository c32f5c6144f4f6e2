"""KV encoders (raw, enec, ans, zstd, lz4): bit-exact round trips, configs, every error case, damage.

Code planes come from a quick per-token quantiser applied to heavy-tailed, KV-like data
with a few outlier channels (as real key caches have), plus arbitrary codes; float
planes from raw bit patterns (NaN payloads, infinities, subnormals, -0.0) and KV-like values.
"""

from __future__ import annotations

import doctest
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorwire.codec.planes import LAYOUTS
from tensorwire.errors import CorruptData, TensorwireError, Truncated, UnsupportedDType
from tensorwire.kv.encoders import ans as ans_module
from tensorwire.kv.encoders import bitpack, enec, lz4, raw, zstd
from tensorwire.kv.encoders.ans import ANS, quantize_frequencies
from tensorwire.kv.encoders.enec import CHUNK_VALUES, Enec
from tensorwire.kv.encoders.lz4 import LZ4
from tensorwire.kv.encoders.raw import Raw
from tensorwire.kv.encoders.zstd import Zstd
from tensorwire.kv.stage import ArrayEncoder, BytesEncoder, Plane, Stage, StageConfigError
from tensorwire.testing.conformance import FLOAT_DTYPES, ArrayEncoderSuite, BytesEncoderSuite
from tensorwire.testing.strategies import awkward_values
from tensorwire.testing.strategies import kv_tensor as kv_like

ARRAY_ENCODERS = [Raw(), Enec(level="fast"), Enec(level="max"), ANS(), ANS(context="none")]
BYTES_ENCODERS = [Zstd(), Zstd(level=-5), Zstd(level=19), LZ4(), LZ4(level=9)]
KV_SHAPES = [(1, 1, 1, 64), (1, 3, 7, 64), (2, 2, 300, 64), (1, 4, 300, 64)]
LENGTHS = [0, 1, 7, 9, 1000]

array_encoders = pytest.mark.parametrize("encoder", ARRAY_ENCODERS, ids=lambda e: repr(e))
bytes_encoders = pytest.mark.parametrize("encoder", BYTES_ENCODERS, ids=lambda e: repr(e))


# ----------------------------------------------------------------------------- realistic test data


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-token asymmetric min/max quantisation over the last axis (a KIVI-style value quantiser)."""
    lo = x.min(axis=-1, keepdims=True)
    span = np.maximum(x.max(axis=-1, keepdims=True) - lo, 1e-6)
    return np.clip(np.rint((x - lo) / span * ((1 << bits) - 1)), 0, (1 << bits) - 1).astype(np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def roundtrip(encoder: ArrayEncoder, plane: Plane) -> np.ndarray:
    data = encoder.encode(plane)
    assert isinstance(data, bytes)
    out = encoder.decode(data, plane.data.dtype, plane.data.shape, plane.bits)
    assert same_bits(out, plane.data), f"{encoder!r} changed the plane"
    assert out.flags.writeable
    return out


@st.composite
def code_planes(draw) -> Plane:
    bits = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["kv", "arbitrary", "constant", "two-values"]))
    if kind == "kv":
        shape = draw(st.sampled_from(KV_SHAPES))
        codes = quantize(kv_like(shape, seed=draw(st.integers(0, 2**16))), bits)
    else:
        shape = draw(st.sampled_from([(n,) for n in LENGTHS] + [(3, 0, 2), (2, 1, 7, 64)]))
        values = st.integers(0, (1 << bits) - 1)
        if kind == "arbitrary":
            codes = draw(hnp.arrays(np.uint8, shape, elements=values))
        elif kind == "constant":
            codes = np.full(shape, draw(values), dtype=np.uint8)
        else:
            a, b = draw(values), draw(values)
            codes = np.where(draw(hnp.arrays(np.bool_, shape)), a, b).astype(np.uint8)
    return Plane(codes, bits=bits)


@st.composite
def float_planes(draw) -> Plane:
    name = draw(st.sampled_from(sorted(FLOAT_DTYPES)))
    layout = LAYOUTS[name]
    kind = draw(st.sampled_from(["kv", "bits", "awkward"]))
    if kind == "kv":
        shape = draw(st.sampled_from(KV_SHAPES))
        with np.errstate(over="ignore"):
            data = kv_like(shape, seed=draw(st.integers(0, 2**16))).astype(FLOAT_DTYPES[name])
    elif kind == "bits":
        shape = draw(st.sampled_from([(n,) for n in LENGTHS] + [(2, 3, 7, 64)]))
        data = draw(hnp.arrays(layout.uint, shape)).view(FLOAT_DTYPES[name])
    else:
        special = awkward_values(layout)
        n = draw(st.sampled_from(LENGTHS))
        data = special[np.arange(n) % special.size].view(FLOAT_DTYPES[name])
    return Plane(np.ascontiguousarray(data))


# ----------------------------------------------------------------------------- round trips


@given(plane=code_planes())
def test_code_planes_roundtrip(plane):
    for encoder in ARRAY_ENCODERS:
        roundtrip(encoder, plane)


@given(plane=float_planes())
def test_float_planes_roundtrip(plane):
    for encoder in ARRAY_ENCODERS:
        roundtrip(encoder, plane)


@array_encoders
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS + [4099])
def test_every_code_value_at_every_length(encoder, bits, n):
    codes = (np.arange(n) * 7 % (1 << bits)).astype(np.uint8)  # every value once n >= 2**bits
    roundtrip(encoder, Plane(codes, bits=bits))


@pytest.mark.parametrize("level", ["fast", "max"])
def test_enec_keeps_all_256_byte_values(level):
    codes = np.random.default_rng(3).permutation(np.repeat(np.arange(256, dtype=np.uint8), 300))
    roundtrip(Enec(level=level), Plane(codes, bits=8))
    roundtrip(Enec(level=level), Plane(np.arange(256, dtype=np.uint8), bits=8))


@array_encoders
@pytest.mark.parametrize("name", sorted(FLOAT_DTYPES))
def test_float_special_values(encoder, name):
    layout = LAYOUTS[name]
    words = np.concatenate(
        [awkward_values(layout), np.arange(1 << min(layout.bits, 16), dtype=np.uint64).astype(layout.uint)]
    )
    roundtrip(encoder, Plane(words.view(FLOAT_DTYPES[name]).reshape(1, 1, -1, 1)))


@array_encoders
def test_non_contiguous_planes(encoder):
    x = kv_like((1, 3, 40, 64), seed=5)
    codes = quantize(x, 4)[:, :, ::2, :]
    out = encoder.decode(encoder.encode(Plane(codes, bits=4)), np.uint8, codes.shape, 4)
    assert np.array_equal(out, codes)
    floats = x.astype(ml_dtypes.bfloat16).transpose(0, 2, 1, 3)
    out = encoder.decode(encoder.encode(Plane(floats)), floats.dtype, floats.shape, None)
    assert same_bits(out, np.ascontiguousarray(floats))


@pytest.mark.parametrize("level", ["fast", "max"])
def test_enec_splits_large_planes_into_chunks(level):
    n = CHUNK_VALUES + 1000
    codes = quantize(kv_like((n // 64 + 1, 64), seed=1), 4).reshape(-1)[:n]
    encoder = Enec(level=level)
    roundtrip(encoder, Plane(codes, bits=4))
    data = encoder.encode(Plane(codes, bits=4))
    sizes = np.frombuffer(data[:8], dtype="<u4")
    assert 8 + int(sizes.sum()) == len(data)  # two chunks, each stream sized in the table
    floats = kv_like((n,), seed=2).astype(np.float16)
    roundtrip(encoder, Plane(floats))


def test_raw_packing_matches_the_documented_bit_order():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for n in LENGTHS + [8, 15, 16, 17]:
            codes = rng.integers(0, 1 << bits, n, dtype=np.uint8)
            stream = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
            expected = np.packbits(stream, bitorder="little")  # value i at bits [i*b, (i+1)*b), LSB-first
            data = Raw().encode(Plane(codes, bits=bits))
            assert data == expected.tobytes()
            assert len(data) == bitpack.packed_size(n, bits)
    assert Raw().encode(Plane(np.array([1, 2, 3], np.uint8), bits=2)) == bytes([0b111001])


def test_raw_floats_are_their_little_endian_bytes():
    x = kv_like((2, 3, 7, 64)).astype(ml_dtypes.bfloat16)
    assert Raw().encode(Plane(x)) == x.tobytes()
    assert ANS().encode(Plane(x)) == x.tobytes()


def test_ans_reaches_the_entropy_of_skewed_codes():
    rng = np.random.default_rng(0)
    p = np.array([0.01, 0.9, 0.08, 0.01])
    codes = rng.choice(4, size=(1, 3, 300, 64), p=p).astype(np.uint8)
    counts = np.bincount(codes.reshape(-1), minlength=4) / codes.size
    entropy = -(counts * np.log2(counts)).sum()
    bits_per_code = 8 * len(ANS().encode(Plane(codes, bits=2))) / codes.size
    assert bits_per_code < entropy * 1.01 + 0.01
    assert bits_per_code < 0.7  # Huffman (enec "max") cannot go below 1 bit per code


def test_quantize_frequencies_keeps_every_symbol_and_the_total():
    for counts in ([1, 10**9], [5], [3, 3, 3], list(range(1, 257)), [10**6] * 255 + [1], [0, 7, 0, 1]):
        counts = np.array(counts)
        freq = quantize_frequencies(counts)
        assert freq.sum() == 1 << 12 and ((freq > 0) == (counts > 0)).all()
    rows = np.array([[0, 5, 5, 0], [1, 0, 0, 0], [9, 9, 9, 1]])
    freq = quantize_frequencies(rows, total=256)
    assert (freq.sum(axis=1) == 256).all() and ((freq > 0) == (rows > 0)).all()
    assert freq[1].tolist() == [256, 0, 0, 0]


@bytes_encoders
@given(data=st.binary(max_size=3000) | st.sampled_from([b"", bytes(100_000)]))
def test_bytes_encoders_roundtrip(encoder, data):
    assert encoder.decode(encoder.encode(data), len(data)) == data


@bytes_encoders
def test_bytes_encoders_take_buffers(encoder):
    codes = quantize(kv_like((1, 3, 300, 64), seed=7), 2)
    packed = Raw().encode(Plane(codes, bits=2))
    for source in (packed, memoryview(packed), np.frombuffer(packed, np.uint8), bytearray(packed)):
        encoded = encoder.encode(source)
        assert isinstance(encoded, bytes)
        for stream in (encoded, memoryview(encoded), np.frombuffer(encoded, np.uint8)):
            assert encoder.decode(stream, len(packed)) == packed


def test_encoders_are_thread_safe():
    planes = [Plane(quantize(kv_like((1, 2, 300, 64), seed=s), 1 + s % 8), bits=1 + s % 8) for s in range(16)]

    def work(plane):
        for encoder in ARRAY_ENCODERS:
            data = encoder.encode(plane)
            for outer in BYTES_ENCODERS:
                assert outer.decode(outer.encode(data), len(data)) == data
            assert np.array_equal(encoder.decode(data, np.uint8, plane.data.shape, plane.bits), plane.data)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, planes))


# ----------------------------------------------------------------------------- configs and registry


class TestArrayEncoderConformance(ArrayEncoderSuite):
    stages = ARRAY_ENCODERS


class TestBytesEncoderConformance(BytesEncoderSuite):
    stages = BYTES_ENCODERS


def test_configs_are_plain_json():
    assert Raw().to_config() == {"id": "raw"}
    assert ANS().to_config() == {"id": "ans", "context": "column"}
    assert Enec().to_config() == {"id": "enec", "level": "max"}
    assert Zstd().to_config() == {"id": "zstd", "level": 3}
    assert LZ4(level=9).to_config() == {"id": "lz4", "level": 9}
    assert isinstance(Stage.from_config({"id": "enec", "level": "fast"}), ArrayEncoder)
    assert isinstance(Stage.from_config({"id": "lz4"}), BytesEncoder)


@pytest.mark.parametrize(
    "config",
    [
        {"id": "enec", "level": "fastest"},
        {"id": "enec", "level": 2},
        {"id": "zstd", "level": 23},
        {"id": "zstd", "level": -(1 << 17) - 1},
        {"id": "zstd", "level": "3"},
        {"id": "zstd", "level": True},
        {"id": "lz4", "level": -1},
        {"id": "lz4", "level": 13},
        {"id": "lz4", "level": 1.5},
        {"id": "raw", "bits": 4},
        {"id": "ans", "context": "delta"},
        {"id": "ans", "bits": 2},
    ],
    ids=str,
)
def test_bad_parameters_are_rejected(config):
    with pytest.raises(StageConfigError):
        Stage.from_config(config)


def test_optional_libraries_load_lazily():
    code = (
        "import sys; import tensorwire.kv.encoders.ans, tensorwire.kv.encoders.zstd, tensorwire.kv.encoders.lz4;"
        "loaded = {'constriction', 'zstandard', 'lz4', 'lz4.block'} & set(sys.modules); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", [bitpack, raw, enec, ans_module, zstd, lz4], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ----------------------------------------------------------------------------- bad input to encoders


@array_encoders
def test_out_of_range_codes_are_rejected(encoder):
    codes = np.array([0, 1, 2, 3, 4, 1], np.uint8)
    with pytest.raises(CorruptData, match="code 4 at flat index 4"):
        encoder.encode(Plane(codes, bits=2))


@array_encoders
@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.uint8, np.dtype(">f4")], ids=str)
def test_unsupported_float_dtypes_are_rejected(encoder, dtype):
    with pytest.raises(UnsupportedDType):
        encoder.encode(Plane(np.zeros(8, dtype)))  # uint8 without bits is not a code plane
    with pytest.raises(UnsupportedDType):
        encoder.decode(bytes(64), dtype, (8,), None)


@array_encoders
def test_decode_arguments_are_checked(encoder):
    with pytest.raises(UnsupportedDType, match="decodes to uint8"):
        encoder.decode(b"", np.float32, (0,), 2)
    for bits in (0, 9, True, 2.0):
        with pytest.raises(CorruptData, match="1..8 bits"):
            encoder.decode(b"", np.uint8, (0,), bits)
    with pytest.raises(CorruptData, match="negative"):
        encoder.decode(b"", np.uint8, (2, -1), 4)
    with pytest.raises(CorruptData, match="tuple of ints"):
        encoder.decode(b"", np.uint8, ("a",), 4)


# ----------------------------------------------------------------------------- damaged streams


def sample_planes() -> list[Plane]:
    x = kv_like((1, 3, 40, 64), seed=11)
    return [
        Plane(quantize(x, 2), bits=2),
        Plane(quantize(x, 3), bits=3),
        Plane(quantize(x, 8), bits=8),
        Plane(np.full(100, 5, np.uint8), bits=4),  # constant: ans stores only its bitmap
        Plane(np.zeros(1, np.uint8), bits=1),
        Plane(quantize(kv_like((1, 2, 1024, 64), seed=12), 2), bits=2),  # ans: per-column models
        Plane(x.astype(ml_dtypes.bfloat16)),
        Plane(x[..., :9].astype(ml_dtypes.float8_e4m3fn)),
    ]


@given(
    data=st.binary(max_size=600),
    bits=st.integers(1, 8),
    shape=st.sampled_from([(0,), (1,), (9,), (2, 3, 5), (1, 2, 40, 8)]),
    name=st.sampled_from(sorted(FLOAT_DTYPES)),
    size=st.sampled_from([0, 1, 100, 5000]),
)
def test_garbage_streams_raise_or_decode_to_the_right_shape(data, bits, shape, name, size):
    for encoder in ARRAY_ENCODERS:
        for dtype, plane_bits in ((np.dtype(np.uint8), bits), (FLOAT_DTYPES[name], None)):
            try:
                out = encoder.decode(data, dtype, shape, plane_bits)
            except TensorwireError:
                continue
            assert out.shape == shape and out.dtype == dtype
            if plane_bits is not None:
                assert int(out.max(initial=0)) < 1 << bits
    for encoder in BYTES_ENCODERS:
        try:
            assert len(encoder.decode(data, size)) == size
        except TensorwireError:
            pass


def decode_plane(encoder, data, plane):
    return encoder.decode(data, plane.data.dtype, plane.data.shape, plane.bits)


def positions(size: int, most: int = 64) -> list[int]:
    """Every position of a short stream, an even spread (ends included) of a long one."""
    return (
        sorted({*range(min(size, 16)), *np.linspace(0, size - 1, min(size, most)).astype(int).tolist()}) if size else []
    )


@array_encoders
@pytest.mark.parametrize("plane", sample_planes(), ids=lambda p: f"{p.data.dtype}-bits{p.bits}")
def test_truncated_and_extended_streams_are_rejected(encoder, plane):
    data = encoder.encode(plane)
    for cut in positions(len(data)):
        with pytest.raises((Truncated, CorruptData)):
            decode_plane(encoder, data[:cut], plane)
    for extra in (b"\x00", b"\x01\x02\x03\x04", bytes(8)):
        with pytest.raises((Truncated, CorruptData)):
            decode_plane(encoder, data + extra, plane)


@array_encoders
@pytest.mark.parametrize("plane", sample_planes(), ids=lambda p: f"{p.data.dtype}-bits{p.bits}")
def test_bit_flips_raise_or_keep_the_shape(encoder, plane):
    """Without checksums a flip may decode to other values; it must never crash or change the shape."""
    data = bytearray(encoder.encode(plane))
    for at in positions(len(data), most=40):
        for bit in (0, 3, 7):
            damaged = bytearray(data)
            damaged[at] ^= 1 << bit
            try:
                out = decode_plane(encoder, bytes(damaged), plane)
            except TensorwireError:
                continue
            assert out.shape == plane.data.shape and out.dtype == plane.data.dtype
            if plane.bits is not None:
                assert int(out.max(initial=0)) < 1 << plane.bits


@bytes_encoders
def test_truncated_and_damaged_bytes_streams(encoder):
    payload = Raw().encode(Plane(quantize(kv_like((1, 3, 100, 64), seed=4), 4), bits=4))
    data = encoder.encode(payload)
    for cut in positions(len(data)):
        with pytest.raises((Truncated, CorruptData)):
            encoder.decode(data[:cut], len(payload))
    for at in positions(len(data), most=40):
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        try:
            out = encoder.decode(bytes(damaged), len(payload))
        except TensorwireError:
            continue
        assert len(out) == len(payload)


# ----------------------------------------------------------------------------- one test per error case


def test_raw_errors():
    codes = np.array([1, 0, 1], np.uint8)
    data = Raw().encode(Plane(codes, bits=1))
    assert data == b"\x05"
    with pytest.raises(CorruptData, match="padding bits"):
        Raw().decode(b"\x0d", np.uint8, (3,), 1)
    with pytest.raises(Truncated, match="is 1 bytes, found 0"):
        Raw().decode(b"", np.uint8, (3,), 1)
    with pytest.raises(CorruptData, match="is 1 bytes, found 2"):
        Raw().decode(b"\x05\x00", np.uint8, (3,), 1)
    with pytest.raises(Truncated, match="the stream has 11"):
        Raw().decode(bytes(11), np.float32, (3,), None)
    with pytest.raises(CorruptData, match="the stream has 13"):
        Raw().decode(bytes(13), np.float32, (3,), None)


def test_enec_errors():
    codes = quantize(kv_like((1, 1, 20, 64)), 4)
    data = Enec().encode(Plane(codes, bits=4))
    shape = codes.shape
    with pytest.raises(Truncated, match="table of 1 chunk sizes"):
        Enec().decode(data[:3], np.uint8, shape, 4)
    with pytest.raises(Truncated, match="chunk sizes cover"):
        Enec().decode(data[:-1], np.uint8, shape, 4)
    with pytest.raises(CorruptData, match="chunk sizes cover"):
        Enec().decode(data + b"\x00", np.uint8, shape, 4)
    with pytest.raises(CorruptData, match="cannot hold"):  # a shape far larger than the stream could hold
        Enec().decode(data, np.uint8, (CHUNK_VALUES,), 4)
    with pytest.raises(CorruptData, match="does not fit in 2 bits"):  # decoded codes beyond the declared width
        Enec().decode(data, np.uint8, shape, 2)
    assert Enec().encode(Plane(np.zeros(0, np.uint8), bits=3)) == b""
    with pytest.raises(CorruptData):
        Enec().decode(b"\x00", np.uint8, (0,), 3)


def test_ans_errors():
    codes = np.array([0, 1, 1, 2, 1, 1, 0, 1] * 50, np.uint8)
    data = ANS().encode(Plane(codes, bits=2))  # 1-D: one model (mode 2)
    header, bitmap, freq, states, words = data[:3], data[3:4], data[4:10], data[10:42], data[42:]
    assert header == bytes([2, 9, 8]) and bitmap == b"\x07" and np.frombuffer(freq, "<u2").sum() == 1 << 9
    assert (np.frombuffer(states, "<u4") >= 1 << 15).all()

    def decode(stream, shape=(codes.size,), bits=2):
        return ANS().decode(stream, np.uint8, shape, bits)

    assert np.array_equal(decode(data), codes)
    with pytest.raises(Truncated, match="mode byte"):
        decode(b"")
    with pytest.raises(CorruptData, match="ans mode 4"):
        decode(b"\x04" + data[1:])
    with pytest.raises(CorruptData, match="ans mode 3 for a plane of shape \\(400,\\)"):
        decode(b"\x03" + data[1:])  # per-column models need a token axis
    with pytest.raises(Truncated, match="3 header bytes"):
        decode(data[:2])
    with pytest.raises(CorruptData, match="probability bits 13 and lanes 8"):
        decode(bytes([2, 13, 8]) + data[3:])
    with pytest.raises(CorruptData, match="probability bits 9 and lanes 6"):
        decode(bytes([2, 9, 6]) + data[3:])
    with pytest.raises(CorruptData, match="more than its 2 probability slots"):
        decode(bytes([2, 1, 8]) + data[3:])
    with pytest.raises(Truncated, match="bitmaps of 1 bytes end at byte 4"):
        decode(header)
    with pytest.raises(CorruptData, match="marks symbols >= 4"):
        decode(header + b"\x17" + data[4:])
    with pytest.raises(CorruptData, match="list 0..0 symbols"):
        decode(header + b"\x00")
    with pytest.raises(CorruptData, match="list 3..3 symbols"):
        decode(data, shape=(0,))
    with pytest.raises(Truncated, match="frequencies end at byte 10"):
        decode(data[:8])
    zero = np.frombuffer(freq, "<u2").copy()
    zero[0], zero[1] = 0, zero[1] + zero[0]
    with pytest.raises(CorruptData, match="each be >= 1"):
        decode(header + bitmap + zero.tobytes() + states + words)
    with pytest.raises(CorruptData, match="sum to 512"):
        decode(header + bitmap + (np.frombuffer(freq, "<u2") // 2).tobytes() + states + words)
    with pytest.raises(Truncated, match="before its 8 coder states"):
        decode(header + bitmap + freq + states[:-4])
    with pytest.raises(CorruptData, match="states 0\\.\\."):
        decode(header + bitmap + freq + bytes(4) + states[4:] + words)
    with pytest.raises(Truncated, match="whole number of 16-bit words"):
        decode(data[:-1])
    with pytest.raises(Truncated, match="ran out of words"):
        decode(data[:-2])
    with pytest.raises(CorruptData, match="read .* of .* ans words"):
        decode(data + bytes(2))  # a word left over
    with pytest.raises(CorruptData, match="another state"):
        decode(data, shape=(10,))
    altered = bytearray(data)
    altered[50] ^= 0x10  # a flipped bit in a word: the decoder drifts and reads too many or too few
    with pytest.raises((CorruptData, Truncated), match="ans"):
        decode(bytes(altered))
    constant = ANS().encode(Plane(np.full(9, 3, np.uint8), bits=2))
    assert constant == bytes([2, 4, 8, 8])
    with pytest.raises(CorruptData, match="single symbol, yet 4 bytes"):
        decode(constant + bytes(4), shape=(9,))
    assert ANS().encode(Plane(np.zeros(0, np.uint8), bits=8)) == bytes([2, 8, 8]) + bytes(32)


def test_ans_legacy_errors():
    """Modes 0 and 1 (constriction's 32-bit words) keep their checks."""
    data = bytes.fromhex(LEGACY_ANS_PLANE)  # mode 0, 4 symbols, frequencies summing to 2**16
    codes = golden_codes()
    mode, bitmap, freq, words = data[:1], data[1:2], data[2:10], data[10:]
    assert mode == b"\x00" and np.frombuffer(freq, "<u2").sum() == 1 << 16

    def decode(stream, shape=codes.shape):
        return ANS().decode(stream, np.uint8, shape, 2)

    assert np.array_equal(decode(data), codes)
    with pytest.raises(CorruptData, match="sum to 65536"):
        decode(mode + bitmap + (np.frombuffer(freq, "<u2") // 2).tobytes() + words)
    with pytest.raises(Truncated, match="before any coded words"):
        decode(mode + bitmap + freq)
    with pytest.raises(Truncated, match="whole number of 32-bit words"):
        decode(data[:-2])
    with pytest.raises(CorruptData, match="not a valid rANS stream"):
        decode(data + bytes(4))  # a stream never ends in a zero word
    with pytest.raises(CorruptData, match="left after 10 codes"):
        decode(data, shape=(10,))


# Streams written by this version (never regenerate: a payload on disk or on the wire must
# keep decoding).
GOLDEN_ANS_COLUMNS = (
    "0309080906d001300078008801ee595940fed8f33f57530a406de76b13522f4440611fae06bb648440d670dd3fd71abcf151cb62"
    "10dd47d2f62a235c2c29b51b300080013c5988997e51f8ae24ca2d85962f4dfe18865c52d770443f31303a70c7685c286e68e868"
    "f6284450bc"
)
GOLDEN_ANS_PLANE = (
    "020a080fd001780088013000fb5734013b620c00cae41f0019730c002be55001e4ce0c00699034012ce6030064276756d44a4867"
    "09e09440ed981675b616a483685b6c5ad2f01da953016b2c4fbadb329b5ae1a287b121356e353f84f25e848b63c71693667a54a9"
    "41bed1b881b3c8e44f47c559018b8a06a9a7ec7d8ca05b581b1cf11047f26d66fd59030a5dcc0a191a61eaa8e731250b92dfa4ea"
    "b635a5a579856900a8fba68ff7e1a61fb472ad12ae7c5b3465b78bc451e5a2360ef730df8adb66bbe468f1c00a389a11097b6f1b"
    "4f2ffe0a53a0e2ecec846d516cd6801f614b1e9e0000002c9095a019b8d6d8e568aea89b"
)
# The first version of the ans stream (modes 0 and 1, constriction's coder), written until
# 2026-12: decoded, no longer written. They also pin constriction's model construction.
LEGACY_ANS_COLUMNS = (
    "0109067fe88117813b7fc400b2d93d30ead747cce6cbccb01642b0b63ae2f5f363b4312f945b93a399409697cfa850b9d6e55c32"
    "dd83adacf81fa5fb5162cc85f16a3384e6af966bff1d13defa495dba4656899e7180decc75fd09a3010000"
)
LEGACY_ANS_PLANE = (
    "000f3f74c11d3f62c10bff302baa3b327acfa8369c9bfa7b9a6b8097984b7e0f71c54f7cf674ca7c77093da08ee0d9b1c0c67570"
    "b7479c572566d3774af6bf0135bb78a00014b343a414a70ef4e2e7a2933950db2084c2c0306311114d75b40d694bb452a5fa17f1"
    "e005bee96d2e709b297a828f64e91889f736bd22957e1a2a991a7c36b7e5b61a0d1481ad20cdc20a296a6d2a1c978be10b6f20d8"
    "3fc7baadff57ba8799db0c59526e2770082a47f918bebf7a1f4d93a6067a22c2064232738ff3e368779f84769ca4d56ddc1f01bd"
    "ebbc63cfec9f250bf84689010000"
)
GOLDEN_RAW = "8748888884b848888488"


def golden_codes() -> np.ndarray:
    i = np.arange(512)
    columns = [(i * 7 % 11 == 0) * 3, (i * 5 % 13 > 2) + 1]
    return np.stack(columns, axis=-1).astype(np.uint8).reshape(1, 1, 512, 2)


@pytest.mark.parametrize(
    "encoder, golden, codes",
    [
        (ANS(), GOLDEN_ANS_COLUMNS, golden_codes()),
        (ANS(context="none"), GOLDEN_ANS_PLANE, golden_codes()),
        (Raw(), GOLDEN_RAW, golden_codes()[0, 0, :20]),
    ],
    ids=["ans-column", "ans-plane", "raw"],
)
def test_golden_streams(encoder, golden, codes):
    data = bytes.fromhex(golden)
    assert np.array_equal(encoder.decode(data, np.uint8, codes.shape, 2), codes)
    assert encoder.encode(Plane(codes, bits=2)) == data


@pytest.mark.parametrize("legacy", [LEGACY_ANS_COLUMNS, LEGACY_ANS_PLANE], ids=["columns", "plane"])
def test_legacy_ans_streams_still_decode(legacy):
    assert np.array_equal(ANS().decode(bytes.fromhex(legacy), np.uint8, golden_codes().shape, 2), golden_codes())


def test_ans_column_models():
    """Per-column models pay on key-like codes (channels of different spread) with many tokens."""
    codes = quantize(kv_like((1, 3, 2048, 64), seed=9), 2)
    plane = Plane(codes, bits=2)
    column, single = ANS(context="column").encode(plane), ANS(context="none").encode(plane)
    assert column[0] == 3 and single[0] == 2
    assert len(column) < 0.9 * len(single)
    assert np.array_equal(ANS().decode(column, np.uint8, codes.shape, 2), codes)
    assert np.array_equal(ANS().decode(single, np.uint8, codes.shape, 2), codes)  # the mode is in the stream
    few = Plane(np.ascontiguousarray(codes[:, :, :4]), bits=2)
    assert ANS().encode(few) == ANS(context="none").encode(few)  # 192 tables would cost more than they save
    # A column that is constant codes nothing; one column with a single value among varied ones.
    mixed = codes[:, :1].copy()
    mixed[..., 5] = 3
    assert ANS().encode(Plane(mixed, bits=2))[0] == 3
    roundtrip(ANS(), Plane(mixed, bits=2))
    data = bytearray(ANS().encode(Plane(mixed, bits=2)))
    first_bitmap = 3
    data[first_bitmap] = 0  # a column without symbols
    with pytest.raises(CorruptData, match="list 0..4 symbols"):
        ANS().decode(bytes(data), np.uint8, mixed.shape, 2)


def test_zstd_errors():
    zstandard = pytest.importorskip("zstandard")
    payload = bytes(range(256)) * 40
    data = Zstd().encode(payload)
    with pytest.raises(CorruptData, match="declares 10240 bytes, the payload header 10239"):
        Zstd().decode(data, len(payload) - 1)
    with pytest.raises(CorruptData, match="at most 32768x"):
        Zstd().decode(data, 32768 * len(data) + 1)
    with pytest.raises(Truncated, match="cannot decode"):
        Zstd().decode(b"", 5)
    with pytest.raises(CorruptData, match="non-negative int"):
        Zstd().decode(data, -1)
    with pytest.raises(CorruptData, match="declares no size"):
        Zstd().decode(zstandard.ZstdCompressor(write_content_size=False).compress(payload), len(payload))
    with pytest.raises(CorruptData, match="unused data"):
        Zstd().decode(data + data, len(payload))
    with pytest.raises(Truncated, match="ends early"):
        Zstd().decode(data[:-4], len(payload))
    with pytest.raises(Truncated, match="ends early"):
        Zstd().decode(data[:3], len(payload))
    with pytest.raises(CorruptData, match="zstd rejects"):
        Zstd().decode(b"not a zstd frame", 4)
    empty = Zstd().encode(b"")
    with pytest.raises(CorruptData, match="followed by"):
        Zstd().decode(empty + b"\x00", 0)
    with pytest.raises(Truncated, match="ends early"):
        Zstd().decode(empty[:-1], 0)


def test_lz4_errors():
    payload = bytes(range(256)) * 40
    data = LZ4().encode(payload)
    with pytest.raises(CorruptData, match="damaged or truncated"):
        LZ4().decode(data, len(payload) - 1)
    with pytest.raises(CorruptData, match="decodes to 10240 bytes"):
        LZ4().decode(data, len(payload) + 1)
    with pytest.raises(CorruptData, match="at most 256x"):
        LZ4().decode(data, 256 * len(data) + 1)
    with pytest.raises(Truncated, match="cannot decode"):
        LZ4().decode(b"", 1)
    with pytest.raises(CorruptData, match="damaged or truncated"):
        LZ4().decode(data[:-3], len(payload))
    with pytest.raises(CorruptData, match="non-negative int"):
        LZ4().decode(data, 1.5)
