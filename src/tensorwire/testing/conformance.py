"""Conformance suites: the contract every codec and every KV stage must keep, as pytest classes.

One suite per kind. A test module subclasses the suite of its kind, lists the instances to
check, and pytest runs every test of the suite on each of them::

    from tensorwire.testing.conformance import QuantizerSuite

    class TestMyQuantizer(QuantizerSuite):
        stages = [MyQuantizer(bits=4), MyQuantizer(bits=2, group_size=32)]

A plugin stage (entry-point group ``tensorwire.stages``) runs the same suite as the
built-in ones. The suites need pytest and hypothesis (``tensorwire[dev]``).

What each suite checks:

* every stage (:class:`StageSuite`): its config is plain JSON with its registered ``id``,
  ``from_config`` rebuilds an equal stage of the same class (also through its kind's base
  class), equal stages hash alike, and an unknown parameter or another kind's base class
  is refused with :class:`~tensorwire.errors.StageConfigError`;
* :class:`TransformSuite`: shapes and dtype kept, inverse within ``round_trip_rtol`` (bit
  for bit when ``lossless``), each token transformed on its own;
* :class:`SelectorSuite`: sorted, unique, in-range indices of the declared count, the same
  count in every layer, and a pipeline round trip that keeps exactly those tokens;
* :class:`QuantizerSuite`: planes well formed, dequantized values within the stage's own
  ``error_bound`` (bit for bit when ``lossless``), deterministic, a missing plane refused;
* :class:`ArrayEncoderSuite` / :class:`BytesEncoderSuite`: bit-exact round trips on
  awkward sizes and values, and named errors for cut, padded or mis-described streams;
* :class:`CodecSuite` (lossless array codecs such as ``EnecCodec``): the numcodecs-style
  contract, bit-exact round trips of every dtype's awkward values, and named errors for
  every truncation and for bit flips;
* :class:`TransportSuite` (transports of the wire protocol, docs/PROTOCOL.md): messages,
  bit-exact KV transfers with their stats, error frames, timeouts, close, concurrency.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..codec.planes import LAYOUTS
from ..errors import (
    ConnectionClosed,
    CorruptData,
    FormatError,
    ObservationError,
    PeerError,
    ShapeMismatch,
    StageConfigError,
    TensorwireError,
    TransportTimeout,
    UnrepresentableValues,
)
from ..kv.pipeline import Pipeline
from ..kv.registry import stage_class
from ..kv.stage import (
    ArrayEncoder,
    BytesEncoder,
    KVCacheData,
    Observations,
    Plane,
    Quantizer,
    Selector,
    Stage,
    Transform,
    slot_of,
)
from .strategies import awkward_values, kv_cache_data, kv_like, raw_words

__all__ = [
    "ArrayEncoderSuite",
    "BytesEncoderSuite",
    "CodecSuite",
    "QuantizerSuite",
    "SelectorSuite",
    "StageSuite",
    "TransformSuite",
    "TransportSuite",
]

FLOAT32_EPS = 2.0**-23
FLOAT_DTYPES = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_KIND_BASES = {"transform": Transform, "selector": Selector, "quantizer": Quantizer,
               "array_encoder": ArrayEncoder, "bytes_encoder": BytesEncoder}  # fmt: skip


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _assert_within(error: np.ndarray, bound: np.ndarray, what: str) -> None:
    """``error <= bound`` element-wise (``bound`` broadcasts), naming the worst excess."""
    excess = error - bound
    if excess.size and excess.max() > 0:
        worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
        raise AssertionError(f"{what}: error {float(error[worst]):.3g} above the bound "
                             f"{float(np.broadcast_to(bound, error.shape)[worst]):.3g} at {worst}")  # fmt: skip


class _Parametrized:
    """Runs every test once per entry of a class attribute (``stages`` or ``codecs``)."""

    instances_attr: ClassVar[str]
    argument: ClassVar[str]

    def pytest_generate_tests(self, metafunc) -> None:
        if self.argument in metafunc.fixturenames:
            instances = list(getattr(self, self.instances_attr))
            if not instances:
                raise TypeError(f"{type(self).__name__} lists no {self.instances_attr} to check")
            metafunc.parametrize(self.argument, instances, ids=[f"{i}-{x!r}" for i, x in enumerate(instances)])


# -- every stage ----------------------------------------------------------------------------
class StageSuite(_Parametrized):
    """The config contract of every stage; subclasses add the behaviour of their kind."""

    instances_attr = "stages"
    argument = "stage"
    stages: ClassVar[Sequence[Stage]] = ()

    def test_config_is_plain_json_with_the_registered_id(self, stage: Stage) -> None:
        config = stage.to_config()
        assert json.loads(json.dumps(config)) == config
        assert config["id"] == stage.id
        assert stage_class(stage.id) is type(stage)

    def test_config_round_trip(self, stage: Stage) -> None:
        config = stage.to_config()
        rebuilt = Stage.from_config(json.loads(json.dumps(config)))
        assert rebuilt == stage and type(rebuilt) is type(stage) and hash(rebuilt) == hash(stage)
        assert rebuilt.to_config() == config
        assert _KIND_BASES[slot_of(stage)].from_config(config) == stage

    def test_unknown_parameter_and_wrong_kind_are_refused(self, stage: Stage) -> None:
        with pytest.raises(StageConfigError, match="no parameter"):
            Stage.from_config({**stage.to_config(), "no_such_parameter": 1})
        others = [base for slot, base in _KIND_BASES.items() if slot != slot_of(stage) and base.kind != stage.kind]
        with pytest.raises(StageConfigError):
            others[0].from_config(stage.to_config())


# -- transforms -------------------------------------------------------------------------------
class TransformSuite(StageSuite):
    """Transforms: float32 in, float32 out, invertible, token by token.

    ``round_trip_rtol`` bounds ``|inverse(forward(x)) - x|`` relative to each token's
    largest magnitude, for transforms that are not ``lossless``; the default suits an
    orthogonal float32 rotation of ``head_dim`` channels (two matrix products of at most
    128 terms each, every term rounded once).
    """

    stages: ClassVar[Sequence[Transform]] = ()
    shapes: ClassVar[Sequence[tuple[int, int, int, int]]] = ((1, 1, 1, 8), (2, 3, 7, 64), (1, 2, 33, 128))
    round_trip_rtol: ClassVar[float] = 2 * 128 * FLOAT32_EPS

    def test_inverse_undoes_forward(self, stage: Transform) -> None:
        for n, shape in enumerate(self.shapes):
            keys, values = kv_like(*shape, seed=n)
            fk, fv = stage.forward(n, keys, values)
            assert fk.dtype == fv.dtype == np.float32 and fk.shape == fv.shape == shape
            bk, bv = stage.inverse(n, fk, fv)
            for x, back in ((keys, bk), (values, bv)):
                if stage.lossless:
                    assert _same_bits(back.astype(np.float32), x)
                else:
                    scale = np.abs(x).max(axis=-1, keepdims=True)
                    _assert_within(np.abs(back - x), self.round_trip_rtol * scale, f"inverse(forward(x)) of {shape}")

    def test_tokens_are_transformed_independently(self, stage: Transform) -> None:
        """A subset of tokens transforms to the same subset of the result (so transforms
        commute with selection), up to the rounding of a product of ``head_dim`` terms:
        BLAS may sum them in another order for another matrix shape."""
        shape = self.shapes[-1]
        keys, values = kv_like(*shape, seed=7)
        kept = np.arange(0, shape[2], 3)
        whole = stage.forward(0, keys, values)
        part = stage.forward(0, np.ascontiguousarray(keys[:, :, kept]), np.ascontiguousarray(values[:, :, kept]))
        for x, a, b in ((keys, whole[0], part[0]), (values, whole[1], part[1])):
            tol = shape[3] * FLOAT32_EPS * np.abs(x[:, :, kept]).max(axis=-1, keepdims=True)
            _assert_within(np.abs(a[:, :, kept] - b), tol, "a token subset transformed alone")


# -- selectors -----------------------------------------------------------------------------------
def _observations(cache: KVCacheData, window: int, seed: int) -> Observations:
    rng = np.random.default_rng(seed)
    batch, heads, _, dim = cache.layers[0].keys.shape
    return Observations([rng.standard_normal((batch, 2 * heads, window, dim)).astype(np.float32)
                         for _ in cache.layers])  # fmt: skip


class SelectorSuite(StageSuite):
    """Selectors: which tokens each (layer, batch, head) keeps."""

    stages: ClassVar[Sequence[Selector]] = ()
    token_counts: ClassVar[Sequence[int]] = (1, 2, 7, 100, 301)
    observe_window: ClassVar[int] = 64  # query vectors given to selectors that need them

    def _cache(self, stage: Selector, tokens: int, seed: int = 0) -> KVCacheData:
        cache = kv_cache_data(3, 2, 2, tokens, 16, seed=seed)
        if stage.needs_observations:
            cache.observations = _observations(cache, min(self.observe_window, tokens), seed)
        return cache

    def test_indices_are_sorted_unique_in_range_and_counted(self, stage: Selector) -> None:
        for tokens in self.token_counts:
            cache = self._cache(stage, tokens)
            indices = stage.select(cache)
            assert len(indices) == cache.n_layers
            kept = stage.kept(tokens)
            assert 0 < kept <= tokens
            for idx in indices:
                assert idx.dtype == np.int64 and idx.shape == (2, 2, kept)
                assert idx.min() >= 0 and idx.max() < tokens
                assert np.all(np.diff(idx, axis=-1) > 0), "indices must be strictly ascending per head"

    def test_a_pipeline_keeps_exactly_the_selected_tokens(self, stage: Selector) -> None:
        cache = self._cache(stage, 100, seed=3)
        indices = stage.select(cache)
        decoded = Pipeline((stage,)).decode_data(Pipeline((stage,)).encode(cache))
        assert decoded.seq_len == cache.seq_len
        for layer, idx, original in zip(decoded.layers, indices, cache.layers):
            assert np.array_equal(layer.positions, np.take_along_axis(original.positions, idx, axis=2))
            assert _same_bits(layer.keys, np.take_along_axis(original.keys, idx[..., None], axis=2))
            assert _same_bits(layer.values, np.take_along_axis(original.values, idx[..., None], axis=2))

    def test_missing_observations_are_a_named_error(self, stage: Selector) -> None:
        cache = kv_cache_data(2, 1, 2, 50, 16)
        if stage.needs_observations:
            with pytest.raises(ObservationError):
                Pipeline((stage,)).encode(cache)
        else:
            Pipeline((stage,)).encode(cache)  # observations are optional for it


# -- quantizers ------------------------------------------------------------------------------------
class QuantizerSuite(StageSuite):
    """Quantizers: float32 keys and values to named planes and back, within their bound."""

    stages: ClassVar[Sequence[Quantizer]] = ()
    shapes: ClassVar[Sequence[tuple[int, int, int, int]]] = ((1, 1, 1, 64), (2, 3, 7, 64), (1, 2, 300, 64), (1, 2, 0, 64))

    def _layer(self, shape, seed: int):
        return kv_like(*shape, seed=seed)

    def test_planes_are_well_formed_and_decode_within_the_bound(self, stage: Quantizer) -> None:
        for n, shape in enumerate(self.shapes):
            keys, values = self._layer(shape, n)
            planes = stage.quantize(n % 4, 4, keys, values)
            assert planes and all(isinstance(name, str) and isinstance(p, Plane) for name, p in planes.items())
            for name, plane in planes.items():
                if plane.bits is not None:
                    assert plane.data.dtype == np.uint8
                    assert plane.data.size == 0 or int(plane.data.max()) < 1 << plane.bits, name
            k, v = stage.dequantize(n % 4, 4, planes, shape)
            assert k.dtype == v.dtype == np.float32 and k.shape == v.shape == shape
            if stage.lossless:
                assert _same_bits(k, keys) and _same_bits(v, values)
            bound = stage.error_bound(keys, values)
            if bound is not None and keys.size:
                assert max(float(np.abs(k - keys).max()), float(np.abs(v - values).max())) <= bound

    def test_quantization_is_deterministic(self, stage: Quantizer) -> None:
        keys, values = self._layer(self.shapes[2], 11)
        a, b = stage.quantize(1, 4, keys, values), stage.quantize(1, 4, keys.copy(), values.copy())
        assert a.keys() == b.keys()
        assert all(_same_bits(a[name].data, b[name].data) and a[name].bits == b[name].bits for name in a)

    def test_a_missing_plane_is_corrupt_data(self, stage: Quantizer) -> None:
        shape = self.shapes[1]
        keys, values = self._layer(shape, 5)
        planes = stage.quantize(0, 4, keys, values)
        for name in planes:
            with pytest.raises(CorruptData):
                stage.dequantize(0, 4, {k: p for k, p in planes.items() if k != name}, shape)


# -- encoders ---------------------------------------------------------------------------------------
class ArrayEncoderSuite(StageSuite):
    """Array encoders: a plane to bytes and back, bit for bit, with the header's dtype, shape and bits."""

    stages: ClassVar[Sequence[ArrayEncoder]] = ()
    float_dtypes: ClassVar[Sequence[str]] = tuple(FLOAT_DTYPES)
    lengths: ClassVar[Sequence[int]] = (0, 1, 7, 9, 1000)

    def _planes(self) -> list[Plane]:
        rng = np.random.default_rng(0)
        planes = []
        for bits in range(1, 9):
            for n in self.lengths:
                planes.append(Plane(rng.integers(0, 1 << bits, n, dtype=np.uint8), bits=bits))
        for name in self.float_dtypes:
            special = awkward_values(LAYOUTS[name])
            for n in self.lengths:
                planes.append(Plane(special[np.arange(n) % special.size].view(FLOAT_DTYPES[name])))
            with np.errstate(over="ignore"):
                planes.append(Plane(kv_like(1, 3, 7, 64)[0].astype(FLOAT_DTYPES[name])))
        return planes

    def test_round_trip_is_bit_exact(self, stage: ArrayEncoder) -> None:
        for plane in self._planes():
            data = stage.encode(plane)
            assert isinstance(data, bytes)
            out = stage.decode(data, plane.data.dtype, plane.data.shape, plane.bits)
            assert _same_bits(out, plane.data), f"{stage!r} changed a {plane.data.dtype} plane of {plane.data.size}"
            assert out.flags.writeable

    def test_cut_or_padded_streams_are_named_errors(self, stage: ArrayEncoder) -> None:
        for plane in self._planes():
            if plane.data.size == 0:
                continue
            data = stage.encode(plane)
            for bad in (data[:-1], data + b"\0"):
                with pytest.raises(FormatError):
                    stage.decode(bad, plane.data.dtype, plane.data.shape, plane.bits)

    def test_a_bad_header_description_is_refused(self, stage: ArrayEncoder) -> None:
        plane = Plane(np.arange(20, dtype=np.uint8) % 4, bits=2)
        data = stage.encode(plane)
        for bits in (0, 9, True, "2"):
            with pytest.raises(TensorwireError):
                stage.decode(data, np.uint8, (20,), bits)
        with pytest.raises(TensorwireError):
            stage.decode(data, np.uint8, (-1,), 2)


