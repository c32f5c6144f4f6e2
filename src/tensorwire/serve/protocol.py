"""The tensorwire wire protocol (docs/PROTOCOL.md): frames, their payloads and their limits.

Pure functions, no sockets: a transport reads :data:`HEADER_SIZE` bytes, calls
:func:`parse_header` (which checks magic, version, type, reserved bits and the length
against the caller's limit *before* anything is allocated), reads the payload, then
calls :func:`check_payload`. Senders build frames with :func:`frame` (header and payload
pieces, never joined). Everything on the wire is a fixed binary header, UTF-8 JSON or
raw bytes: no pickle.

Frame layout (all integers little-endian)::

    offset size field
    0      4    magic  89 54 57 50  ("\\x89TWP")
    4      1    version (1)
    5      1    frame type (FrameType)
    6      2    flags, reserved: 0
    8      4    payload length N
    12     8    XXH3-64 of header bytes 0..11 followed by the N payload bytes
    20     N    payload

Example
-------
>>> parts = frame(FrameType.MESSAGE, [json_payload({"type": "ping"})])
>>> head = parse_header(parts[0], max_payload=1 << 20)
>>> check_payload(head, b"".join(parts[1:]))
>>> parse_message(b"".join(parts[1:]))
{'type': 'ping'}
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import xxhash

from ..errors import (
    FrameChecksumMismatch,
    FrameTooLarge,
    MalformedFrame,
    UnexpectedFrame,
    UnknownFrameType,
    UnsupportedProtocolVersion,
)
from ..kv import payload as kv_payload

__all__ = [
    "json_safe",
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "HEADER",
    "HEADER_SIZE",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_MESSAGE",
    "HANDSHAKE_MAX_FRAME",
    "CONTROL_MAX_FRAME",
    "MAX_TABLE",
    "MAX_REQUEST_ID",
    "FrameType",
    "FrameHeader",
    "Frame",
    "pack_header",
    "parse_header",
    "frame_digest",
    "check_payload",
    "frame",
    "parse_frames",
    "json_payload",
    "parse_json",
    "parse_message",
    "error_payload",
    "parse_error",
    "kv_header_payload",
    "parse_kv_header",
    "kv_layer_payload",
    "parse_kv_layer",
    "kv_end_payload",
    "parse_kv_end",
    "layer_frame_limit",
    "check_request_id",
    "expect_type",
]

MAGIC = b"\x89TWP"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct("<4sBBHIQ")  # magic, version, type, flags (reserved, 0), payload length, xxh3-64
HEADER_SIZE = HEADER.size  # 20
_PREFIX = 12  # header bytes covered by the checksum (everything before it)

DEFAULT_MAX_FRAME = 256 << 20  # any frame, whatever its type; configurable per connection
DEFAULT_MAX_MESSAGE = 16 << 20  # a MESSAGE frame (JSON control message)
HANDSHAKE_MAX_FRAME = 64 << 10  # every frame before the handshake ends: an unauthenticated peer gets no more
CONTROL_MAX_FRAME = 64 << 10  # ERROR and KV_END frames
MAX_TABLE = 1 << 20  # the JSON part of a KV_LAYER frame
MAX_REQUEST_ID = 256  # characters
_LAYER_SLACK = 1 << 20


class FrameType(enum.IntEnum):
    """Frame types of protocol version 1; a number is never reused for another meaning."""

    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    MESSAGE = 4
    ERROR = 5
    KV_HEADER = 16
    KV_BITMAP = 17
    KV_LAYER = 18
    KV_END = 19


_TYPES = frozenset(int(t) for t in FrameType)


class FrameHeader(NamedTuple):
    """A checked frame header: the type, the payload length and the checksum to verify."""

    type: FrameType
    length: int
    digest: int
    prefix: bytes  # header bytes 0..11, which the checksum covers with the payload


class Frame(NamedTuple):
    """A checked frame: its type and payload (a view into the receive buffer, not a copy)."""

    type: FrameType
    payload: memoryview


# -- header --------------------------------------------------------------------------------
def pack_header(frame_type: int, length: int, digest: int) -> bytes:
    """The 20-byte header of a frame whose payload is ``length`` bytes with checksum ``digest``."""
    if not 0 <= length < 1 << 32:
        raise FrameTooLarge(f"a frame payload of {length} bytes does not fit the u32 length field")
    return HEADER.pack(MAGIC, VERSION, int(frame_type), 0, length, digest)


def parse_header(data: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_FRAME) -> FrameHeader:
    """Check a frame header; raises a named :class:`~tensorwire.errors.ProtocolError` on any fault.

    Checked in order: size, magic, version, reserved flags, frame type, then the length
    against ``max_payload``, so a hostile length is refused before its payload is read or
    any buffer for it is allocated. The checksum is verified later by :func:`check_payload`.
    """
    data = memoryview(data).cast("B")
    if len(data) != HEADER_SIZE:
        raise MalformedFrame(f"a frame header is {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, frame_type, flags, length, digest = HEADER.unpack(data)
    if magic != MAGIC:
        raise MalformedFrame(
            f"not a tensorwire frame: starts with {bytes(magic)!r}, expected {MAGIC!r}; "
            "is the peer a tensorwire worker of this protocol?"
        )
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedProtocolVersion(
            f"frame of protocol version {version}; this build speaks {list(SUPPORTED_VERSIONS)}: "
            "run the same tensorwire release on both sides"
        )
    if flags != 0:
        raise MalformedFrame(f"frame flags are reserved and must be 0, found {flags:#06x}")
    if frame_type not in _TYPES:
        raise UnknownFrameType(f"unknown frame type {frame_type}; version {version} defines {sorted(_TYPES)}")
    if length > max_payload:
        raise FrameTooLarge(
            f"a {FrameType(frame_type).name} frame claims {length} payload bytes, more than the {max_payload} "
            "allowed here; refused before reading it (raise max_frame on the receiver if the peer is right)"
        )
    return FrameHeader(FrameType(frame_type), length, digest, bytes(data[:_PREFIX]))


def frame_digest(prefix: bytes, pieces: Sequence[bytes | bytearray | memoryview]) -> int:
    """XXH3-64 of the header prefix (bytes 0..11) followed by the payload pieces."""
    h = xxhash.xxh3_64(prefix)
    for piece in pieces:
        h.update(piece)
    return h.intdigest()


def check_payload(header: FrameHeader, payload: bytes | bytearray | memoryview) -> None:
    """Raise :class:`FrameChecksumMismatch` unless ``payload`` is the frame's intact payload."""
    if len(payload) != header.length:
        raise MalformedFrame(f"the {header.type.name} frame declares {header.length} payload bytes, got {len(payload)}")
    if frame_digest(header.prefix, (payload,)) != header.digest:
        raise FrameChecksumMismatch(
            f"a {header.type.name} frame of {header.length} bytes fails its checksum: the bytes were altered on "
            "the way (a faulty link, NIC or proxy); the connection is closed, retry the request"
        )


