"""The .twz container: save/load/open, atomic writes, and one test per kind of bad file."""

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorwire
from tensorwire.codec.frame import checksum
from tensorwire.container.layout import END_MAGIC, FOOTER, PREAMBLE
from tensorwire.errors import (
    BadMagic,
    ChecksumMismatch,
    CorruptData,
    FormatError,
    TensorwireError,
    UnsupportedVersion,
)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w_bf16": (torch.randn(64, 33, generator=g) * 0.02).to(torch.bfloat16),
        "w_f16": torch.randn(1000, generator=g).to(torch.float16),
        "w_f32": torch.randn(3, 5, 7, generator=g),
        "ids": torch.arange(100, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "f8": torch.randn(300, generator=g).to(torch.float8_e4m3fn),
    }


@pytest.fixture
def twz(tmp_path, tensors) -> Path:
    path = tmp_path / "model.twz"
    tensorwire.save_file(tensors, path, metadata={"format": "pt"}, chunk_bytes=1024)
    return path


def test_save_load_roundtrip(twz, tensors):
    loaded = tensorwire.load_file(twz)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_lazy_open(twz, tensors):
    with tensorwire.open(twz) as f:
        assert f.keys() == list(tensors)
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("w_f32"), tensors["w_f32"])
        with pytest.raises(KeyError, match="no tensor named"):
            f.get_tensor("missing")


def test_numpy_inputs_and_bf16_numpy(tmp_path):
    arrays = {"a": np.arange(10, dtype=np.float32), "b": np.ones(5, dtype=ml_dtypes.bfloat16)}
    tensorwire.save_file(arrays, tmp_path / "x.twz")
    with tensorwire.open(tmp_path / "x.twz") as f:
        assert f.get_numpy("b").dtype == ml_dtypes.bfloat16
        assert f.get_numpy("a").tolist() == list(range(10))


def test_atomic_write_keeps_old_file_on_failure(tmp_path, tensors):
    path = tmp_path / "model.twz"
    tensorwire.save_file({"x": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        tensorwire.save_file({"ok": torch.ones(3), "bad": object()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.twz"], "no temporary file may be left behind"


def test_written_file_has_normal_permissions(twz):
    assert os.stat(twz).st_mode & 0o644 == 0o644


# ----------------------------------------------------------------------------- bad files


def rewrite_index(path: Path, mutate) -> None:
    """Rewrite the JSON index (with a valid checksum) to test the schema checks."""
    data = bytearray(path.read_bytes())
    offset, size, _, _, _ = FOOTER.unpack(bytes(data[-FOOTER.size :]))
    doc = json.loads(bytes(data[offset : offset + size]))
    mutate(doc)
    raw = json.dumps(doc).encode()
    path.write_bytes(bytes(data[:offset]) + raw + FOOTER.pack(offset, len(raw), checksum(raw), 0, END_MAGIC))


def test_empty_file(tmp_path):
    (tmp_path / "e.twz").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        tensorwire.open(tmp_path / "e.twz")


def test_bad_magic(tmp_path, twz):
    data = bytearray(twz.read_bytes())
    data[:8] = b"\x00\x00\x00\x00\x00\x00\x00\x00"
    twz.write_bytes(bytes(data))
    with pytest.raises(BadMagic, match="safetensors"):
        tensorwire.open(twz)


def test_unknown_version(twz):
    data = bytearray(twz.read_bytes())
    data[8:10] = struct.pack("<H", 7)
    twz.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        tensorwire.open(twz)


def test_every_truncation(twz):
    data = twz.read_bytes()
    for cut in list(range(0, 64)) + list(range(64, len(data), 251)) + [len(data) - 1]:
        twz.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            tensorwire.load_file(twz)


def test_footer_points_past_end(twz):
    data = bytearray(twz.read_bytes())
    offset, size, digest, _, _ = FOOTER.unpack(bytes(data[-FOOTER.size :]))
    data[-FOOTER.size :] = FOOTER.pack(offset, size + 10**12, digest, 0, END_MAGIC)
    twz.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match="does not end at the footer"):
        tensorwire.open(twz)


def test_index_checksum(twz):
    data = bytearray(twz.read_bytes())
    data[-FOOTER.size - 3] ^= 0x01
    twz.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="index checksum"):
        tensorwire.open(twz)


def test_chunk_checksum(twz):
    data = bytearray(twz.read_bytes())
    data[PREAMBLE.size + 20] ^= 0x10
    twz.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="chunk 0"):
        tensorwire.load_file(twz)


def test_absurd_tensor_size(twz):
    def huge(doc):
        t = doc["tensors"][0]
        t["shape"] = [2**60]
        t["chunks"] = [[2**60, t["chunks"][0][1], 100, 0]]

    rewrite_index(twz, huge)
    with pytest.raises(CorruptData, match="cannot hold"):
        tensorwire.open(twz)


def test_chunk_outside_data_region(twz):
    rewrite_index(twz, lambda doc: doc["tensors"][0]["chunks"][0].__setitem__(1, 10**9))
    with pytest.raises(CorruptData, match="outside the data region"):
        tensorwire.open(twz)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.__setitem__("format", "zip"), "format"),
        (lambda d: d["tensors"][0].__setitem__("dtype", "C64"), "unknown dtype"),
        (lambda d: d["tensors"][0].__setitem__("shape", [-1]), "invalid shape"),
        (lambda d: d["tensors"][1].__setitem__("name", d["tensors"][0]["name"]), "repeated"),
        (lambda d: d.__setitem__("metadata", {"a": 1}), "metadata"),
        (lambda d: d["tensors"][0]["chunks"].pop(), "hold"),
    ],
    ids=["format", "dtype", "shape", "duplicate", "metadata", "missing-chunk"],
)
def test_malformed_index(twz, mutate, match):
    rewrite_index(twz, mutate)
    with pytest.raises(CorruptData, match=match):
        tensorwire.open(twz)


