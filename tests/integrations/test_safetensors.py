"""safetensors files and model folders: byte-identical round trips, verify, bad sources."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

import tensorwire
from tensorwire.errors import FormatError, UnsupportedDType
from tensorwire.integrations.safetensors import compress_path, decompress_path, read_header
from tensorwire.integrations.verify import verify_file


@pytest.fixture(scope="module")
def real_tensors(minilm_path):
    """A few real MiniLM tensors, in bf16 and fp32, about 3 MB."""
    full = st_load(minilm_path)
    names = [n for n in full if "layer.0." in n][:8] + ["embeddings.LayerNorm.weight"]
    picked = {f"{n}.bf16": full[n].to(torch.bfloat16) for n in names}
    picked.update({f"{n}.f32": full[n] for n in names[:3]})
    picked["int_ids"] = torch.arange(77, dtype=torch.int64)
    return picked


@pytest.fixture
def st_file(tmp_path, real_tensors):
    path = tmp_path / "model.safetensors"
    st_save(real_tensors, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("level", ["fast"])
def test_file_roundtrip_is_byte_identical(tmp_path, st_file, level):
    packed = compress_path(st_file, tmp_path / "m.twz", level=level, chunk_bytes=64 << 10)
    assert packed.stat().st_size < st_file.stat().st_size * 0.85
    restored = decompress_path(packed, tmp_path / "restored.safetensors")
    assert restored.read_bytes() == st_file.read_bytes()
    assert verify_file(packed, against=st_file).ok


def test_load_file_matches_safetensors(tmp_path, st_file):
    packed = compress_path(st_file, tmp_path / "m.twz")
    ours, theirs = tensorwire.load_file(packed), st_load(st_file)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with tensorwire.open(packed) as f:
        assert f.metadata() == {"format": "pt"}


def test_verify_reports_a_different_source(tmp_path, st_file, real_tensors):
    packed = compress_path(st_file, tmp_path / "m.twz")
    other = dict(real_tensors)
    name = next(iter(other))
    other[name] = other[name].clone()
    other[name].view(-1)[5] += 1
    st_save(other, tmp_path / "other.safetensors", metadata={"format": "pt"})
    report = verify_file(packed, against=tmp_path / "other.safetensors")
    assert not report.ok and name in report.summary()


def test_sharded_folder_roundtrip(tmp_path, real_tensors):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    names = list(real_tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        st_save({k: real_tensors[k] for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "bert"}')

    packed = compress_path(folder)
    assert packed == tmp_path / "ckpt-twz"
    assert sorted(p.name for p in packed.iterdir()) == [
        "config.json", "model-00001-of-00002.twz", "model-00002-of-00002.twz", "model.twz.index.json",
    ]  # fmt: skip
    index = json.loads((packed / "model.twz.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.twz", "model-00002-of-00002.twz"}
    restored = decompress_path(packed)
    for p in folder.iterdir():
        assert (restored / p.name).read_bytes() == p.read_bytes(), p.name


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(FormatError, match="not a JSON object"):
        read_header(bad)


def test_safetensors_with_gap_is_rejected(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    path = tmp_path / "gap.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(FormatError, match="gap"):
        read_header(path)


def test_unknown_safetensors_dtype(tmp_path):
    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(UnsupportedDType):
        read_header(path)


def test_decompress_of_save_file_output_loads_in_safetensors(tmp_path, real_tensors):
    tensorwire.save_file(real_tensors, tmp_path / "x.twz", metadata={"k": "v"})
    restored = decompress_path(tmp_path / "x.twz")
    loaded = st_load(restored)
    assert all(torch.equal(loaded[k], real_tensors[k]) for k in real_tensors)