def frame(frame_type: int, pieces: Sequence[bytes | bytearray | memoryview] = ()) -> list[bytes | bytearray | memoryview]:
    """A whole frame as ``[header, *pieces]``: the payload pieces are not copied or joined."""
    length = sum(memoryview(p).nbytes for p in pieces)
    prefix = pack_header(frame_type, length, 0)[:_PREFIX]
    return [prefix + struct.pack("<Q", frame_digest(prefix, pieces)), *pieces]


def parse_frames(data: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_FRAME) -> list[Frame]:
    """Every frame of a complete byte string (a capture, a fuzz input); the transports read incrementally.

    Raises a named :class:`~tensorwire.errors.ProtocolError` on the first bad frame, and
    :class:`MalformedFrame` for bytes that end inside a frame.
    """
    view = memoryview(data).cast("B")
    at, frames = 0, []
    while at < len(view):
        if len(view) - at < HEADER_SIZE:
            raise MalformedFrame(f"{len(view) - at} bytes after the last frame, less than a frame header")
        head = parse_header(view[at : at + HEADER_SIZE], max_payload)
        at += HEADER_SIZE
        if len(view) - at < head.length:
            raise MalformedFrame(f"the {head.type.name} frame needs {head.length} payload bytes, {len(view) - at} follow")
        body = view[at : at + head.length]
        check_payload(head, body)
        frames.append(Frame(head.type, body))
        at += head.length
    return frames


