"""A KV compression pipeline: ordered stages, their config, and the self-describing payload.

Order (checked when the pipeline is built)::

    transforms*  ->  selector?  ->  quantizer?  ->  array encoder?  ->  bytes encoders*

Without a quantizer the planes are the float32 keys and values themselves (lossless with
lossless transforms and encoders); without an array encoder the planes are stored ``raw``.

The payload (docs/FORMAT.md, "KV payload"; framed by ``payload.py``) carries everything a
receiver needs: the pipeline config, the cache shape, which token positions were kept,
and every layer's planes with a checksum per layer, so a layer can be checked and decoded
as soon as its bytes arrive.

Example
-------
>>> from tensorwire.kv import Pipeline
>>> pipe = Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "zstd"}]})
>>> payload = pipe.encode(past_key_values)          # a transformers DynamicCache  # doctest: +SKIP
>>> cache = Pipeline.decode(payload)                 # a DynamicCache to continue from  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np

from ..codec.dtypes import dtype_name_of, numpy_dtype
from ..errors import CorruptData, Truncated
from . import payload
from .stage import (
    ArrayEncoder,
    BytesEncoder,
    KVCacheData,
    KVLayer,
    ObservationError,
    Plane,
    Quantizer,
    SINGLE_SLOTS,
    SLOTS,
    Selector,
    ShapeMismatch,
    Stage,
    StageConfigError,
    Transform,
    slot_of,
)

__all__ = ["Pipeline", "EncodedStream", "StreamDecoder"]


@dataclass(frozen=True, eq=False)
class Pipeline:
    """An ordered, validated list of stages. Build with ``Pipeline(stages)`` or ``from_config``."""

    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        last = -1
        seen: set[str] = set()
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise StageConfigError(f"a pipeline holds Stage objects, got {type(stage).__name__}")
            slot = slot_of(stage)
            if slot in SINGLE_SLOTS and slot in seen:
                raise StageConfigError(f"a pipeline takes at most one {slot.replace('_', ' ')}; {stage.id!r} is a second one")
            if SLOTS.index(slot) < last:
                raise StageConfigError(
                    f"stage {stage.id!r} ({slot.replace('_', ' ')}) comes too late; the order is "
                    "transforms -> selector -> quantizer -> array encoder -> bytes encoders"
                )
            seen.add(slot)
            last = SLOTS.index(slot)

    # -- configuration -------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        return {"stages": [stage.to_config() for stage in self.stages]}

    @classmethod
    def from_config(cls, config: dict[str, Any] | Sequence[dict[str, Any]]) -> "Pipeline":
        """Build a pipeline from ``{"stages": [...]}`` (or the bare list of stage configs)."""
        stages = config.get("stages") if isinstance(config, dict) else config
        if not isinstance(stages, (list, tuple)):
            raise StageConfigError(f"a pipeline config is {{'stages': [...]}}, got {config!r}")
        return cls(tuple(Stage.from_config(s) for s in stages))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_config(), sort_keys=True))

    def __repr__(self) -> str:
        return "Pipeline(" + " -> ".join(s.id for s in self.stages) + ")" if self.stages else "Pipeline(raw)"

    def _of(self, kind: type) -> list:
        return [s for s in self.stages if isinstance(s, kind)]

    @cached_property
    def transforms(self) -> list[Transform]:
        return self._of(Transform)

    @cached_property
    def selector(self) -> Selector | None:
        found = self._of(Selector)
        return found[0] if found else None

    @cached_property
    def quantizer(self) -> Quantizer | None:
        found = self._of(Quantizer)
        return found[0] if found else None

    @cached_property
    def array_encoder(self) -> ArrayEncoder:
        found = self._of(ArrayEncoder)
        if found:
            return found[0]
        from .encoders.raw import Raw

        return Raw()

    @cached_property
    def bytes_encoders(self) -> list[BytesEncoder]:
        return self._of(BytesEncoder)

    @property
    def lossless(self) -> bool:
        """True when decode(encode(cache)) returns the float32 cache bit for bit."""
        quantizer = self.quantizer
        return (
            self.selector is None or self.selector.id == "keep_all"
        ) and all(t.lossless for t in self.transforms) and (quantizer is None or quantizer.lossless)

    # -- encoding ------------------------------------------------------------------------
    def encode(self, cache: Any, observations: Any = None) -> bytes:
        """Encode a cache (a transformers ``DynamicCache`` after prefill, or :class:`KVCacheData`).

        ``observations`` (from :func:`tensorwire.kv.hf.prefill`) are needed by selectors
        that score tokens with attention (``snapkv``).
        """
        return b"".join(self.encode_parts(_as_data(cache, observations)))

    def encode_parts(self, data: KVCacheData) -> Iterator[bytes]:
        """Yield the payload in pieces: preamble + header first, then the bitmap and the sections.

        The header needs every section's size, so all layers are encoded before the first
        piece is yielded; a transport that sends layer by layer uses :meth:`encode_stream`.
        """
        stream = self.encode_stream(data)
        bodies, tables = [], []
        for pieces, table in stream.layers:
            bodies += pieces
            tables.append(table)
        yield payload.pack_header({**stream.header, "layers": tables})
        yield stream.bitmap
        yield from bodies

    def encode_stream(self, cache: Any, observations: Any = None) -> EncodedStream:
        """Select the tokens now; encode each layer only when :attr:`EncodedStream.layers` asks for it.

        A sender can put layer ``i`` on the wire while layer ``i + 1`` is being encoded;
        the receiver decodes with a :class:`StreamDecoder` as the layers arrive.
        """
        data = _as_data(cache, observations)
        layers, positions, bitmap = self._select(data)
        first = data.layers[0].keys.shape if data.layers else (0, 0, 0, 0)
        header = {
            "pipeline": self.to_config(),
            "cache": {
                "n_layers": len(layers),
                "batch": int(first[0]),
                "kv_heads": int(first[1]),
                "head_dim": int(first[3]),
                "seq_len": int(data.seq_len),
                "kept": int(max(layer.keys.shape[2] for layer in layers) if layers else data.seq_len),
                "dtype": data.dtype,
            },
            "positions": positions,
        }
        if positions == "tail":
            header["cache"]["layer_tokens"] = payload.layer_tokens(layers)
        encoded = (self.encode_layer(i, len(layers), layer.keys, layer.values) for i, layer in enumerate(layers))
        return EncodedStream(header, bitmap, encoded)

    def _select(self, data: KVCacheData) -> tuple[list[KVLayer], Any, bytes]:
        """The kept layers, the header's ``positions`` entry and the positions bitmap (or b"")."""
        selector = self.selector
        if not data.layers:
            return [], "all", b""
        if selector is None or selector.id == "keep_all":
            layers = data.layers
        elif payload.layer_tokens(data.layers) is not None:
            raise ShapeMismatch(
                f"selector {selector.id!r} keeps the same number of tokens in every layer, but this cache's layers hold "
                f"{sorted(set(payload.layer_tokens(data.layers)))} tokens (sliding-window layers hold only their "
                "window); use a pipeline without a selector for this model"
            )
        else:
            if selector.needs_observations and data.observations is None:
                raise ObservationError(
                    f"selector {selector.id!r} scores tokens with attention and needs observations; "
                    "prefill with tensorwire.kv.hf.prefill(model, ids, observe_window=W) and pass them to encode()"
                )
            indices = selector.select(data)
            layers = [_gather(layer, idx) for layer, idx in zip(data.layers, indices)]
        spec, bitmap = payload.positions_section(layers, data.seq_len)
        return layers, spec, bitmap

    def encode_layer(self, index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> tuple[list[bytes], dict]:
        """Encode one layer's (selected) keys and values; returns its sections and its header entry."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        values = np.ascontiguousarray(values, dtype=np.float32)
        for transform in self.transforms:
            keys, values = transform.forward(index, keys, values)
        quantizer = self.quantizer
        if quantizer is None:
            planes = {"k": Plane(keys), "v": Plane(values)}
        else:
            planes = quantizer.quantize(index, n_layers, keys, values)
        sections, pieces = [], []
        for name, plane in planes.items():
            blob = self.array_encoder.encode(plane)
            sizes = [len(blob)]
            for encoder in self.bytes_encoders:
                blob = encoder.encode(blob)
                sizes.append(len(blob))
            pieces.append(blob)
            sections.append([name, dtype_name_of(plane.data.dtype), list(plane.data.shape), plane.bits, sizes])
        return pieces, payload.layer_table(sections, pieces)

    # -- decoding ------------------------------------------------------------------------
    @staticmethod
    def decode(data: bytes | bytearray | memoryview, expect: dict[str, int] | None = None):
        """Decode a payload into a :class:`tensorwire.kv.hf.PositionedCache` (a ``DynamicCache``).

        ``expect`` (e.g. ``{"n_layers": 30, "kv_heads": 3, "head_dim": 64}``) rejects a
        payload made for another model with :class:`ShapeMismatch`.
        """
        from .hf import data_to_cache

        return data_to_cache(Pipeline.decode_data(data, expect))

    @staticmethod
    def decode_data(data: bytes | bytearray | memoryview, expect: dict[str, int] | None = None) -> KVCacheData:
        """Decode a payload into :class:`KVCacheData` (numpy arrays and kept positions)."""
        view = memoryview(data).cast("B")
        header, at = payload.read_header(view)
        bitmap_bytes = payload.positions_size(header)
        decoder = StreamDecoder(header, view[at : at + bitmap_bytes], expect)
        for _, table, body in payload.layer_bodies(header, view, at + bitmap_bytes):
            decoder.add_layer(table, body)
        return decoder.result()

    def decode_layer(
        self, index: int, n_layers: int, table: dict, body: memoryview, shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode one checked layer body into float32 keys and values of ``shape``."""
        planes: dict[str, Plane] = {}
        at = 0
        for name, dtype_name, plane_shape, bits, sizes in table["sections"]:
            blob: Any = body[at : at + sizes[-1]]
            at += sizes[-1]
            for encoder, size in zip(reversed(self.bytes_encoders), reversed(sizes[:-1])):
                blob = encoder.decode(blob, size)
            array = self.array_encoder.decode(blob, numpy_dtype(dtype_name), tuple(plane_shape), bits)
            planes[name] = Plane(array, bits)
        quantizer = self.quantizer
        if quantizer is None:
            keys, values = planes["k"].data, planes["v"].data
        else:
            keys, values = quantizer.dequantize(index, n_layers, planes, shape)
        for transform in reversed(self.transforms):
            keys, values = transform.inverse(index, keys, values)
        if keys.shape != shape or values.shape != shape:
            raise CorruptData(f"layer {index} decodes to {keys.shape}/{values.shape}, the header says {shape}")
        return np.ascontiguousarray(keys, dtype=np.float32), np.ascontiguousarray(values, dtype=np.float32)


def _as_data(cache: Any, observations: Any) -> KVCacheData:
    if isinstance(cache, KVCacheData):
        if observations is not None:
            cache.observations = observations
        return cache
    from .hf import cache_to_data

    return cache_to_data(cache, observations=observations)


def _gather(layer: KVLayer, index: np.ndarray) -> KVLayer:
    """The kept tokens of one layer; ``index`` has shape ``(batch, heads, kept)``."""
    batch, heads, tokens, _ = layer.keys.shape
    # Whole rows by flat index: several times faster than take_along_axis, which builds a
    # fancy index over the head dimension too.
    rows = (np.arange(batch * heads, dtype=np.int64)[:, None] * tokens + index.reshape(batch * heads, -1)).ravel()

    def take(a: np.ndarray) -> np.ndarray:
        return np.take(a.reshape(batch * heads * tokens, -1), rows, axis=0).reshape(*index.shape, a.shape[-1])

    return KVLayer(take(layer.keys), take(layer.values), np.take_along_axis(layer.positions, index, axis=2))


@dataclass(frozen=True)
class EncodedStream:
    """A payload in the order a sender puts it on the wire (see :meth:`Pipeline.encode_stream`).

    ``header`` is the payload header without its ``layers`` list; ``bitmap`` the kept
    positions (``b""`` for ``"positions": "all"``); ``layers`` yields ``(pieces, table)``
    per layer, encoding each when it is asked for: the layer's body is ``b"".join(pieces)``
    and ``table`` its entry of the header's ``layers`` list.
    """

    header: dict[str, Any]
    bitmap: bytes
    layers: Iterator[tuple[list[bytes], dict[str, Any]]]


class StreamDecoder:
    """Decodes a payload that arrives in order: header, bitmap, then one layer at a time.

    ``expect`` maps a cache field (``n_layers``, ``kv_heads``, ...) to the value it must
    have, or ``max_<field>`` to the most it may be (a receiver bounds ``seq_len`` and
    ``batch`` so that a small hostile header cannot make it allocate much).

    Every part is checked when it arrives: the header fields before any layer
    (:func:`payload.check_stream_header`), each layer's table and checksum before its
    planes are decoded. :meth:`result` refuses a cache that misses layers.

    Examples
    --------
    >>> stream = pipe.encode_stream(cache)                                   # doctest: +SKIP
    >>> decoder = StreamDecoder(stream.header, stream.bitmap)                # doctest: +SKIP
    >>> for pieces, table in stream.layers: decoder.add_layer(table, b"".join(pieces))  # doctest: +SKIP
    >>> data = decoder.result()                                              # doctest: +SKIP
    """

    def __init__(self, header: dict[str, Any], bitmap: bytes | memoryview = b"", expect: dict[str, int] | None = None):
        payload.check_stream_header(header)
        cache = header["cache"]
        for key, want in (expect or {}).items():
            if key.startswith("max_"):
                if cache.get(key[4:], 0) > want:
                    raise ShapeMismatch(f"the payload's cache has {key[4:]}={cache.get(key[4:])}, this receiver takes "
                                        f"at most {want}; refused before anything is allocated")  # fmt: skip
            elif cache.get(key) != want:
                raise ShapeMismatch(
                    f"the payload is for a cache with {key}={cache.get(key)}, this receiver expects {want}; "
                    "it was made for another model"
                )
        self.header = header
        self.pipeline = Pipeline.from_config(header["pipeline"])
        self.positions, used = payload.read_positions(header, memoryview(bitmap))
        if used != len(bitmap):
            raise CorruptData(f"the kept-positions bitmap is {len(bitmap)} bytes, the header implies {used}")
        tokens = cache.get("layer_tokens") or [cache["kept"]] * cache["n_layers"]
        self.shapes = [(cache["batch"], cache["kv_heads"], t, cache["head_dim"]) for t in tokens]
        self.layers: list[KVLayer] = []

    @property
    def done(self) -> bool:
        return len(self.layers) == self.header["cache"]["n_layers"]

    def add_layer(self, table: dict[str, Any], body: bytes | memoryview) -> KVLayer:
        """Check and decode the next layer; returns it."""
        index = len(self.layers)
        n_layers = self.header["cache"]["n_layers"]
        if index >= n_layers:
            raise CorruptData(f"a layer arrived after all {n_layers} layers of the payload")
        payload.check_layer_table(table)
        body = memoryview(body)
        payload.check_layer(index, table, body)
        if len(body) != payload.layer_size(table):
            raise CorruptData(f"layer {index} has {len(body) - payload.layer_size(table)} bytes more than its table says")
        keys, values = self.pipeline.decode_layer(index, n_layers, table, body, self.shapes[index])
        layer = KVLayer(keys, values, self.positions[index])
        self.layers.append(layer)
        return layer

    def result(self) -> KVCacheData:
        """The decoded cache; raises :class:`~tensorwire.errors.Truncated` before every layer arrived."""
        if not self.done:
            raise Truncated(f"{len(self.layers)} of {self.header['cache']['n_layers']} layers of the KV payload arrived")
        return KVCacheData(self.layers, seq_len=self.header["cache"]["seq_len"], dtype=self.header["cache"]["dtype"])
