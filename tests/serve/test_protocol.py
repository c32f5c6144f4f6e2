"""Frames without sockets: layout, every header check, checksums, the KV payloads, and fuzzing."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorwire.errors import (
    FrameChecksumMismatch,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    UnexpectedFrame,
    UnknownFrameType,
    UnsupportedProtocolVersion,
)
from tensorwire.kv.pipeline import Pipeline, StreamDecoder
from tensorwire.serve import protocol as P
from tensorwire.testing.strategies import kv_cache_data

FT = P.FrameType


def joined(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_the_header_is_20_bytes_as_documented():
    raw = joined(P.frame(FT.MESSAGE, [b'{"type":"x"}']))
    assert P.HEADER_SIZE == 20 and len(raw) == 20 + 12
    magic, version, kind, flags, length, digest = struct.unpack("<4sBBHIQ", raw[:20])
    assert (magic, version, kind, flags, length) == (b"\x89TWP", 1, 4, 0, 12)
    import xxhash

    assert digest == xxhash.xxh3_64_intdigest(raw[:12] + raw[20:])


def test_frame_types_are_frozen():
    assert {t.name: int(t) for t in FT} == {"HELLO": 1, "AUTH": 2, "AUTH_OK": 3, "MESSAGE": 4, "ERROR": 5,
                                           "KV_HEADER": 16, "KV_BITMAP": 17, "KV_LAYER": 18, "KV_END": 19}  # fmt: skip


def test_frame_does_not_copy_its_pieces():
    body = bytearray(1000)
    parts = P.frame(FT.KV_BITMAP, [body])
    assert parts[1] is body


@pytest.mark.parametrize("frame_type", list(FT))
def test_every_frame_type_round_trips(frame_type):
    payload = bytes(range(256)) * 3
    frames = P.parse_frames(joined(P.frame(frame_type, [payload[:100], payload[100:]])))
    assert len(frames) == 1 and frames[0].type is frame_type and bytes(frames[0].payload) == payload


def test_several_frames_parse_in_order_and_empty_payloads_are_fine():
    raw = joined(P.frame(FT.KV_BITMAP)) + joined(P.frame(FT.MESSAGE, [b'{"type":"a"}'])) + joined(P.frame(FT.KV_END, [b"{}"]))
    assert [f.type for f in P.parse_frames(raw)] == [FT.KV_BITMAP, FT.MESSAGE, FT.KV_END]


# -- the header checks, in order --------------------------------------------------------------
def header(kind=4, length=10, *, magic=P.MAGIC, version=1, flags=0, digest=0) -> bytes:
    return P.HEADER.pack(magic, version, kind, flags, length, digest)


@pytest.mark.parametrize(
    "raw, error, match",
    [
        (header(length=2**31), FrameTooLarge, "2147483648"),
        (header(magic=b"GET "), MalformedFrame, "not a tensorwire frame"),
        (header(version=0), UnsupportedProtocolVersion, "version 0"),
        (header(version=2), UnsupportedProtocolVersion, "version 2"),
        (header(kind=0), UnknownFrameType, "type 0"),
        (header(kind=6), UnknownFrameType, "type 6"),
        (header(kind=255), UnknownFrameType, "type 255"),
        (header(flags=0x8000), MalformedFrame, "reserved"),
        (header()[:19], MalformedFrame, "20 bytes"),
    ],
)
def test_header_faults_are_named_errors(raw, error, match):
    with pytest.raises(error, match=match):
        P.parse_header(raw)


def test_the_limit_is_the_callers():
    assert P.parse_header(header(length=1000), max_payload=1000).length == 1000
    with pytest.raises(FrameTooLarge, match="1001 payload bytes, more than the 1000"):
        P.parse_header(header(length=1001), max_payload=1000)
    assert P.parse_header(header(length=2**32 - 1), max_payload=2**32).length == 2**32 - 1


def test_every_single_byte_flip_is_caught():
    raw = bytearray(joined(P.frame(FT.KV_LAYER, P.kv_layer_payload(0, {"sections": [], "xxh3": "0"}, [b"body" * 20]))))
    for at in range(len(raw)):
        for bit in (0, 7):
            bad = bytearray(raw)
            bad[at] ^= 1 << bit
            with pytest.raises(ProtocolError):
                P.parse_frames(bad)


def test_a_payload_flip_is_a_checksum_mismatch():
    raw = bytearray(joined(P.frame(FT.MESSAGE, [b'{"type":"x"}'])))
    raw[-3] ^= 1
    with pytest.raises(FrameChecksumMismatch, match="altered"):
        P.parse_frames(raw)


def test_a_frame_type_flip_to_another_valid_type_is_caught_by_the_checksum():
    raw = bytearray(joined(P.frame(FT.KV_HEADER, [b"{}"])))
    raw[5] = int(FT.KV_END)
    with pytest.raises(FrameChecksumMismatch):
        P.parse_frames(raw)


def test_truncated_input_is_malformed():
    raw = joined(P.frame(FT.MESSAGE, [b'{"type":"x"}']))
    for cut in range(1, len(raw)):
        with pytest.raises(MalformedFrame):
            P.parse_frames(raw[:cut])


# -- payloads ------------------------------------------------------------------------------------
def test_messages_and_errors():
    assert P.parse_message(P.json_payload({"type": "r", "é": [1, None]})) == {"type": "r", "é": [1, None]}
    for bad in (b"[1]", b'{"type": 1}', b"\xff\xfe", b"{", b'{"type":"x","v":NaN}', b"[" * 100_000):
        with pytest.raises(MalformedFrame):
            P.parse_message(bad)
    with pytest.raises(TypeError):
        P.json_payload({"v": float("inf")})
    raw = P.error_payload("busy", "m" * 10_000, fatal=False, request_id="r1")
    assert len(raw) < P.CONTROL_MAX_FRAME
    assert P.parse_error(raw) == ("busy", "m" * 4096, False, "r1")
    for bad in ({"message": "x"}, {"code": "c", "fatal": "yes"}, {"code": "c", "request_id": 3}):
        with pytest.raises(MalformedFrame):
            P.parse_error(json.dumps(bad).encode())


def test_request_ids():
    assert P.check_request_id("req-1 ✓") == "req-1 ✓"
    for bad in ("", "x" * 257, "a\nb", 3, None):
        with pytest.raises(MalformedFrame):
            P.check_request_id(bad)


def test_a_whole_kv_transfer_as_frames_decodes_bit_for_bit():
    """KV_HEADER, KV_BITMAP, KV_LAYER..., KV_END built and parsed without sockets, fed to a StreamDecoder."""
    pipe = Pipeline.from_config({"stages": [{"id": "streaming_llm", "keep_fraction": 0.5},
                                            {"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "zstd"}]})  # fmt: skip
    cache = kv_cache_data(3, 1, 2, 45, 32, seed=3)
    stream = pipe.encode_stream(cache)
    raw = joined(P.frame(FT.KV_HEADER, [P.kv_header_payload("r1", stream.header)]))
    raw += joined(P.frame(FT.KV_BITMAP, [stream.bitmap]))
    for i, (pieces, table) in enumerate(stream.layers):
        raw += joined(P.frame(FT.KV_LAYER, P.kv_layer_payload(i, table, pieces)))
    raw += joined(P.frame(FT.KV_END, [P.kv_end_payload("r1", 3, 0.5)]))

    frames = P.parse_frames(raw)
    assert [f.type for f in frames] == [FT.KV_HEADER, FT.KV_BITMAP, *[FT.KV_LAYER] * 3, FT.KV_END]
    request_id, head, nbytes = P.parse_kv_header(frames[0].payload)
    assert request_id == "r1" and nbytes == len(frames[1].payload) > 0
    decoder = StreamDecoder(head, frames[1].payload)
    limit = P.layer_frame_limit(head)
    for i, f in enumerate(frames[2:5]):
        assert len(f.payload) <= limit
        index, table, body = P.parse_kv_layer(f.payload)
        assert index == i and body.obj is f.payload.obj  # the body is a view of the frame, not a copy
        decoder.add_layer(table, body)
    assert P.parse_kv_end(frames[5].payload) == ("r1", 3, 0.5)
    got, want = decoder.result(), Pipeline.decode_data(pipe.encode(cache))
    for a, b in zip(got.layers, want.layers):
        assert np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values)
        assert np.array_equal(a.positions, b.positions)


def test_kv_payload_faults():
    stream = Pipeline.from_config({"stages": []}).encode_stream(kv_cache_data(1, 1, 1, 4, 8))
    with pytest.raises(ValueError, match="without its 'layers'"):
        P.kv_header_payload("r", {**stream.header, "layers": []})
    bad_cache = {**stream.header, "cache": {**stream.header["cache"], "kept": 99}}
    for bad in ({"request_id": "r", "header": bad_cache}, {"request_id": "", "header": stream.header},
                {"request_id": "r", "header": []}, {"request_id": "r", "header": {**stream.header, "layers": []}}):  # fmt: skip
        with pytest.raises(MalformedFrame):
            P.parse_kv_header(json.dumps(bad).encode())
    for bad in (b"", b"\x05\x00\x00", struct.pack("<I", 100) + b"{}", struct.pack("<I", 2) + b"[]",
                struct.pack("<I", 2) + b"{}", P.kv_layer_payload(0, {"sections": 3, "xxh3": "0"}, [])[0]):  # fmt: skip
        with pytest.raises(MalformedFrame):
            P.parse_kv_layer(memoryview(bad))
    for bad in ({"request_id": "r", "n_layers": -1}, {"request_id": "r", "n_layers": True},
                {"request_id": "r", "n_layers": 1, "encode_s": "1"}):  # fmt: skip
        with pytest.raises(MalformedFrame):
            P.parse_kv_end(json.dumps(bad).encode())


def test_the_layer_limit_follows_the_cache_and_max_frame():
    header = {"cache": {"batch": 1, "kv_heads": 2, "kept": 100, "head_dim": 64}}
    f32 = 2 * 4 * 1 * 2 * 100 * 64
    assert P.layer_frame_limit(header) == 2 * f32 + (1 << 20)
    assert P.layer_frame_limit(header, max_frame=5000) == 5000


def test_expect_type():
    P.expect_type(FT.MESSAGE, {FT.MESSAGE}, "here")
    with pytest.raises(UnexpectedFrame, match="KV_LAYER frame arrived for a message; the protocol allows MESSAGE"):
        P.expect_type(FT.KV_LAYER, {FT.MESSAGE}, "for a message")


# -- fuzzing --------------------------------------------------------------------------------------
_PARSERS = [P.parse_message, P.parse_error, P.parse_kv_header, P.parse_kv_end,
            lambda b: P.parse_kv_layer(memoryview(b)), lambda b: P.parse_json(b, "X")]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_frame_parser(data):
    try:
        P.parse_frames(data, max_payload=1 << 20)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=20, max_size=20))
def test_random_headers_are_accepted_or_named_errors(data):
    try:
        head = P.parse_header(data, max_payload=1 << 16)
    except ProtocolError:
        return
    assert head.length <= 1 << 16 and head.type in set(FT)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_frames_are_named_errors_or_the_original(data):
    kind = data.draw(st.sampled_from(list(FT)))
    payload = data.draw(st.binary(max_size=100))
    raw = bytearray(joined(P.frame(kind, [payload])))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        frames = P.parse_frames(raw)
    except ProtocolError:
        return
    want = [(kind, payload)] if raw else []  # only a no-op (or cutting everything) survives
    assert [(f.type, bytes(f.payload)) for f in frames] == want


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                              max_leaves=12).map(lambda o: json.dumps(o).encode())),
       st.integers(0, len(_PARSERS) - 1))  # fmt: skip
def test_payload_parsers_raise_only_malformed_frame(data, which):
    try:
        _PARSERS[which](data)
    except MalformedFrame:
        pass
