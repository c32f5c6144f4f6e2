"""The framing of a KV payload (docs/FORMAT.md, "KV payload"), apart from any stage.

A payload is a preamble, a checksummed JSON header, the kept-positions bitmap (when
tokens were evicted) and one body per layer, each with its own checksum::

    preamble (24 bytes) | header (JSON) | positions bitmap? | layer 0 body | layer 1 body | ...

This module writes and checks those pieces; it runs no stage. :class:`~tensorwire.kv.Pipeline`
uses it to make and read whole payloads, and a transport can use it to check and forward
a payload layer by layer (:func:`layer_bodies`) without building the pipeline.

Example
-------
>>> header, at = read_header(memoryview(payload))                  # doctest: +SKIP
>>> positions, at = read_positions(header, memoryview(payload), at)  # doctest: +SKIP
>>> for index, table, body in layer_bodies(header, memoryview(payload), at): ...  # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import xxhash

from ..codec.dtypes import numpy_dtype
from ..errors import BadMagic, ChecksumMismatch, CorruptData, ShapeMismatch, Truncated, UnsupportedVersion
from .stage import KVLayer

__all__ = [
    "PAYLOAD_MAGIC",
    "PAYLOAD_VERSION",
    "PREAMBLE",
    "MAX_HEADER",
    "CACHE_FIELDS",
    "pack_header",
    "read_header",
    "check_stream_header",
    "check_layer_table",
    "layer_tokens",
    "positions_section",
    "positions_size",
    "read_positions",
    "layer_table",
    "layer_size",
    "check_layer",
    "layer_bodies",
]

PAYLOAD_MAGIC = b"\x89TWK\r\n\x1a\n"
PAYLOAD_VERSION = 2  # the newest version read and written; a payload that needs nothing of 2 is written as 1
TAIL_VERSION = 2  # positions "tail" and cache.layer_tokens: layers that hold different numbers of tokens
PREAMBLE = struct.Struct("<8sHHIQ")  # magic, version, flags (reserved, 0), header length, header xxh3-64
MAX_HEADER = 64 << 20
CACHE_FIELDS = ("n_layers", "batch", "kv_heads", "head_dim", "seq_len", "kept")  # the header's cache shape


# -- preamble and header ------------------------------------------------------------------
def pack_header(header: dict[str, Any]) -> bytes:
    """The preamble and the JSON header of a payload, ready to be followed by its bodies."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise CorruptData(f"a KV payload header of {len(raw)} bytes is over the {MAX_HEADER} allowed")
    version = TAIL_VERSION if header["positions"] == "tail" else 1  # readers of version 1 keep reading the rest
    return PREAMBLE.pack(PAYLOAD_MAGIC, version, 0, len(raw), xxhash.xxh3_64_intdigest(raw)) + raw


def read_header(view: memoryview) -> tuple[dict[str, Any], int]:
    """Parse and check a payload's preamble and JSON header; returns (header, body offset).

    Only the preamble and the header need to be in ``view``: a receiver can call this on
    the first bytes of a payload that is still arriving.
    """
    if len(view) < PREAMBLE.size:
        raise Truncated(f"a KV payload starts with a {PREAMBLE.size}-byte preamble, got {len(view)} bytes")
    magic, version, flags, length, digest = PREAMBLE.unpack_from(view, 0)
    if magic != PAYLOAD_MAGIC:
        raise BadMagic(f"not a tensorwire KV payload: starts with {bytes(magic)!r}, expected {PAYLOAD_MAGIC!r}")
    if not 1 <= version <= PAYLOAD_VERSION:
        raise UnsupportedVersion(
            f"KV payload version {version}; this build reads versions 1 to {PAYLOAD_VERSION}: upgrade tensorwire"
        )
    if flags != 0:
        raise CorruptData(f"KV payload flags are reserved and must be 0, found {flags:#x}")
    if length > MAX_HEADER:
        raise CorruptData(f"KV payload header claims {length} bytes, more than the {MAX_HEADER} allowed")
    end = PREAMBLE.size + length
    if len(view) < end:
        raise Truncated(f"the KV payload header needs {length} bytes, only {len(view) - PREAMBLE.size} follow")
    raw = bytes(view[PREAMBLE.size : end])
    if xxhash.xxh3_64_intdigest(raw) != digest:
        raise ChecksumMismatch("the KV payload header fails its checksum; the bytes were altered")
    try:
        header = json.loads(raw)
        _check_header(header)
        if header["positions"] == "tail" and version < TAIL_VERSION:
            raise CorruptData(f"a version {version} KV payload cannot list positions as 'tail' (version {TAIL_VERSION})")
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CorruptData):
            raise
        raise CorruptData(f"the KV payload header is not valid: {exc}") from exc
    return header, end