class BytesEncoderSuite(StageSuite):
    """Bytes encoders: bytes to bytes and back, told the exact decoded size."""

    stages: ClassVar[Sequence[BytesEncoder]] = ()

    def _inputs(self) -> list[bytes]:
        rng = np.random.default_rng(0)
        codes = (kv_like(1, 2, 50, 64)[0] * 4).astype(np.int8).tobytes()  # compressible, like packed codes
        return [b"", b"\0", rng.bytes(1), rng.bytes(1000), b"\x07" * 100_000, codes]

    def test_round_trip(self, stage: BytesEncoder) -> None:
        for data in self._inputs():
            packed = stage.encode(data)
            assert isinstance(packed, bytes)
            assert bytes(stage.decode(packed, len(data))) == data
            assert bytes(stage.decode(memoryview(packed), len(data))) == data

    def test_wrong_sizes_and_damage_are_named_errors(self, stage: BytesEncoder) -> None:
        data = self._inputs()[-1]
        packed = stage.encode(data)
        for size in (len(data) - 1, len(data) + 1, 1 << 40, -1):
            with pytest.raises(FormatError):
                stage.decode(packed, size)
        with pytest.raises(FormatError):
            stage.decode(packed[: len(packed) // 2], len(data))


# -- lossless array codecs ---------------------------------------------------------------------------
class CodecSuite(_Parametrized):
    """Lossless array codecs: ``encode(array) -> bytes``, ``decode(buf, out=None) -> array``.

    Configs are plain JSON with an ``"id"``; codecs with equal configs are equal. Every
    dtype in ``dtypes`` round-trips bit for bit, including NaN payloads, infinities,
    subnormals, -0.0, empty and 0-d arrays; a truncated or bit-flipped stream raises a
    :class:`~tensorwire.errors.FormatError`, never wrong data.
    """

    instances_attr = "codecs"
    argument = "codec"
    codecs: ClassVar[Sequence[Any]] = ()
    dtypes: ClassVar[Sequence[str]] = tuple(FLOAT_DTYPES)

    def test_config_round_trip(self, codec) -> None:
        config = codec.to_config()
        assert json.loads(json.dumps(config)) == config and isinstance(config["id"], str)
        rebuilt = type(codec).from_config(json.loads(json.dumps(config)))
        assert rebuilt == codec and rebuilt.to_config() == config

    # pytest makes one (stateless) suite instance per codec: hypothesis sees them as
    # different executors of one test, which is harmless here.
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(data=st.data())
    def test_round_trip_is_bit_exact(self, codec, data) -> None:
        layout, words = data.draw(raw_words(data.draw(st.sampled_from(sorted(self.dtypes))), max_size=5000))
        array = words.view(FLOAT_DTYPES[layout.name])
        out = codec.decode(codec.encode(array))
        assert _same_bits(out, array)

    def test_awkward_shapes(self, codec) -> None:
        for name in self.dtypes:
            special = awkward_values(LAYOUTS[name]).view(FLOAT_DTYPES[name])
            for array in (special[:0], special[:1].reshape(()), special.reshape(1, -1), np.tile(special, (3, 7))[:, ::2]):
                assert _same_bits(codec.decode(codec.encode(array)), np.array(array, order="C"))  # keeps 0-d

    def test_decode_into_out(self, codec) -> None:
        x = np.linspace(-3, 3, 5000, dtype=np.float32).reshape(50, 100)
        out = np.empty_like(x)
        assert codec.decode(codec.encode(x), out=out) is out and _same_bits(out, x)

    def test_truncations_and_bit_flips_are_named_errors(self, codec) -> None:
        frame = codec.encode(kv_like(1, 2, 300, 64)[0].astype(ml_dtypes.bfloat16))
        for cut in range(0, len(frame), max(1, len(frame) // 150)):
            with pytest.raises(FormatError):
                codec.decode(frame[:cut])
        rng = np.random.default_rng(0)
        for at in rng.choice(len(frame), size=min(150, len(frame)), replace=False):
            bad = bytearray(frame)
            bad[at] ^= 1 << int(rng.integers(8))
            with pytest.raises(FormatError):
                codec.decode(bytes(bad))


# -- transports -------------------------------------------------------------------------------------
def _same_cache(got: KVCacheData, want: KVCacheData) -> bool:
    return (got.seq_len == want.seq_len and got.dtype == want.dtype and got.n_layers == want.n_layers
            and all(_same_bits(a.keys, b.keys) and _same_bits(a.values, b.values)
                    and np.array_equal(a.positions, b.positions) for a, b in zip(got.layers, want.layers)))  # fmt: skip


class _FailingStream:
    """An encoded stream whose encoder raises at layer ``fail_at`` (a sender-side failure)."""

    def __init__(self, stream, fail_at: int):
        self.header, self.bitmap = stream.header, stream.bitmap
        self._layers, self._fail_at = stream.layers, fail_at

    @property
    def layers(self):
        for i, item in enumerate(self._layers):
            if i == self._fail_at:
                raise UnrepresentableValues(f"layer {i} holds NaN (raised on purpose by the suite)")
            yield item


class TransportSuite:
    """The contract of a transport of the wire protocol (docs/PROTOCOL.md), for any implementation.

    A subclass implements :meth:`pair`: an async context manager that yields two connected,
    authenticated connections ``(client, server)`` with the API of
    :class:`tensorwire.serve.Connection`, passing ``options`` (``read_timeout``, ...) to both,
    and closes everything on exit. Each test runs in its own event loop within ``time_limit``.

    What it checks: control messages round-trip in order in both directions and non-JSON
    is refused before sending; a KV stream arrives equal, bit for bit, to
    ``Pipeline.decode_data(pipe.encode(cache))`` (with and without evicted tokens) with
    consistent stats; a cache of another shape is :class:`ShapeMismatch` on the receiver
    and an error on the sender; an encoder failure reaches the receiver as a non-fatal
    :class:`PeerError` and both ends go on; a non-fatal ERROR leaves the connection usable;
    a silent peer raises :class:`TransportTimeout` after about the timeout (and the
    connection survives it); a closed peer raises :class:`ConnectionClosed`; two pairs
    transfer at the same time.
    """

    time_limit: ClassVar[float] = 60.0
    pipelines: ClassVar[Sequence[dict[str, Any]]] = (
        {"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "zstd"}]},
        {"stages": [{"id": "streaming_llm", "keep_fraction": 0.5}, {"id": "zstd"}]},
        {"stages": []},
    )
    shapers: ClassVar[Sequence[str]] = ("none", "token-bucket", "tbf")

    def pair(self, **options: Any):
        """An async context manager yielding ``(client, server)``; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} must implement pair()")

    def run(self, body) -> Any:
        async def bounded():
            return await asyncio.wait_for(body(), self.time_limit)

        return asyncio.run(bounded())

    # -- control messages ----------------------------------------------------------------
    def test_messages_round_trip_in_order_both_ways(self) -> None:
        messages = [{"type": "request", "request_id": "r-1", "prompt": "héllo ✓ " * 50, "max_tokens": 2**40},
                    {"type": "nested", "a": [1, 2.5, None, True, {"b": []}], "z": -0.0},
                    {"type": "big", "blob": "x" * 200_000}]  # fmt: skip

        async def body():
            async with self.pair() as (client, server):
                for msg in messages:
                    await client.send_message(msg)
                for msg in messages:
                    assert await server.recv_message() == msg
                for msg in reversed(messages):
                    await server.send_message(msg)
                for msg in reversed(messages):
                    assert await client.recv_message() == msg

        self.run(body)

    def test_a_message_is_a_json_object_with_a_type(self) -> None:
        async def body():
            async with self.pair() as (client, server):
                for bad in ({}, {"type": 3}, ["type"], {"type": "x", "v": float("nan")}, {"type": "x", "v": object()}):
                    with pytest.raises(TypeError):
                        await client.send_message(bad)
                await client.send_message({"type": "still-fine"})
                assert (await server.recv_message())["type"] == "still-fine"

        self.run(body)

    # -- KV transfers ----------------------------------------------------------------------
    def test_kv_arrives_bit_for_bit(self) -> None:
        cache = kv_cache_data(4, 1, 2, 97, 64, seed=5)

        async def body():
            async with self.pair() as (client, server):
                for n, config in enumerate(self.pipelines):
                    pipe = Pipeline.from_config(config)
                    request_id = f"req-{n}"
                    sent, (got, received) = await _both(client.send_kv(request_id, pipe.encode_stream(cache)),
                                                        server.recv_kv(request_id=request_id))  # fmt: skip
                    assert _same_cache(got, Pipeline.decode_data(pipe.encode(cache))), config
                    for stats, direction in ((sent, "send"), (received, "recv")):
                        assert stats.request_id == request_id and stats.direction == direction
                        assert stats.n_layers == cache.n_layers and stats.shaper in self.shapers
                        assert stats.wire_bytes > stats.payload_bytes > 0 and stats.total_s > 0
                        assert 0 <= stats.overlap_s <= stats.wire_s + 1e-9
                    assert sent.wire_bytes == received.wire_bytes
                    assert sent.encode_s > 0 and received.decode_s > 0 and received.peer_encode_s is not None
                    assert json.loads(json.dumps(sent.to_dict()))["request_id"] == request_id

        self.run(body)

    def test_a_cache_of_another_shape_is_refused(self) -> None:
        cache = kv_cache_data(2, 1, 2, 16, 16)
        pipe = Pipeline.from_config(self.pipelines[-1])

        async def body():
            async with self.pair() as (client, server):
                sending = asyncio.ensure_future(client.send_kv("r", pipe.encode_stream(cache)))
                with pytest.raises(ShapeMismatch):
                    await server.recv_kv(expect={"n_layers": 30})
                with pytest.raises(TensorwireError):  # the receiver's ERROR, or the connection it closed
                    await sending
                    await client.recv_message(timeout=5.0)

        self.run(body)

    def test_an_encoder_failure_reaches_the_receiver_and_both_go_on(self) -> None:
        cache = kv_cache_data(4, 1, 2, 16, 16)
        pipe = Pipeline.from_config(self.pipelines[-1])

        async def body():
            async with self.pair() as (client, server):
                sending = asyncio.ensure_future(client.send_kv("r1", _FailingStream(pipe.encode_stream(cache), 2)))
                with pytest.raises(PeerError) as caught:
                    await server.recv_kv()
                assert not caught.value.fatal and caught.value.request_id == "r1"
                with pytest.raises(UnrepresentableValues):
                    await sending
                sent, (got, _) = await _both(client.send_kv("r2", pipe.encode_stream(cache)), server.recv_kv())
                assert _same_cache(got, Pipeline.decode_data(pipe.encode(cache)))

        self.run(body)

    # -- errors, timeouts, close --------------------------------------------------------------
    def test_a_non_fatal_error_keeps_the_connection(self) -> None:
        async def body():
            async with self.pair() as (client, server):
                await server.send_error("busy", "no decode slot free; retry", request_id="r9")
                with pytest.raises(PeerError) as caught:
                    await client.recv_message()
                assert (caught.value.code, caught.value.fatal, caught.value.request_id) == ("busy", False, "r9")
                await server.send_message({"type": "after"})
                assert (await client.recv_message())["type"] == "after"

        self.run(body)

    def test_a_silent_peer_times_out(self) -> None:
        async def body():
            async with self.pair(read_timeout=0.3) as (client, server):
                started = time.monotonic()
                with pytest.raises(TransportTimeout):
                    await client.recv_message()
                assert 0.25 <= time.monotonic() - started < 5.0
                with pytest.raises(TimeoutError):  # the built-in, for callers that do not know tensorwire
                    await client.recv_message(timeout=0.1)
                await server.send_message({"type": "late"})  # nothing of a frame had come: still in step
                assert (await client.recv_message())["type"] == "late"

        self.run(body)

    def test_a_closed_peer_is_connection_closed(self) -> None:
        async def body():
            async with self.pair() as (client, server):
                await server.close()
                with pytest.raises(ConnectionClosed):
                    await client.recv_message(timeout=5.0)
                with pytest.raises(ConnectionError):
                    for _ in range(100):  # the first writes may still be buffered by the OS
                        await client.send_message({"type": "into the void", "pad": "x" * 10_000})

        self.run(body)

    def test_two_pairs_transfer_at_once(self) -> None:
        cache = kv_cache_data(3, 1, 2, 64, 32)
        pipe = Pipeline.from_config(self.pipelines[0])
        want = Pipeline.decode_data(pipe.encode(cache))

        async def one(n: int):
            async with self.pair() as (client, server):
                _, (got, _) = await _both(client.send_kv(f"r{n}", pipe.encode_stream(cache)), server.recv_kv())
                assert _same_cache(got, want)

        async def body():
            await asyncio.gather(one(0), one(1), one(2))

        self.run(body)


async def _both(first, second):
    """Run two coroutines at once (a sender and a receiver); returns both results."""
    return tuple(await asyncio.gather(first, second))
