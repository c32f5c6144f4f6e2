"""Reading .twz files from a URL (range requests through fsspec) and at a paced read rate."""

import time

import ml_dtypes
import numpy as np
import pytest

import tensorwire
from tensorwire.container.reader import TwzFile
from tensorwire.container.source import LocalSource, is_url, open_source
from tensorwire.errors import ChecksumMismatch, Truncated
from tensorwire.testing.http_server import RangeServer

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


@pytest.fixture
def model(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "big": (rng.standard_normal((600, 700)) * 0.02).astype(ml_dtypes.bfloat16),
        "upcast": (rng.standard_normal(5000) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32),
        "small": np.arange(10, dtype=np.int32),
        "empty": np.zeros((0, 3), dtype=np.float16),
    }
    tensorwire.save_file(tensors, tmp_path / "m.twz", chunk_bytes=1 << 16)
    return tmp_path, tensors


def test_url_detection():
    assert is_url("https://host/x.twz") and is_url("s3://bucket/x.twz")
    assert not is_url("/tmp/x.twz") and not is_url("file:///tmp/x.twz")


def test_remote_file_reads_only_what_is_asked(model):
    folder, tensors = model
    size = (folder / "m.twz").stat().st_size
    with RangeServer(folder) as server, TwzFile(server.url("m.twz")) as f:
        assert f.keys() == list(tensors)
        opened = server.bytes_sent
        assert opened < 2048  # preamble, footer, index: not the tensors
        assert f.get_numpy("small").tolist() == list(range(10))
        assert server.bytes_sent - opened == sum(c.size for c in f.entry("small").chunks)
        for name, expected in tensors.items():
            assert f.get_numpy(name).tobytes() == expected.tobytes()
        assert server.bytes_sent <= size + sum(c.size for c in f.entry("small").chunks)


def test_remote_load_file_matches_local(model):
    folder, _ = model
    local = tensorwire.load_file(folder / "m.twz")
    with RangeServer(folder) as server:
        remote = tensorwire.load_file(server.url("m.twz"))
    assert local.keys() == remote.keys()
    import torch

    for name in local:
        assert torch.equal(local[name].view(torch.uint8), remote[name].view(torch.uint8))


def test_remote_truncated_and_altered_files_raise(model):
    folder, _ = model
    data = (folder / "m.twz").read_bytes()
    (folder / "cut.twz").write_bytes(data[: len(data) // 2])
    altered = bytearray(data)
    altered[200] ^= 0xFF  # inside the first chunk of "big"
    (folder / "altered.twz").write_bytes(bytes(altered))
    with RangeServer(folder) as server:
        with pytest.raises(Truncated):
            TwzFile(server.url("cut.twz"))
        with TwzFile(server.url("altered.twz")) as f, pytest.raises(ChecksumMismatch):
            f.get_numpy("big")


def test_missing_remote_file_is_a_clear_error(model):
    folder, _ = model
    with RangeServer(folder) as server, pytest.raises(FileNotFoundError):
        TwzFile(server.url("nope.twz"))


def test_a_token_bucket_paces_the_reads(model):
    from tensorwire.serve.transport.shaping import TokenBucket

    folder, tensors = model
    with TwzFile(folder / "m.twz") as f:
        compressed = sum(c.size for c in f.entry("big").chunks)
    rate = 4e6  # bytes/s: about 0.1 s for this tensor, beyond the bucket's initial credit
    bucket = TokenBucket(rate)
    with TwzFile(folder / "m.twz", pacer=bucket) as f:
        burst = bucket.burst
        began = time.perf_counter()
        assert f.get_numpy("big").tobytes() == tensors["big"].tobytes()
        elapsed = time.perf_counter() - began
    assert elapsed >= (compressed - burst) / rate * 0.9


def test_local_source_reports_a_short_file(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    source = open_source(tmp_path / "x")
    assert isinstance(source, LocalSource) and source.size == 3
    assert source.read(1, 2) == b"bc"
    with pytest.raises(Truncated):
        source.read(2, 5)
    source.close()


def test_streams_stop_early_without_leaking_the_read_ahead(model):
    folder, tensors = model
    with TwzFile(folder / "m.twz") as f:
        entry = f.entry("big")
        for _ in f.iter_chunk_bytes(entry):
            break  # abandon the generator with a read-ahead in flight
        assert f.get_numpy("big").tobytes() == tensors["big"].tobytes()
