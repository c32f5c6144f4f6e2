"""A connection between two workers: frames, JSON control messages, KV transfers, errors, close.

:class:`Connection` speaks docs/PROTOCOL.md over a :class:`~.stream.StreamProtocol`; any
asyncio byte-stream transport works (the TCP server and client are in :mod:`.tcp`). One
task may send while another receives; two concurrent senders (or receivers) take turns,
a KV transfer holding its direction for the whole transfer.

Errors. A frame that breaks the protocol (bad magic, version, type, reserved bits,
checksum, a length over the limit, a frame out of sequence) or a KV payload that fails its
checks is fatal: the receiver sends a fatal ERROR frame, closes the connection and raises
the named error. An ERROR frame from the peer raises :class:`PeerError`; a non-fatal one
(the peer failed one request, e.g. its encoder raised) leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import (
    ConnectionClosed,
    FrameTooLarge,
    PeerError,
    ProtocolError,
    TransportTimeout,
)
from .. import protocol as P
from . import kvstream
from .shaping import TokenBucket
from .stream import StreamProtocol

__all__ = ["Connection", "ConnectionOptions"]

log = logging.getLogger("tensorwire.serve")

_WRITE_CHUNK = 1 << 20  # unshaped writes go out in pieces of this size: the transport buffers at most one
_LINGER_S = 0.25  # after a fatal ERROR: how long to wait for the peer to read it and close


@dataclass(frozen=True)
class ConnectionOptions:
    """Limits and timeouts of one connection (both ends choose their own).

    ``max_frame``: the largest frame this end accepts (sent to the peer in HELLO, so the
    peer refuses to send a larger one); ``max_message``: the largest MESSAGE;
    ``read_timeout`` / ``write_timeout``: idle seconds before a stalled peer raises
    :class:`TransportTimeout`; ``handshake_timeout``: the whole handshake's deadline.
    ``shaper``: a :class:`TokenBucket` pacing this end's writes; ``link``: the name of a
    kernel shaper the connection runs under (``"tbf"``), for the stats.
    """

    max_frame: int = P.DEFAULT_MAX_FRAME
    max_message: int = P.DEFAULT_MAX_MESSAGE
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    handshake_timeout: float = 10.0
    shaper: TokenBucket | None = None
    link: str | None = None

    def __post_init__(self) -> None:
        if not P.HANDSHAKE_MAX_FRAME <= self.max_frame < 1 << 32:
            raise ValueError(f"max_frame is {P.HANDSHAKE_MAX_FRAME} .. 2**32-1 bytes, got {self.max_frame}")
        for name in ("read_timeout", "write_timeout", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} is > 0 seconds (math.inf: never), got {getattr(self, name)!r}")


class Connection:
    """One authenticated connection; made by :func:`~.tcp.connect` or handed to a server's handler.

    Attributes
    ----------
    peer : tuple | None
        The peer's socket address.
    role : str
        ``"client"`` or ``"server"``.
    shaper : str
        The link emulation this connection runs under: ``"tbf"``, ``"token-bucket"`` or ``"none"``.
    """

    def __init__(self, stream: StreamProtocol, options: ConnectionOptions | None = None, *, role: str):
        self._stream = stream
        self.options = options or ConnectionOptions()
        self.role = role
        transport = stream.transport
        self.peer = transport.get_extra_info("peername") if transport is not None else None
        self.peer_max_frame = P.HANDSHAKE_MAX_FRAME  # until the peer's HELLO says more
        self.authenticated = False
        self.send_lock = asyncio.Lock()
        self.recv_lock = asyncio.Lock()
        self.last_frame_span: tuple[float, float] = (0.0, 0.0)  # perf_counter of the last frame's first and last byte
        self._closed = False

    # -- state -----------------------------------------------------------------------------
    @property
    def shaper(self) -> str:
        if self.options.link:
            return self.options.link
        return TokenBucket.name if self.options.shaper is not None else "none"

    @property
    def closed(self) -> bool:
        return self._closed or self._stream.lost

    @property
    def bytes_sent(self) -> int:
        return self._stream.bytes_out

    @property
    def bytes_received(self) -> int:
        return self._stream.bytes_in

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self.authenticated else "handshaking")
        return f"<Connection {self.role} peer={self.peer} {state} shaper={self.shaper}>"

    # -- frames ----------------------------------------------------------------------------
    async def write_frame(self, frame_type: P.FrameType, pieces: Sequence[bytes | bytearray | memoryview] = (),
                          parts: list | None = None) -> int:  # fmt: skip
        """Write one frame (the caller holds :attr:`send_lock`); returns its size on the wire.

        ``parts`` is a frame already built by :func:`protocol.frame` (e.g. in a worker thread).
        """
        if self.closed:
            raise ConnectionClosed("the connection is closed; open a new one")
        parts = parts if parts is not None else P.frame(frame_type, pieces)
        length = sum(memoryview(p).nbytes for p in parts) - P.HEADER_SIZE
        if length > self.peer_max_frame:
            raise FrameTooLarge(
                f"a {P.FrameType(frame_type).name} frame of {length} bytes is over the {self.peer_max_frame} "
                "the peer accepts (its max_frame); nothing was sent"
            )
        await self._write(parts)
        return length + P.HEADER_SIZE

    async def _write(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        stream, timeout, shaper = self._stream, self.options.write_timeout, self.options.shaper
        chunk = shaper.chunk if shaper is not None else _WRITE_CHUNK
        started = False
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                for at in range(0, len(view), chunk):
                    piece = view[at : at + chunk]
                    if shaper is not None:
                        await shaper.acquire(len(piece))
                    stream.write(piece)
                    started = True
                    if shaper is not None or len(view) > chunk:
                        await stream.drain(timeout)
            await stream.drain(timeout)
        except BaseException:
            if started:  # a frame cut short (timeout, lost peer, cancelled task): the stream is out of step
                await self.abort()
            raise

    def check_peer(self) -> None:
        """Raise if the peer sent an ERROR frame or closed while we were sending (no reader waits).

        A receiver that refuses a KV transfer says so with an ERROR before it closes; the
        sender sees it here between two frames, without reading anything else.
        """
        stream = self._stream
        if len(stream.staged) >= P.HEADER_SIZE and not self.recv_lock.locked():
            # a copy: a view kept alive by a traceback would stop the staging buffer from growing
            staged = bytes(stream.staged[: P.HEADER_SIZE + P.CONTROL_MAX_FRAME])
            try:
                head = P.parse_header(staged[: P.HEADER_SIZE], P.CONTROL_MAX_FRAME)
                if head.type is P.FrameType.ERROR and len(staged) >= P.HEADER_SIZE + head.length:
                    body = staged[P.HEADER_SIZE : P.HEADER_SIZE + head.length]
                    P.check_payload(head, body)
                    raise PeerError(*P.parse_error(body))
            except ProtocolError as exc:
                if not isinstance(exc, PeerError) or exc.fatal:
                    self._closed = True
                    stream.abort()
                raise
        if stream.eof or stream.lost:
            self._closed = True
            stream.abort()
            raise ConnectionClosed("the peer closed the connection while we were sending")

    async def message_delay(self) -> None:
        """The shaper's per-message delay (its ``rtt_s``), before a message or a KV transfer."""
        if self.options.shaper is not None:
            await self.options.shaper.message_delay()

    async def read_frame(self, allowed: frozenset[P.FrameType] | set[P.FrameType], limit: int, where: str,
                         timeout: float | None = None) -> P.Frame:  # fmt: skip
        """Read the next frame (the caller holds :attr:`recv_lock`); it must be of an ``allowed`` type.

        ``limit`` caps the payload of those types (an ERROR's is :data:`protocol.CONTROL_MAX_FRAME`);
        the header is checked against it before the payload is read or allocated. An ERROR
        frame raises :class:`PeerError`; any protocol fault is sent to the peer as a fatal
        ERROR before the connection closes and the named error is raised.
        """
        timeout = self.options.read_timeout if timeout is None else timeout
        stream = self._stream
        head_buf = bytearray(P.HEADER_SIZE)
        in_frame = False  # once part of the frame arrived, a timeout leaves the stream out of step
        try:
            await stream.readinto(head_buf, timeout)
            in_frame = True
            first = stream.first_byte_at or time.perf_counter()
            head = P.parse_header(head_buf, self.options.max_frame)
            cap = P.CONTROL_MAX_FRAME if head.type is P.FrameType.ERROR else min(limit, self.options.max_frame)
            P.expect_type(head.type, set(allowed) | {P.FrameType.ERROR}, where)
            if head.length > cap:
                raise FrameTooLarge(
                    f"a {head.type.name} frame claims {head.length} payload bytes {where}, more than the {cap} "
                    "this transfer allows; refused before reading it"
                )
            payload = bytearray(head.length)
            await stream.readinto(payload, timeout)
            self.last_frame_span = (first, time.perf_counter())
            P.check_payload(head, payload)
        except TransportTimeout as exc:
            if in_frame or getattr(exc, "mid_frame", True):
                await self.fail(exc)  # nothing more can be read from a stream out of step
            raise
        except ConnectionClosed:
            await self.abort()
            raise
        except ProtocolError as exc:
            await self.fail(exc)
            raise
        except BaseException:  # cancelled: a frame read halfway cannot be resumed
            if in_frame or stream.out_of_step:
                await self.abort()
            raise
        if head.type is P.FrameType.ERROR:
            try:
                code, message, fatal, request_id = P.parse_error(payload)
            except ProtocolError as exc:
                await self.fail(exc)
                raise
            if fatal:
                await self.abort()
            raise PeerError(code, message, fatal, request_id)
        return P.Frame(head.type, memoryview(payload))

    # -- control messages --------------------------------------------------------------------
    async def send_message(self, message: dict[str, Any]) -> None:
        """Send a JSON control message, ``{"type": str, ...}`` (the workers define the types)."""
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise TypeError(f"a message is a dict with a string 'type', got {message!r:.200}")
        raw = P.json_payload(message)
        if len(raw) > min(self.options.max_message, self.peer_max_frame):
            raise FrameTooLarge(f"a {len(raw)}-byte message is over the {self.options.max_message}-byte message limit")
        async with self.send_lock:
            await self.message_delay()
            await self.write_frame(P.FrameType.MESSAGE, [raw])

    async def recv_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next control message. ``timeout``: idle seconds (default ``read_timeout``; ``math.inf``:
        wait forever, e.g. a worker waiting for its next request).

        Raises :class:`TransportTimeout` (the connection stays usable when no byte of a
        frame had arrived), :class:`ConnectionClosed`, :class:`PeerError`, or the named
        protocol error.
        """
        async with self.recv_lock:
            frame = await self.read_frame({P.FrameType.MESSAGE}, self.options.max_message, "for a message", timeout)
            try:
                return P.parse_message(frame.payload)
            except ProtocolError as exc:
                await self.fail(exc)
                raise

    async def send_error(self, code: str, message: str, *, fatal: bool = False, request_id: str | None = None) -> None:
        """Tell the peer a request failed (``fatal=False``: the connection goes on) or why we hang up (``fatal=True``)."""
        raw = P.error_payload(code, message, fatal=fatal, request_id=request_id)
        async with self.send_lock:
            await self.write_frame(P.FrameType.ERROR, [raw])
        if fatal:
            await self._linger_close()

    # -- KV transfers ------------------------------------------------------------------------
    async def send_kv(self, request_id: str, stream: Any):
        """Send an :class:`~tensorwire.kv.pipeline.EncodedStream`; returns :class:`~.stats.TransferStats`.

        Layer ``i + 1`` is encoded in a worker thread while layer ``i`` is on the wire.
        """
        return await kvstream.send_kv(self, request_id, stream)

    async def send_cache(self, request_id: str, pipeline: Any, cache: Any, observations: Any = None):
        """Encode ``cache`` with ``pipeline`` and send it; returns :class:`~.stats.TransferStats`.

        Like ``send_kv(request_id, pipeline.encode_stream(cache, observations))``, but the
        token selection that ``encode_stream`` runs at once (attention scoring for SnapKV)
        runs in a worker thread too, so the event loop keeps serving other connections;
        its time counts as encoding.
        """
        t0 = time.perf_counter()
        stream = await asyncio.get_running_loop().run_in_executor(None, pipeline.encode_stream, cache, observations)
        selected = (t0, time.perf_counter())
        stats = await kvstream.send_kv(self, request_id, stream)
        stats.encode_intervals.insert(0, selected)
        return stats.finish(t0, time.perf_counter())

    async def recv_kv(self, expect: dict[str, int] | None = None, *, request_id: str | None = None,
                      timeout: float | None = None):  # fmt: skip
        """Receive a KV transfer; returns ``(KVCacheData, TransferStats)``.

        Layer ``i`` is decoded in a worker thread while layer ``i + 1`` arrives. ``expect``
        (e.g. ``{"n_layers": 30, "kv_heads": 3, "head_dim": 64}``) refuses a cache of another
        model; ``request_id`` refuses a transfer of another request.
        """
        return await kvstream.recv_kv(self, expect, request_id=request_id, timeout=timeout)

    # -- closing -------------------------------------------------------------------------------
    async def fail(self, exc: BaseException, code: str | None = None, request_id: str | None = None) -> None:
        """Send a fatal ERROR for ``exc`` (unless a frame is being written), then close.

        The peer gets a moment to read the ERROR and close its end (then we close at once);
        what it still sends meanwhile is dropped.
        """
        if self.closed:
            return
        code = code or getattr(exc, "code", "internal")
        if not self.send_lock.locked():  # never inside another frame
            try:
                raw = P.error_payload(code, str(exc), fatal=True, request_id=request_id)
                self._stream.write(b"".join(P.frame(P.FrameType.ERROR, [raw])))
            except (ConnectionClosed, OSError):
                pass
        log.info("closing the connection with %s after %s: %s", self.peer, code, exc)
        await self._linger_close()

    async def _linger_close(self) -> None:
        stream = self._stream
        stream.write_eof()
        stream.discard_input()
        await stream.wait_lost(_LINGER_S)
        self._closed = True
        if stream.transport is not None and stream.transport.get_write_buffer_size() == 0:
            stream.close()  # the ERROR went out: a normal close
        else:
            stream.abort()  # a peer that reads nothing would hold a graceful close forever

    async def close(self) -> None:
        """Close the connection (idempotent). The peer's next read raises :class:`ConnectionClosed`."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._stream.drain(self.options.write_timeout), timeout=1.0)
        except (asyncio.TimeoutError, TransportTimeout, ConnectionClosed, OSError):
            pass
        self._stream.close()

    async def abort(self) -> None:
        """Close at once, dropping unsent data."""
        self._closed = True
        self._stream.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

