"""The KV payload's framing (kv/payload.py): every error case, and reading it layer by layer."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import xxhash

from tensorwire.errors import BadMagic, ChecksumMismatch, CorruptData, TensorwireError, Truncated, UnsupportedVersion
from tensorwire.kv import Pipeline, ShapeMismatch, StageConfigError
from tensorwire.kv import payload as framing
from tensorwire.kv.payload import PAYLOAD_MAGIC, PREAMBLE, read_header
from tensorwire.testing.strategies import kv_cache_data


def pipe(*stages: dict) -> Pipeline:
    return Pipeline.from_config({"stages": list(stages)})


# -- bad payloads -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def payload() -> bytes:
    cache = kv_cache_data(2, 1, 2, 24, 16)
    return pipe({"id": "key_norm", "keep_fraction": 0.5}, {"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 8, "residual": 4}, {"id": "zstd"}).encode(cache)


def test_every_truncation_raises_a_named_error(payload):
    for cut in range(0, len(payload), max(1, len(payload) // 200)):
        with pytest.raises((Truncated, CorruptData, ChecksumMismatch)):
            Pipeline.decode_data(payload[:cut])


def test_bit_flips_are_caught_by_checksums(payload):
    rng = np.random.default_rng(0)
    for at in rng.choice(len(payload), size=80, replace=False):
        bad = bytearray(payload)
        bad[at] ^= 1 << int(rng.integers(8))
        with pytest.raises(TensorwireError):
            Pipeline.decode_data(bytes(bad))


def test_bad_magic_version_flags_and_trailing_bytes(payload):
    with pytest.raises(BadMagic):
        Pipeline.decode_data(b"GARBAGE!" + payload[8:])
    with pytest.raises(UnsupportedVersion, match="upgrade"):
        Pipeline.decode_data(payload[:8] + struct.pack("<H", 99) + payload[10:])
    with pytest.raises(CorruptData, match="reserved"):
        Pipeline.decode_data(payload[:10] + struct.pack("<H", 1) + payload[12:])
    with pytest.raises(CorruptData, match="after its last layer"):
        Pipeline.decode_data(payload + b"\0")


def _rewrite_header(payload: bytes, edit) -> bytes:
    header, start = read_header(memoryview(payload))
    edit(header)
    raw = json.dumps(header).encode()
    return PREAMBLE.pack(PAYLOAD_MAGIC, 1, 0, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw + payload[start:]


def test_unknown_stage_in_a_payload_is_a_named_error(payload):
    bad = _rewrite_header(payload, lambda h: h["pipeline"]["stages"].__setitem__(0, {"id": "made_up"}))
    with pytest.raises(StageConfigError, match="made_up"):
        Pipeline.decode_data(bad)


def test_inconsistent_headers_are_corrupt(payload):
    for edit in (
        lambda h: h["cache"].__setitem__("kept", 10**6),
        lambda h: h["cache"].__setitem__("n_layers", 5),
        lambda h: h["cache"].__setitem__("batch", -1),
        lambda h: h["layers"][0]["sections"][0].__setitem__(1, "Q9"),
        lambda h: h.pop("layers"),
    ):
        with pytest.raises(CorruptData):
            Pipeline.decode_data(_rewrite_header(payload, edit))


def test_payload_for_another_model_shape_is_rejected(payload):
    with pytest.raises(ShapeMismatch, match="kv_heads"):
        Pipeline.decode_data(payload, expect={"kv_heads": 3})
    Pipeline.decode_data(payload, expect={"kv_heads": 2, "head_dim": 16})


def test_layers_can_be_checked_one_by_one_as_they_arrive(payload):
    view = memoryview(payload)
    _, body_start = read_header(view)
    header, at = read_header(view[:body_start])  # the header alone is enough to plan the rest
    positions, first_layer = framing.read_positions(header, view, at)
    assert [p.shape for p in positions] == [(1, 2, 12)] * 2
    at, seen = first_layer, []
    for index, table, body in framing.layer_bodies(header, view, first_layer):
        assert len(body) == framing.layer_size(table)
        seen.append(index)
        at += len(body)
    assert seen == [0, 1] and at == len(payload)
    bad = bytearray(payload)
    bad[-1] ^= 0x10
    bodies = framing.layer_bodies(header, memoryview(bytes(bad)), first_layer)
    assert next(bodies)[0] == 0  # layer 0 is intact and usable before layer 1 fails
    with pytest.raises(ChecksumMismatch, match="layer 1"):
        next(bodies)


def test_a_full_cache_has_no_positions_bitmap():
    cache = kv_cache_data(2, 1, 2, 10, 8)
    assert framing.positions_section(cache.layers, cache.seq_len) == ("all", b"")
    header, at = read_header(memoryview(Pipeline().encode(cache)))
    assert header["positions"] == "all"


def _tail_cache():
    """Layers of 10 and 4 tokens, each its most recent ones (a sliding-window layer of 5)."""
    from tensorwire.kv.stage import KVCacheData, KVLayer

    full, window = kv_cache_data(2, 1, 2, 10, 8).layers
    tail = KVLayer(window.keys[:, :, 6:].copy(), window.values[:, :, 6:].copy(), window.positions[:, :, 6:].copy())
    return KVCacheData([full, tail], seq_len=10)


def test_layers_of_different_lengths_travel_as_tails_in_version_2():
    cache = _tail_cache()
    blob = Pipeline().encode(cache)
    header, _ = read_header(memoryview(blob))
    assert struct.unpack_from("<H", blob, 8)[0] == 2
    assert header["positions"] == "tail" and header["cache"]["layer_tokens"] == [10, 4] and header["cache"]["kept"] == 10
    decoded = Pipeline.decode_data(blob)
    assert [layer.positions[0, 0].tolist() for layer in decoded.layers] == [list(range(10)), [6, 7, 8, 9]]
    for got, sent in zip(decoded.layers, cache.layers):
        assert np.array_equal(got.keys, sent.keys) and np.array_equal(got.values, sent.values)
    # A version-1 preamble cannot carry tail positions; bad per-layer counts are corrupt.
    raw = blob[PREAMBLE.size : PREAMBLE.size + struct.unpack_from("<I", blob, 12)[0]]
    with pytest.raises(CorruptData, match="version 1"):
        Pipeline.decode_data(PREAMBLE.pack(PAYLOAD_MAGIC, 1, 0, len(raw), xxhash.xxh3_64_intdigest(raw)) + blob[PREAMBLE.size :])

    def rewrite(edit) -> bytes:
        h, start = read_header(memoryview(blob))
        edit(h)
        raw = json.dumps(h).encode()
        return PREAMBLE.pack(PAYLOAD_MAGIC, 2, 0, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw + blob[start:]

    for edit in (lambda h: h["cache"].__setitem__("layer_tokens", [10]),
                 lambda h: h["cache"].__setitem__("layer_tokens", [10, 11]),
                 lambda h: h["cache"].__setitem__("layer_tokens", [9, 4]),
                 lambda h: h["cache"].pop("layer_tokens"),
                 lambda h: h.__setitem__("positions", "all")):  # fmt: skip
        with pytest.raises(CorruptData):
            Pipeline.decode_data(rewrite(edit))


def test_layers_of_different_lengths_that_are_not_tails_are_refused():
    from tensorwire.kv.stage import KVLayer

    cache = _tail_cache()
    middle = cache.layers[1]
    cache.layers[1] = KVLayer(middle.keys, middle.values, middle.positions - 2)  # positions 4..7 of 10: not a tail
    with pytest.raises(ShapeMismatch, match="most recent"):
        Pipeline().encode(cache)