def _check_header(header: dict) -> None:
    check_stream_header(header)
    cache = header["cache"]
    if not isinstance(header["layers"], list) or len(header["layers"]) != cache["n_layers"]:
        raise CorruptData(f"the header lists {len(header['layers'])} layers, its cache says {cache['n_layers']}")
    for table in header["layers"]:
        check_layer_table(table)


def check_stream_header(header: Any) -> None:
    """Check the header fields that come before any layer: ``pipeline``, ``cache``, ``positions``.

    A payload sent layer by layer carries these first and each layer's table with its body.
    Raises :class:`CorruptData` naming the bad field.
    """
    try:
        cache = header["cache"]
        if not isinstance(header["pipeline"], dict):
            raise CorruptData(f"the header's pipeline must be an object, found {header['pipeline']!r}")
        for key in CACHE_FIELDS:
            if not isinstance(cache[key], int) or isinstance(cache[key], bool) or cache[key] < 0:
                raise CorruptData(f"KV payload header field cache.{key} must be a non-negative int, found {cache[key]!r}")
        if cache["kept"] > cache["seq_len"]:
            raise CorruptData(f"the header keeps {cache['kept']} tokens of a {cache['seq_len']}-token sequence")
        tokens = cache.get("layer_tokens")
        if (header["positions"] == "tail") != (tokens is not None):
            raise CorruptData("a KV payload lists cache.layer_tokens exactly when its positions are 'tail'")
        if tokens is not None and not (
            isinstance(tokens, list)
            and len(tokens) == cache["n_layers"]
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= cache["kept"] for t in tokens)
            and max(tokens, default=cache["kept"]) == cache["kept"]
        ):
            raise CorruptData(
                f"cache.layer_tokens must list {cache['n_layers']} token counts of at most kept={cache['kept']}, "
                f"the largest equal to it; found {tokens!r}"
            )
        header["positions"], cache["dtype"]
    except (KeyError, TypeError) as exc:
        raise CorruptData(f"the KV payload header is not valid: missing or malformed {exc}") from exc


def check_layer_table(table: Any) -> None:
    """Check one layer's table (its sections and checksum) before its body is read."""
    try:
        sections = table["sections"]
        if not isinstance(table["xxh3"], str) or not isinstance(sections, list):
            raise TypeError("sections or xxh3")
        for name, dtype_name, shape, bits, sizes in sections:
            numpy_dtype(dtype_name)
            if not all(isinstance(s, int) and s >= 0 for s in [*shape, *sizes]) or not sizes:
                raise CorruptData(f"section {name!r} has a bad shape {shape} or sizes {sizes}")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CorruptData):
            raise
        raise CorruptData(f"a layer table of the KV payload is not valid: {exc}") from exc


# -- kept positions ---------------------------------------------------------------------------
def _is_arange(positions: np.ndarray) -> bool:
    return bool(np.array_equal(positions, np.broadcast_to(np.arange(positions.shape[-1]), positions.shape)))


def layer_tokens(layers: Sequence[KVLayer]) -> list[int] | None:
    """Each layer's token count where they differ (sliding-window layers), else None."""
    tokens = [int(layer.keys.shape[2]) for layer in layers]
    return tokens if len(set(tokens)) > 1 else None


def _is_tail(positions: np.ndarray, seq_len: int) -> bool:
    return _is_arange(positions - (seq_len - positions.shape[-1]))


def positions_section(layers: Sequence[KVLayer], seq_len: int) -> tuple[Any, bytes]:
    """The header's ``positions`` entry and the bitmap bytes that follow the header.

    ``("all", b"")`` when every layer kept every position in order; ``("tail", b"")`` when
    the layers hold different numbers of tokens, each its most recent ones in order (a
    sliding-window layer holds only its window); else one bit per (layer, batch, head,
    position), 1 where the token was kept. Layers of different lengths that are not tails
    cannot be listed: :class:`~tensorwire.errors.ShapeMismatch`.
    """
    if not layers or all(layer.positions.shape[-1] == seq_len and _is_arange(layer.positions) for layer in layers):
        return "all", b""
    if layer_tokens(layers) is not None:
        if all(_is_tail(layer.positions, seq_len) for layer in layers):
            return "tail", b""
        raise ShapeMismatch(
            f"the layers hold {sorted(set(layer_tokens(layers)))} tokens and not each its most recent ones; "
            "a payload carries either the same tokens count in every layer or each layer's most recent tokens "
            "(sliding-window layers)"
        )
    n_layers, (batch, heads) = len(layers), layers[0].positions.shape[:2]
    bits = np.zeros((n_layers, batch, heads, seq_len), dtype=bool)
    for i, layer in enumerate(layers):
        np.put_along_axis(bits[i], layer.positions, True, axis=2)
    bitmap = np.packbits(bits, axis=-1, bitorder="little").tobytes()
    return {"encoding": "bitmap", "nbytes": len(bitmap), "xxh3": xxhash.xxh3_64_hexdigest(bitmap)}, bitmap


