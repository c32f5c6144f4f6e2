"""The public compress/decompress frame: round trips on awkward inputs, config, every error."""

import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given

import tensorwire
from tensorwire.codec import EnecCodec
from tensorwire.codec.frame import CHUNK_ENTRY, FRAME_HEADER
from tensorwire.errors import BadMagic, ChecksumMismatch, CorruptData, FormatError, UnsupportedDType, UnsupportedVersion
from tensorwire.testing.conformance import CodecSuite
from tensorwire.testing.strategies import raw_words
from tensorwire.codec.dtypes import numpy_dtype


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@given(raw_words(max_size=3000))
def test_roundtrip_all_float_dtypes(case):
    layout, words = case
    values = words.view(numpy_dtype(layout.name))
    codec = EnecCodec(chunk_bytes=1024)  # several chunks per array
    assert same_bits(codec.decode(codec.encode(values)), values)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(0, np.float32),
        np.zeros((3, 0, 2), ml_dtypes.bfloat16),
        np.float32(3.5).reshape(()),
        np.array([-0.0, np.inf, -np.inf, np.nan], np.float16),
        np.arange(1001, dtype=np.int64),
        np.array([True, False, True]),
        np.arange(24, dtype=np.float64).reshape(2, 3, 4),
    ],
    ids=["empty", "empty-3d", "scalar", "specials", "int64", "bool", "f64"],
)
def test_roundtrip_edge_arrays(array):
    assert same_bits(tensorwire.decompress(tensorwire.compress(array)), array)


def test_non_contiguous_and_torch_inputs():
    base = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    view = base[::2, 1::3]
    assert same_bits(tensorwire.decompress(tensorwire.compress(view)), np.ascontiguousarray(view))
    t = torch.randn(33, 17).to(torch.bfloat16).t()  # non-contiguous bf16
    out = tensorwire.decompress(tensorwire.compress(t))
    assert out.dtype == ml_dtypes.bfloat16
    assert torch.equal(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), t.contiguous())


def test_decode_into_out():
    x = np.linspace(-3, 3, 5000, dtype=np.float32).reshape(50, 100)
    out = np.empty_like(x)
    codec = EnecCodec()
    assert codec.decode(codec.encode(x), out=out) is out
    assert same_bits(out, x)
    with pytest.raises(ValueError):
        codec.decode(codec.encode(x), out=np.empty((100, 50), np.float32))


class TestEnecCodecConformance(CodecSuite):
    codecs = [EnecCodec(level="fast", chunk_bytes=4096), EnecCodec(level="max", chunk_bytes=4096), EnecCodec()]


def test_config_roundtrip_and_equality():
    codec = EnecCodec(level="fast", chunk_bytes=1 << 20)
    config = codec.to_config()
    assert config == {"id": "tensorwire.enec", "level": "fast", "chunk_bytes": 1 << 20}
    assert EnecCodec.from_config(config) == codec
    with pytest.raises(ValueError):
        EnecCodec(level="fastest")


def test_unsupported_dtype():
    with pytest.raises(UnsupportedDType, match="complex"):
        tensorwire.compress(np.zeros(3, np.complex64))


def test_reference_and_cpu_frames_are_identical():
    x = np.random.default_rng(3).standard_normal(20000).astype(np.float16)
    codec = EnecCodec(chunk_bytes=4096)
    assert codec.encode(x, impl="reference") == codec.encode(x, impl="cpu")


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def frame() -> bytes:
    x = np.random.default_rng(1).standard_normal(3000).astype(np.float32)
    return EnecCodec(chunk_bytes=4096).encode(x)


def test_bad_magic(frame):
    with pytest.raises(BadMagic, match="not a tensorwire frame"):
        tensorwire.decompress(b"PK\x03\x04" + frame[4:])


def test_unknown_version(frame):
    data = bytearray(frame)
    data[8:10] = struct.pack("<H", 99)
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        tensorwire.decompress(bytes(data))


def test_every_truncation(frame):
    for cut in range(0, len(frame), 97):
        with pytest.raises(FormatError):
            tensorwire.decompress(frame[:cut])


def test_flipped_bits_never_pass_silently(frame):
    rng = np.random.default_rng(0)
    x = tensorwire.decompress(frame)
    for _ in range(60):
        data = bytearray(frame)
        pos = int(rng.integers(0, len(data)))
        data[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            y = tensorwire.decompress(bytes(data))
        except FormatError:
            continue
        assert same_bits(x, y), f"flip at {pos} changed the data without an error"


def test_checksum_mismatch(frame):
    data = bytearray(frame)
    data[-5] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="altered"):
        tensorwire.decompress(bytes(data))


def test_absurd_shape_in_small_frame():
    header = FRAME_HEADER.pack(b"\x89TWF\r\n\x1a\n", 1, 0, 3, 1, 0, 1)
    shape = struct.pack("<Q", 2**60)
    table = CHUNK_ENTRY.pack(2**60, 20, 0)
    with pytest.raises(CorruptData, match="cannot hold"):
        tensorwire.decompress(header + shape + table + bytes(20))


def test_reserved_fields(frame):
    data = bytearray(frame)
    data[10] = 1  # flags
    with pytest.raises(CorruptData, match="reserved"):
        tensorwire.decompress(bytes(data))