# -- JSON payloads ---------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no NaN or infinity, and an
    infinite SLO or budget means "none", which is what null says."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_payload(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused (they are not JSON)."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"a wire message must be plain JSON (dict, list, str, finite numbers, bool, None): {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e400: JSON has no infinity, and a receiver must not get one
        raise ValueError(f"the number {text[:40]} is out of the float range")
    return value


def parse_json(payload: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """The JSON object of a frame payload; anything else is :class:`MalformedFrame`."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFrame(f"the {what} frame's payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedFrame(f"the {what} frame's payload must be a JSON object, found {type(obj).__name__}")
    return obj


def parse_message(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A MESSAGE payload: a JSON object with a string ``"type"``."""
    msg = parse_json(payload, "MESSAGE")
    if not isinstance(msg.get("type"), str):
        raise MalformedFrame(f"a MESSAGE needs a string 'type' field, found {msg.get('type')!r}")
    return msg


def check_request_id(request_id: Any) -> str:
    """A request id: a non-empty string of at most :data:`MAX_REQUEST_ID` printable characters."""
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID or not request_id.isprintable():
        raise MalformedFrame(f"a request id is 1..{MAX_REQUEST_ID} printable characters, found {request_id!r}")
    return request_id


def error_payload(code: str, message: str, *, fatal: bool = True, request_id: str | None = None) -> bytes:
    """An ERROR payload; the message is cut to fit :data:`CONTROL_MAX_FRAME`."""
    body: dict[str, Any] = {"code": str(code), "message": str(message)[:4096], "fatal": bool(fatal)}
    if request_id is not None:
        body["request_id"] = request_id
    return json_payload(body)


def parse_error(payload: bytes | bytearray | memoryview) -> tuple[str, str, bool, str | None]:
    """``(code, message, fatal, request_id)`` of an ERROR payload."""
    obj = parse_json(payload, "ERROR")
    code, message, fatal, rid = obj.get("code"), obj.get("message", ""), obj.get("fatal", True), obj.get("request_id")
    if not isinstance(code, str) or not isinstance(message, str) or not isinstance(fatal, bool):
        raise MalformedFrame(f"an ERROR frame has a string code and message and a bool fatal, found {obj!r}")
    if rid is not None and not isinstance(rid, str):
        raise MalformedFrame(f"an ERROR frame's request_id is a string, found {rid!r}")
    return code, message, fatal, rid


# -- KV transfer -----------------------------------------------------------------------------
def kv_header_payload(request_id: str, header: dict[str, Any]) -> bytes:
    """KV_HEADER: the request id and the payload header without its ``layers`` list (FORMAT.md §6)."""
    check_request_id(request_id)
    if "layers" in header:
        raise ValueError("a KV_HEADER carries the stream header, without its 'layers' list (each layer brings its table)")
    return json_payload({"request_id": request_id, "header": header})


def parse_kv_header(payload: bytes | bytearray | memoryview) -> tuple[str, dict[str, Any], int]:
    """``(request_id, header, bitmap_nbytes)`` of a checked KV_HEADER payload."""
    obj = parse_json(payload, "KV_HEADER")
    request_id = check_request_id(obj.get("request_id"))
    header = obj.get("header")
    if not isinstance(header, dict) or "layers" in header:
        raise MalformedFrame("a KV_HEADER's 'header' is the payload header object without 'layers'")
    try:
        kv_payload.check_stream_header(header)
        nbytes = kv_payload.positions_size(header)
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedFrame(f"the KV_HEADER of request {request_id!r} is not a valid payload header: {exc}") from None
    return request_id, header, nbytes


_TABLE_LEN = struct.Struct("<I")


def kv_layer_payload(index: int, table: dict[str, Any], pieces: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """KV_LAYER payload pieces: ``u32 table length | table JSON | body`` (the body pieces as they are).

    The table JSON is ``{"index": i, "table": <the layer's header entry>}``.
    """
    raw = json_payload({"index": index, "table": table})
    if len(raw) > MAX_TABLE:
        raise FrameTooLarge(f"layer {index}'s table is {len(raw)} bytes of JSON, more than the {MAX_TABLE} allowed")
    return [_TABLE_LEN.pack(len(raw)) + raw, *pieces]


def parse_kv_layer(payload: memoryview) -> tuple[int, dict[str, Any], memoryview]:
    """``(index, table, body)`` of a KV_LAYER payload; ``body`` is a view into ``payload``, not a copy."""
    payload = memoryview(payload).cast("B")
    if len(payload) < _TABLE_LEN.size:
        raise MalformedFrame(f"a KV_LAYER payload starts with a 4-byte table length, got {len(payload)} bytes")
    (n,) = _TABLE_LEN.unpack_from(payload)
    if n > MAX_TABLE or n > len(payload) - _TABLE_LEN.size:
        raise MalformedFrame(f"a KV_LAYER claims a {n}-byte table in a {len(payload)}-byte payload (at most {MAX_TABLE})")
    obj = parse_json(payload[_TABLE_LEN.size : _TABLE_LEN.size + n], "KV_LAYER")
    index, table = obj.get("index"), obj.get("table")
    if not isinstance(index, int) or isinstance(index, bool) or not isinstance(table, dict):
        raise MalformedFrame(f"a KV_LAYER table is {{'index': int, 'table': object}}, found {obj!r:.200}")
    try:
        kv_payload.check_layer_table(table)
    except ValueError as exc:
        raise MalformedFrame(f"layer {index}'s table is not valid: {exc}") from None
    return index, table, payload[_TABLE_LEN.size + n :]


def kv_end_payload(request_id: str, n_layers: int, encode_s: float | None = None) -> bytes:
    """KV_END: the request id, the number of layers sent and (optionally) the sender's encode seconds."""
    body: dict[str, Any] = {"request_id": check_request_id(request_id), "n_layers": int(n_layers)}
    if encode_s is not None:
        body["encode_s"] = float(encode_s)
    return json_payload(body)


def parse_kv_end(payload: bytes | bytearray | memoryview) -> tuple[str, int, float | None]:
    """``(request_id, n_layers, encode_s or None)`` of a KV_END payload."""
    obj = parse_json(payload, "KV_END")
    n, encode_s = obj.get("n_layers"), obj.get("encode_s")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise MalformedFrame(f"a KV_END's n_layers is a non-negative int, found {n!r}")
    if encode_s is not None and (not isinstance(encode_s, (int, float)) or isinstance(encode_s, bool) or encode_s < 0):
        raise MalformedFrame(f"a KV_END's encode_s is a non-negative number, found {encode_s!r}")
    return check_request_id(obj.get("request_id")), n, encode_s


def layer_frame_limit(header: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """The most payload bytes a KV_LAYER frame of this transfer may claim.

    Twice the layer's keys and values as float32, plus 1 MiB for the table and per-plane
    overheads, capped by ``max_frame``: no pipeline stage expands a layer that much, so a
    longer frame is hostile or corrupt (docs/PROTOCOL.md, "Limits").
    """
    cache = header["cache"]
    f32 = 2 * 4 * math.prod(cache[k] for k in ("batch", "kv_heads", "kept", "head_dim"))
    return min(max_frame, 2 * f32 + _LAYER_SLACK)


def expect_type(got: FrameType, allowed: frozenset[FrameType] | set[FrameType], where: str) -> None:
    """Raise :class:`UnexpectedFrame` unless ``got`` is one of the types allowed ``where``."""
    if got not in allowed:
        names = ", ".join(sorted(t.name for t in allowed))
        raise UnexpectedFrame(f"a {got.name} frame arrived {where}; the protocol allows {names} there")