def positions_size(header: dict[str, Any]) -> int:
    """Bytes of the kept-positions bitmap that follows a checked header (0 for ``"all"``)."""
    if header["positions"] in ("all", "tail"):
        return 0
    cache = header["cache"]
    return cache["n_layers"] * cache["batch"] * cache["kv_heads"] * ((cache["seq_len"] + 7) // 8)


def read_positions(header: dict[str, Any], view: memoryview, at: int = 0) -> tuple[list[np.ndarray], int]:
    """Every layer's kept positions, shape ``(batch, kv_heads, kept)``, and the offset after them.

    ``view`` holds the bitmap at ``at`` (a whole payload, or the bitmap alone with ``at=0``).
    """
    cache, spec = header["cache"], header["positions"]
    n_layers, batch, heads, seq_len, kept = (cache[k] for k in ("n_layers", "batch", "kv_heads", "seq_len", "kept"))
    if spec == "all":
        if kept != seq_len:
            raise CorruptData(f"the header keeps {kept} of {seq_len} tokens but lists no positions")
        full = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, heads, seq_len))
        return [full.copy() for _ in range(n_layers)], at
    if spec == "tail":
        tails = [np.arange(seq_len - t, seq_len, dtype=np.int64) for t in cache["layer_tokens"]]
        return [np.broadcast_to(tail, (batch, heads, tail.size)).copy() for tail in tails], at
    row = (seq_len + 7) // 8
    nbytes = positions_size(header)
    if not isinstance(spec, dict) or spec.get("encoding") != "bitmap" or spec.get("nbytes") != nbytes:
        raise CorruptData(f"positions must be a bitmap of {nbytes} bytes, the header says {spec!r}")
    raw = memoryview(view)[at : at + nbytes]
    if len(raw) < nbytes:
        raise Truncated(f"the kept-positions bitmap needs {nbytes} bytes, {len(raw)} are left")
    if xxhash.xxh3_64_hexdigest(raw) != spec.get("xxh3"):
        raise ChecksumMismatch("the kept-positions bitmap fails its checksum; the bytes were altered")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(n_layers, batch, heads, row), axis=-1,
                         count=seq_len, bitorder="little").astype(bool)  # fmt: skip
    if not np.all(bits.sum(axis=-1) == kept):
        raise CorruptData(f"every head must keep {kept} tokens; the positions bitmap disagrees")
    _, _, _, pos = np.nonzero(bits)
    return list(pos.reshape(n_layers, batch, heads, kept).astype(np.int64)), at + nbytes


# -- layer bodies ------------------------------------------------------------------------------
def layer_table(sections: list[list[Any]], pieces: Sequence[bytes]) -> dict[str, Any]:
    """A layer's header entry: its sections and the XXH3-64 of its body (the pieces joined)."""
    digest = xxhash.xxh3_64()
    for piece in pieces:
        digest.update(piece)
    return {"sections": sections, "xxh3": digest.hexdigest()}


def layer_size(table: dict[str, Any]) -> int:
    """Bytes of a layer's body: the last size of each section, added up."""
    return sum(section[4][-1] for section in table["sections"])


def check_layer(index: int, table: dict[str, Any], body: memoryview) -> None:
    """Raise :class:`Truncated` or :class:`ChecksumMismatch` unless ``body`` is the layer's whole, intact body."""
    body = memoryview(body)
    size = layer_size(table)
    if len(body) < size:
        raise Truncated(f"layer {index} needs {size} bytes, the payload has {len(body)} left; it was cut short")
    if xxhash.xxh3_64_hexdigest(body[:size]) != table["xxh3"]:
        raise ChecksumMismatch(f"layer {index} of the KV payload fails its checksum; the bytes were altered")


def layer_bodies(header: dict[str, Any], view: memoryview, at: int) -> Iterator[tuple[int, dict[str, Any], memoryview]]:
    """Yield ``(index, table, body)`` for every layer, each checked before it is yielded.

    After the last layer, bytes left over in ``view`` raise :class:`CorruptData`.
    """
    for index, table in enumerate(header["layers"]):
        size = layer_size(table)
        body = view[at : at + size]
        check_layer(index, table, body)
        yield index, table, body
        at += size
    if at != len(view):
        raise CorruptData(f"the KV payload has {len(view) - at} bytes after its last layer; expected none")
