"""A KV cache over a connection, layer by layer, with encoding and decoding overlapped with the wire.

Sender (:func:`send_kv`): KV_HEADER, KV_BITMAP, then one KV_LAYER per layer, then KV_END.
Each layer is encoded (and its frame built and checksummed) in a worker thread: while
layer ``i`` is written, layer ``i + 1`` is encoded (numba kernels, zstd and numpy release
the GIL, so this is real parallelism).

Receiver (:func:`recv_kv`): checks each frame, feeds a
:class:`~tensorwire.kv.pipeline.StreamDecoder`, and decodes layer ``i`` in a worker thread
while layer ``i + 1`` is being read.

A failure to encode (the sender's) is reported with a non-fatal ERROR at a frame boundary:
the receiver raises :class:`PeerError` and both ends keep the connection. A failure to
check or decode (the receiver's) is fatal: the receiver sends ERROR and closes, and the
sender raises :class:`PeerError` or :class:`ConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ...errors import (
    ChecksumMismatch,
    ConnectionClosed,
    CorruptData,
    FormatError,
    FrameTooLarge,
    MalformedFrame,
    ShapeMismatch,
    StageConfigError,
    TensorwireError,
    UnexpectedFrame,
)
from ...kv import payload as kv_payload
from ...kv.pipeline import StreamDecoder
from .. import protocol as P
from .stats import TransferStats

__all__ = ["send_kv", "recv_kv", "payload_error_code"]

FT = P.FrameType


def payload_error_code(exc: BaseException) -> str:
    """The ERROR code a receiver sends for a KV payload that failed its checks."""
    if isinstance(exc, ShapeMismatch):
        return "shape-mismatch"
    if isinstance(exc, ChecksumMismatch):
        return "payload-checksum"
    if isinstance(exc, FormatError):
        return "corrupt-payload"
    if isinstance(exc, StageConfigError):
        return "unsupported-pipeline"
    return getattr(exc, "code", "internal")


def _quiet(future: asyncio.Future | None) -> None:
    """Let a worker-thread job we no longer need finish without 'exception never retrieved'."""
    if future is not None:
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


async def send_kv(conn, request_id: str, stream: Any) -> TransferStats:
    """Send ``stream`` (an :class:`~tensorwire.kv.pipeline.EncodedStream`) as request ``request_id``.

    Returns the sender's :class:`TransferStats`. Raises what encoding raised (after telling
    the peer), :class:`PeerError` when the receiver refused the payload, or the transport's
    errors.
    """
    try:
        P.check_request_id(request_id)
    except MalformedFrame as exc:
        raise ValueError(str(exc)) from None
    header = stream.header
    n_layers = header["cache"]["n_layers"]
    stats = TransferStats(request_id, "send", conn.shaper, n_layers)
    loop = asyncio.get_running_loop()
    layers = iter(stream.layers)

    def encode(index: int):
        t0 = time.perf_counter()
        try:
            pieces, table = next(layers)
        except StopIteration:
            return None
        parts = P.frame(FT.KV_LAYER, P.kv_layer_payload(index, table, pieces))
        return parts, (t0, time.perf_counter())

    async def put(frame_type: FT, pieces=(), parts=None) -> None:
        t0 = time.perf_counter()
        size = await conn.write_frame(frame_type, pieces, parts)
        stats.wire_intervals.append((t0, time.perf_counter()))
        stats.frame_bytes.append(size)
        stats.wire_bytes += size
        stats.payload_bytes += size - P.HEADER_SIZE

    started = time.perf_counter()
    pending: asyncio.Future | None = None
    async with conn.send_lock:
        try:
            await conn.message_delay()
            await put(FT.KV_HEADER, [P.kv_header_payload(request_id, header)])
            await put(FT.KV_BITMAP, [stream.bitmap])
            limit = P.layer_frame_limit(header, conn.peer_max_frame)
            pending = loop.run_in_executor(None, encode, 0)
            sent = 0
            while True:
                try:
                    item = await pending
                except Exception as exc:
                    await _abandon(conn, request_id, exc, f"encoding layer {sent} failed")
                    raise
                finally:
                    pending = None
                if item is None:
                    break
                parts, interval = item
                stats.encode_intervals.append(interval)
                size = sum(memoryview(p).nbytes for p in parts) - P.HEADER_SIZE
                refused: TensorwireError | None = None
                if sent >= n_layers:
                    refused = CorruptData(f"the stream yields more than the {n_layers} layers its header declares")
                elif size > limit:
                    refused = FrameTooLarge(f"layer {sent} encodes to {size} bytes, over the {limit} bytes a layer "
                                            "of this cache may take on the wire (docs/PROTOCOL.md, Limits)")  # fmt: skip
                if refused is not None:
                    await _abandon(conn, request_id, refused, str(refused))
                    raise refused
                pending = loop.run_in_executor(None, encode, sent + 1)  # layer i+1 encodes while layer i is sent
                await put(FT.KV_LAYER, parts=parts)
                conn.check_peer()
                sent += 1
            if sent != n_layers:
                refused = CorruptData(f"the stream yielded {sent} layers, its header declares {n_layers}")
                await _abandon(conn, request_id, refused, str(refused))
                raise refused
            encode_s = sum(b - a for a, b in stats.encode_intervals)
            await put(FT.KV_END, [P.kv_end_payload(request_id, sent, encode_s)])
        except ConnectionClosed:
            conn.check_peer()  # the receiver's ERROR, when it is still readable, says why it closed
            raise
        except asyncio.CancelledError:
            if stats.frame_bytes:
                await conn.abort()  # the receiver would wait for frames that never come
            raise
        finally:
            _quiet(pending)
    return stats.finish(started, time.perf_counter())


async def _abandon(conn, request_id: str, exc: BaseException, what: str) -> None:
    """Tell the receiver (non-fatal ERROR, at a frame boundary) that this transfer will not finish."""
    try:
        raw = P.error_payload("encode-failed", f"{what}: {type(exc).__name__}: {exc}", fatal=False, request_id=request_id)
        await conn.write_frame(FT.ERROR, [raw])
    except (TensorwireError, OSError):
        pass


async def recv_kv(conn, expect: dict[str, int] | None = None, *, request_id: str | None = None,
                  timeout: float | None = None) -> tuple[Any, TransferStats]:  # fmt: skip
    """Receive one KV transfer; returns ``(KVCacheData, TransferStats)``. See :meth:`Connection.recv_kv`."""
    loop = asyncio.get_running_loop()
    async with conn.recv_lock:
        frame = await conn.read_frame({FT.KV_HEADER}, kv_payload.MAX_HEADER, "to start a KV transfer", timeout)
        started = conn.last_frame_span[0]
        rid, header, nbytes = await _checked(conn, P.parse_kv_header, frame.payload)
        n_layers = header["cache"]["n_layers"]
        stats = TransferStats(rid, "recv", conn.shaper, n_layers)

        def got(frame: P.Frame) -> None:
            stats.wire_intervals.append(conn.last_frame_span)
            stats.frame_bytes.append(len(frame.payload) + P.HEADER_SIZE)
            stats.payload_bytes += len(frame.payload)
            stats.wire_bytes += len(frame.payload) + P.HEADER_SIZE

        got(frame)
        if request_id is not None and rid != request_id:
            await _refuse(conn, UnexpectedFrame(f"a KV transfer for request {rid!r} arrived; expected {request_id!r}"), rid)
        frame = await conn.read_frame({FT.KV_BITMAP}, nbytes, f"after request {rid!r}'s KV_HEADER", timeout)
        got(frame)
        if len(frame.payload) != nbytes:
            await _refuse(conn, MalformedFrame(f"request {rid!r}'s KV_BITMAP has {len(frame.payload)} bytes, "
                                               f"its header implies {nbytes}"), rid)  # fmt: skip
        decoder = await _checked(conn, StreamDecoder, header, frame.payload, expect, request_id=rid, in_thread=True)
        limit = P.layer_frame_limit(header, conn.options.max_frame)

        def decode(table: dict, body: memoryview):
            t0 = time.perf_counter()
            decoder.add_layer(table, body)
            return t0, time.perf_counter()

        pending: asyncio.Future | None = None
        try:
            for index in range(n_layers):
                frame = await conn.read_frame({FT.KV_LAYER}, limit, f"as layer {index} of request {rid!r}", timeout)
                got(frame)
                at, table, body = await _checked(conn, P.parse_kv_layer, frame.payload, request_id=rid)
                if at != index:
                    await _refuse(conn, UnexpectedFrame(f"layer {at} of request {rid!r} arrived where layer {index} "
                                                        "was due"), rid)  # fmt: skip
                if pending is not None:
                    stats.decode_intervals.append(await _settled(conn, pending, rid))
                pending = loop.run_in_executor(None, decode, table, body)  # decodes while the next layer arrives
            frame = await conn.read_frame({FT.KV_END}, P.CONTROL_MAX_FRAME, f"after request {rid!r}'s last layer", timeout)
            got(frame)
            end_rid, end_layers, stats.peer_encode_s = await _checked(conn, P.parse_kv_end, frame.payload, request_id=rid)
            if (end_rid, end_layers) != (rid, n_layers):
                await _refuse(conn, UnexpectedFrame(f"KV_END for request {end_rid!r} with {end_layers} layers closed "
                                                    f"request {rid!r} of {n_layers} layers"), rid)  # fmt: skip
            if pending is not None:
                stats.decode_intervals.append(await _settled(conn, pending, rid))
            pending = None
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                await conn.abort()  # the rest of the transfer would arrive where the next frame is due
            if pending is not None:  # never leave a thread decoding into a decoder we drop
                await asyncio.wait([pending])
                _quiet(pending)
            raise
        data = decoder.result()
    return data, stats.finish(started, time.perf_counter())


async def _refuse(conn, exc: BaseException, request_id: str | None) -> None:
    await conn.fail(exc, payload_error_code(exc), request_id)
    raise exc


async def _checked(conn, fn, *args, request_id: str | None = None, in_thread: bool = False):
    """``fn(*args)``; a protocol or payload error is fatal: ERROR to the peer, close, raise."""
    try:
        if in_thread:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)
    except Exception as exc:  # a payload we cannot check or decode ends the connection, whatever the cause
        await _refuse(conn, exc, request_id)


async def _settled(conn, pending: asyncio.Future, request_id: str):
    try:
        return await pending
    except Exception as exc:
        await _refuse(conn, exc, request_id)
