"""Bytes in and out of an asyncio transport: reads land in the caller's buffer, idle timeouts, flow control.

:class:`StreamProtocol` is an :class:`asyncio.BufferedProtocol`: when a frame's payload is
awaited, the socket is read (``recv_into``) straight into the buffer allocated for that
payload, so a KV layer of 100 MB is copied once, by the kernel, and never again in
Python. Bytes that arrive while nobody waits go to a small staging buffer; reading
pauses when it is full (the peer then blocks on TCP flow control).

Timeouts are *idle* timeouts: a read fails with :class:`TransportTimeout` when no byte
arrived for ``timeout`` seconds, however long the whole read takes, so a slow link is
not a stalled one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from ...errors import ConnectionClosed, TransportTimeout

__all__ = ["StreamProtocol", "STAGING_BYTES", "WRITE_HIGH_WATER"]

STAGING_BYTES = 256 << 10
WRITE_HIGH_WATER = 1 << 20  # the transport buffers at most this much before drain() waits


class StreamProtocol(asyncio.BufferedProtocol):
    """One connection's byte stream. :meth:`readinto` and :meth:`write`/:meth:`drain` are the API.

    ``on_connect`` is called with the protocol when the connection is made (a server uses
    it to start the connection's task). Not safe for two concurrent readers: the
    :class:`~tensorwire.serve.transport.connection.Connection` on top serialises them.
    """

    def __init__(self, on_connect: Callable[[StreamProtocol], None] | None = None, staging: int = STAGING_BYTES):
        self._on_connect = on_connect
        self._staging = bytearray(staging)
        self._lo = self._hi = 0  # staged bytes: self._staging[self._lo:self._hi]
        self._target: memoryview | None = None  # the caller's buffer while a read waits
        self._filled = 0
        self._into_target = False  # which buffer get_buffer handed out last
        self._waiter: asyncio.Future | None = None  # the reader's
        self._lost_waiters: list[asyncio.Future] = []  # wait_lost()'s
        self._reading_paused = False
        self._writable = True
        self._write_waiters: list[asyncio.Future] = []
        self._discard = False
        self.out_of_step = False  # a read gave up with part of its buffer filled: those bytes are lost
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.last_read = time.monotonic()
        self.first_byte_at: float | None = None  # perf_counter() of the first byte of the current read
        self.bytes_in = 0
        self.bytes_out = 0

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None and self._lo == self._hi and not self._discard:
            self._into_target = True
            return self._target[self._filled :]
        self._into_target = False
        if self._lo == self._hi or self._discard:
            self._lo = self._hi = 0
        elif self._hi == len(self._staging):  # move the staged bytes to the front to make room
            n = self._hi - self._lo
            self._staging[:n] = self._staging[self._lo : self._hi]
            self._lo, self._hi = 0, n
        if self._hi == len(self._staging):  # only if pause_reading came too late; never lose bytes
            self._staging.extend(bytes(len(self._staging)))
        return memoryview(self._staging)[self._hi :]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_read = time.monotonic()
        self.bytes_in += nbytes
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        if self._discard:
            return
        if self._into_target:
            self._filled += nbytes
            if self._target is not None and self._filled == len(self._target):
                self._target = None
                self._wake()
            return
        self._hi += nbytes
        if self._hi - self._lo >= len(self._staging) and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our side open: an ERROR frame may still have to be written

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost, self.lost_exc = True, exc
        self._wake()
        self._release_writers()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._release_writers()

    # -- reading ---------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.eof or self.lost:
            for waiter in self._lost_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._lost_waiters.clear()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def staged(self) -> memoryview:
        """Bytes received and not read yet (a peek: nothing is consumed)."""
        return memoryview(self._staging)[self._lo : self._hi]

    async def readinto(self, buffer: bytearray | memoryview, timeout: float | None) -> None:
        """Fill ``buffer`` completely from the stream.

        Raises :class:`TransportTimeout` when no byte arrives for ``timeout`` seconds
        (``None`` or ``inf``: wait forever) and :class:`ConnectionClosed` when the peer
        closes first; both carry ``mid_frame``: whether part of ``buffer`` was filled.
        """
        view = memoryview(buffer).cast("B")
        n = len(view)
        self.first_byte_at = None
        take = min(self._hi - self._lo, n)
        if take:
            view[:take] = self._staging[self._lo : self._lo + take]
            self._lo += take
            self.first_byte_at = time.perf_counter()
            self._resume_reading()
        if take == n:
            return
        if self.eof or self.lost:
            raise self._closed(take)
        self._target, self._filled = view, take
        self._resume_reading()
        started = time.monotonic()
        limit = math.inf if timeout is None else timeout
        try:
            while self._target is not None:
                if self.eof or self.lost:
                    raise self._closed(self._filled)
                left = limit - (time.monotonic() - max(started, self.last_read))
                if left <= 0:
                    exc = TransportTimeout(
                        f"the peer sent nothing for {limit:g} s with {n - self._filled} of {n} bytes still to come; "
                        "it stalled or died (raise read_timeout if it is only slow to start)"
                    )
                    exc.mid_frame = self._filled > 0  # type: ignore[attr-defined]
                    raise exc
                self._waiter = asyncio.get_running_loop().create_future()
                await asyncio.wait([self._waiter], timeout=None if math.isinf(left) else left)
        finally:
            self._waiter = None
            if self._target is not None and self._filled > 0:
                self.out_of_step = True
            self._target = None

    def _closed(self, filled: int) -> ConnectionClosed:
        why = f" ({self.lost_exc})" if self.lost_exc else ""
        return ConnectionClosed(
            "the peer closed the connection" + (" in the middle of a frame" if filled else "") + why, mid_frame=filled > 0
        )

    def discard_input(self) -> None:
        """Drop everything received from now on (a connection being closed after an error)."""
        self._discard = True
        self._lo = self._hi = 0
        self._resume_reading()

    # -- writing ---------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise self._closed(0)
        self.transport.write(data)
        self.bytes_out += memoryview(data).nbytes

    def _release_writers(self) -> None:
        for waiter in self._write_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._write_waiters.clear()

    async def drain(self, timeout: float | None) -> None:
        """Wait until the transport's buffer is below its high-water mark (the peer reads)."""
        while not self._writable and not self.lost:
            waiter = asyncio.get_running_loop().create_future()
            self._write_waiters.append(waiter)
            done, _ = await asyncio.wait([waiter], timeout=timeout)
            if not done:
                raise TransportTimeout(
                    f"the peer read nothing for {timeout:g} s while we had data to send; it stalled or died"
                )
        if self.lost:
            raise self._closed(0)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_lost(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the connection is gone or the peer sent EOF."""
        if self.lost or self.eof:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._lost_waiters.append(waiter)
        await asyncio.wait([waiter], timeout=timeout)