def test_index_version(twz):
    rewrite_index(twz, lambda d: d.__setitem__("version", 3))
    with pytest.raises(UnsupportedVersion):
        tensorwire.open(twz)


def test_index_not_json(twz):
    data = bytearray(twz.read_bytes())
    offset, size, _, _, _ = FOOTER.unpack(bytes(data[-FOOTER.size :]))
    raw = b"\xff" * size
    twz.write_bytes(bytes(data[:offset]) + raw + FOOTER.pack(offset, size, checksum(raw), 0, END_MAGIC))
    with pytest.raises(CorruptData, match="not valid UTF-8 JSON"):
        tensorwire.open(twz)


@settings(max_examples=150)
@given(data=st.data())
def test_fuzz_reader_raises_only_tensorwire_errors(tmp_path_factory, data):
    """Random corruptions of a real file: a named error or the exact original tensors."""
    base = tmp_path_factory.getbasetemp() / "fuzz_base.twz"
    if not base.exists():
        tensorwire.save_file(
            {"a": (torch.arange(700, dtype=torch.float32) / 7).to(torch.bfloat16), "b": torch.arange(50, dtype=torch.int32)},
            base, chunk_bytes=1024,
        )  # fmt: skip
    original = base.read_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip" and mutated:
            mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and mutated:
            mutated[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del mutated[pos:]
        else:
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    path = tmp_path_factory.getbasetemp() / "fuzz.twz"
    path.write_bytes(bytes(mutated))
    try:
        loaded = tensorwire.load_file(path)
    except TensorwireError:
        return
    expected = tensorwire.load_file(base)
    assert all(torch.equal(loaded[k].view(torch.uint8), expected[k].view(torch.uint8)) for k in expected)


def test_loading_bf16_into_torch_does_not_import_ml_dtypes(tmp_path):
    """ml_dtypes' extension takes ~0.6 s to import: a cold start that only wants torch tensors skips it."""
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    tensorwire.save_file({"w": torch.arange(256, dtype=torch.float32).to(torch.bfloat16)}, tmp_path / "m.twz")
    code = (
        "import sys, tensorwire\n"
        f"t = tensorwire.load_file({str(tmp_path / 'm.twz')!r})['w']\n"
        "assert t.float().tolist() == [float(i) for i in range(256)], t\n"
        "assert 'ml_dtypes' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
