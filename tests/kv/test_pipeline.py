"""Pipeline order checks, configs and round trips (the payload framing: test_payload.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorwire.errors import ChecksumMismatch, CorruptData, Truncated
from tensorwire.kv import Pipeline, Stage, StageConfigError
from tensorwire.kv.pipeline import StreamDecoder
from tensorwire.kv.presets import PRESETS, resolve
from tensorwire.kv.stage import Quantizer
from tensorwire.kv.registry import BUILTIN_STAGES, stage_class, stage_ids
from tensorwire.testing.strategies import kv_cache_data, kv_caches


def pipe(*stages: dict) -> Pipeline:
    return Pipeline.from_config({"stages": list(stages)})


def assert_same_cache(a, b) -> None:
    assert a.seq_len == b.seq_len and len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x.keys.tobytes() == y.keys.tobytes()
        assert x.values.tobytes() == y.values.tobytes()
        np.testing.assert_array_equal(x.positions, y.positions)


# -- building ---------------------------------------------------------------------------
def test_every_builtin_stage_imports_and_has_its_id():
    for stage_id in BUILTIN_STAGES:
        klass = stage_class(stage_id)
        assert klass.id == stage_id
    assert set(BUILTIN_STAGES) <= set(stage_ids())


@pytest.mark.parametrize(
    "stages",
    [
        [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "streaming_llm", "keep_fraction": 0.5}],  # selector after quantizer
        [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "kivi", "k_bits": 4, "v_bits": 4}],  # two quantizers
        [{"id": "zstd"}, {"id": "raw"}],  # array encoder after a bytes encoder
        [{"id": "streaming_llm", "keep_fraction": 0.5}, {"id": "hadamard", "seed": 0}],  # transform after selector
        [{"id": "raw"}, {"id": "enec", "level": "fast"}],  # two array encoders
    ],
)
def test_wrong_order_is_rejected_when_built(stages):
    with pytest.raises(StageConfigError):
        pipe(*stages)


def test_bad_configs_name_the_problem():
    with pytest.raises(StageConfigError, match="unknown stage id 'nope'"):
        pipe({"id": "nope"})
    with pytest.raises(StageConfigError, match="no parameter"):
        pipe({"id": "zstd", "colour": 1})
    with pytest.raises(StageConfigError, match="is a encoder, expected a quantizer|expected a quantizer"):
        Quantizer.from_config({"id": "zstd"})
    with pytest.raises(StageConfigError):
        Stage.from_config({"level": 3})
    with pytest.raises(StageConfigError):
        Pipeline.from_config({"stages": 3})
    with pytest.raises(StageConfigError):
        Pipeline(("zstd",))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_their_config(name):
    p = Pipeline.from_config(resolve(name))
    again = Pipeline.from_config(json.loads(json.dumps(p.to_config())))
    assert again == p and hash(again) == hash(p)


def test_resolve_takes_json_text_and_files(tmp_path):
    config = {"stages": [{"id": "zstd", "level": 5}]}
    assert resolve(json.dumps(config)) == config
    path = tmp_path / "p.json"
    path.write_text(json.dumps(config))
    assert resolve(str(path)) == config
    with pytest.raises(StageConfigError):
        resolve("not-a-preset")


# -- round trips ------------------------------------------------------------------------
LOSSLESS = [
    [],
    [{"id": "enec", "level": "fast"}],
    [{"id": "enec", "level": "max"}, {"id": "zstd", "level": 1}],
    [{"id": "identity"}, {"id": "keep_all"}, {"id": "cast", "dtype": "F32"}, {"id": "lz4"}],
]


@pytest.mark.parametrize("stages", LOSSLESS, ids=lambda s: "+".join(x["id"] for x in s) or "raw")
@settings(max_examples=15)
@given(cache=kv_caches())
def test_lossless_pipelines_are_bit_exact(stages, cache):
    p = pipe(*stages)
    assert p.lossless
    assert_same_cache(Pipeline.decode_data(p.encode(cache)), cache)


def test_lossless_keeps_nan_inf_and_negative_zero():
    cache = kv_cache_data(2, 1, 2, 9, 16)
    special = np.array([np.nan, -np.inf, np.inf, -0.0, 1e-45], dtype=np.float32)
    cache.layers[0].keys.reshape(-1)[: special.size] = special
    cache.layers[1].values.reshape(-1)[-special.size :] = special
    for stages in LOSSLESS:
        assert_same_cache(Pipeline.decode_data(pipe(*stages).encode(cache)), cache)


@settings(max_examples=15)
@given(cache=kv_caches(max_tokens=40), keep=st.floats(0.05, 1.0))
def test_selection_round_trips_shapes_and_positions(cache, keep):
    p = pipe({"id": "streaming_llm", "keep_fraction": keep, "sinks": 2}, {"id": "kivi", "k_bits": 4, "v_bits": 4, "group_size": 8, "residual": 4})
    decoded = Pipeline.decode_data(p.encode(cache))
    kept = p.selector.kept(cache.seq_len)
    assert decoded.seq_len == cache.seq_len
    for original, layer, index in zip(cache.layers, decoded.layers, p.selector.select(cache)):
        b, h, _, d = original.keys.shape
        assert layer.keys.shape == layer.values.shape == (b, h, kept, d)
        np.testing.assert_array_equal(layer.positions, np.take_along_axis(original.positions, index, axis=2))


@settings(max_examples=15)
@given(cache=kv_caches(max_tokens=50), bits=st.sampled_from([2, 4, 8]))
def test_lossy_pipelines_stay_within_the_quantizer_bound(cache, bits):
    p = pipe({"id": "uniform", "bits": bits, "group_size": 8, "axis": "token"}, {"id": "zstd"})
    decoded = Pipeline.decode_data(p.encode(cache))
    for original, layer in zip(cache.layers, decoded.layers):
        bound = p.quantizer.error_bound(original.keys, original.values)
        assert bound is not None
        assert np.max(np.abs(layer.keys - original.keys)) <= bound
        assert np.max(np.abs(layer.values - original.values)) <= bound


def test_hadamard_pipeline_round_trips_within_float_rounding():
    cache = kv_cache_data(2, 1, 3, 33, 64)
    decoded = Pipeline.decode_data(pipe({"id": "hadamard", "seed": 7}).encode(cache))
    for original, layer in zip(cache.layers, decoded.layers):
        np.testing.assert_allclose(layer.keys, original.keys, rtol=0, atol=1e-4 * np.abs(original.keys).max())


def test_empty_cache_round_trips():
    cache = kv_cache_data(0, 1, 1, 1, 8)
    decoded = Pipeline.decode_data(Pipeline().encode(cache))
    assert decoded.layers == [] and decoded.seq_len == cache.seq_len


def test_encode_parts_join_to_the_payload():
    cache = kv_cache_data(3, 1, 2, 20, 16)
    p = pipe({"id": "streaming_llm", "keep_fraction": 0.5}, {"id": "zstd"})
    assert b"".join(p.encode_parts(cache)) == p.encode(cache)


# -- layer by layer --------------------------------------------------------------------------
STREAMED = {"stages": [{"id": "key_norm", "keep_fraction": 0.5}, {"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 8,
                                                                    "residual": 4}, {"id": "zstd"}]}  # fmt: skip


def test_a_streamed_payload_decodes_like_the_whole_one():
    cache = kv_cache_data(3, 1, 2, 24, 16)
    p = Pipeline.from_config(STREAMED)
    stream = p.encode_stream(cache)
    assert "layers" not in stream.header and stream.header["cache"]["n_layers"] == 3
    decoder = StreamDecoder(json.loads(json.dumps(stream.header)), stream.bitmap, expect={"kv_heads": 2})
    for pieces, table in stream.layers:
        layer = decoder.add_layer(json.loads(json.dumps(table)), b"".join(pieces))
        assert layer.keys.shape == (1, 2, 12, 16)
    streamed, whole = decoder.result(), Pipeline.decode_data(p.encode(cache))
    assert_same_cache(streamed, whole)
    for a, b in zip(streamed.layers, whole.layers):
        assert np.array_equal(a.positions, b.positions) and a.values.tobytes() == b.values.tobytes()


def test_layers_are_encoded_only_when_asked_for(monkeypatch):
    p = Pipeline.from_config(STREAMED)
    encoded = []
    real = Pipeline.encode_layer
    monkeypatch.setattr(Pipeline, "encode_layer", lambda self, i, *a: encoded.append(i) or real(self, i, *a))
    stream = p.encode_stream(kv_cache_data(3, 1, 2, 24, 16))
    assert encoded == []
    next(stream.layers)
    assert encoded == [0]


def test_stream_decoder_refuses_damaged_missing_and_extra_layers():
    cache = kv_cache_data(2, 1, 2, 24, 16)
    stream = Pipeline.from_config(STREAMED).encode_stream(cache)
    layers = [(b"".join(pieces), table) for pieces, table in stream.layers]
    decoder = StreamDecoder(stream.header, stream.bitmap)
    body, table = layers[0]
    with pytest.raises(ChecksumMismatch, match="layer 0"):
        decoder.add_layer(table, bytes([body[0] ^ 1]) + body[1:])
    with pytest.raises(Truncated):
        decoder.add_layer(table, body[:-1])
    with pytest.raises(CorruptData, match="more than its table"):
        decoder.add_layer(table, body + b"\0")
    with pytest.raises(CorruptData):
        decoder.add_layer({"sections": "?", "xxh3": "0"}, body)
    decoder.add_layer(table, body)
    with pytest.raises(Truncated, match="1 of 2 layers"):
        decoder.result()
    decoder.add_layer(*layers[1][::-1])
    with pytest.raises(CorruptData, match="after all 2 layers"):
        decoder.add_layer(*layers[1][::-1])
    assert decoder.done and len(decoder.result().layers) == 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.pop("cache"),
        lambda h: h.__setitem__("pipeline", []),
        lambda h: h["cache"].__setitem__("kept", True),
        lambda h: h["cache"].__setitem__("kept", 10**6),
        lambda h: h.__setitem__("positions", {"encoding": "bitmap"}),
        lambda h: h.pop("positions"),
    ],
)
def test_stream_decoder_refuses_bad_headers(edit):
    stream = Pipeline.from_config(STREAMED).encode_stream(kv_cache_data(2, 1, 2, 24, 16))
    header = json.loads(json.dumps(stream.header))
    edit(header)
    with pytest.raises(CorruptData):
        StreamDecoder(header, stream.bitmap)


def test_stream_decoder_checks_the_bitmap_length():
    stream = Pipeline.from_config(STREAMED).encode_stream(kv_cache_data(2, 1, 2, 24, 16))
    with pytest.raises(Truncated):
        StreamDecoder(stream.header, stream.bitmap[:-1])
    with pytest.raises(CorruptData, match="bitmap"):
        StreamDecoder(stream.header, stream.bitmap + b"\0")
