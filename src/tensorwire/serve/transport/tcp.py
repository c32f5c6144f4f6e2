"""TCP server and client: authenticated :class:`~.connection.Connection` objects over asyncio sockets.

::

    async def handler(conn):                      # one task per connection
        request = await conn.recv_message(timeout=math.inf)
        cache, stats = await conn.recv_kv(expect={"n_layers": 30})
        await conn.send_message({"type": "done", "request_id": request["request_id"]})

    async with await start_server(handler, secret=secret) as server:   # port 0: a free port
        conn = await connect("127.0.0.1", server.port, secret=secret)
        ...

Every connection runs in its own task, so a slow transfer never holds up another; the
blocking work of a transfer (encode, decode) runs in worker threads. A peer that fails
the handshake gets an ERROR frame and a closed connection; the server logs it and goes on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ...errors import ConnectionClosed, PeerError, ProtocolError, TransportTimeout
from .. import auth
from .connection import Connection, ConnectionOptions
from .handshake import client_handshake, server_handshake
from .stream import StreamProtocol

__all__ = ["Server", "start_server", "connect"]

log = logging.getLogger("tensorwire.serve")

Handler = Callable[[Connection], Awaitable[Any]]


def _secret(secret: bytes | str | None) -> bytes:
    return auth.load_secret() if secret is None else auth.as_secret(secret)


class Server:
    """A listening server; made by :func:`start_server`. Use as ``async with``, or call :meth:`close`.

    Attributes
    ----------
    host, port : the address it listens on (the port chosen when 0 was asked).
    accepted : connections that passed the handshake.
    refused : connections that failed it (wrong secret, not a tensorwire peer, too slow).
    """

    def __init__(self, handler: Handler, secret: bytes, options: ConnectionOptions):
        self._handler = handler
        self._secret = secret
        self.options = options
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connections: set[Connection] = set()
        self.accepted = 0
        self.refused = 0
        self.host = ""
        self.port = 0

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    def _on_connect(self, stream: StreamProtocol) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: StreamProtocol) -> None:
        conn = Connection(stream, self.options, role="server")
        self._connections.add(conn)
        try:
            try:
                await server_handshake(conn, self._secret)
            except (ProtocolError, TransportTimeout, OSError) as exc:
                self.refused += 1
                log.warning("refused a connection from %s: %s", conn.peer, exc)
                return
            self.accepted += 1
            try:
                await self._handler(conn)
            except ConnectionClosed as exc:
                log.info("connection from %s closed: %s", conn.peer, exc)
            except PeerError as exc:
                log.warning("connection from %s: %s", conn.peer, exc)
            except (ProtocolError, TransportTimeout) as exc:
                log.warning("connection from %s failed: %s", conn.peer, exc)
            except Exception:
                log.exception("the handler failed on the connection from %s", conn.peer)
                if not conn.closed:
                    await conn.fail(RuntimeError("the server's handler failed; see its log"), code="internal")
        finally:
            self._connections.discard(conn)
            await conn.close()

    def stop_accepting(self) -> None:
        """Stop listening; connections already open go on (a draining worker)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening, close every connection and wait for their tasks to end."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Server {self.host}:{self.port} open={self.connections} accepted={self.accepted} refused={self.refused}>"


async def start_server(handler: Handler, *, secret: bytes | str | None = None, host: str = "127.0.0.1",
                       port: int = 0, sock: socket.socket | None = None, backlog: int = 128,
                       **options: Any) -> Server:  # fmt: skip
    """Listen on ``host:port`` (port 0: a free one, see :attr:`Server.port`) or on a bound ``sock``.

    ``handler(conn)`` runs once per authenticated connection, in its own task; the
    connection is closed when it returns. ``secret`` defaults to :func:`auth.load_secret`.
    ``options`` are :class:`ConnectionOptions` fields (``max_frame``, ``read_timeout``,
    ``shaper``, ...).
    """
    server = Server(handler, _secret(secret), ConnectionOptions(**options))
    loop = asyncio.get_running_loop()

    def factory() -> StreamProtocol:
        return StreamProtocol(on_connect=server._on_connect)

    if sock is not None:
        sock.setblocking(False)
        server._server = await loop.create_server(factory, sock=sock, backlog=backlog)
    else:
        server._server = await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)
    server.host, server.port = server._server.sockets[0].getsockname()[:2]
    return server


async def connect(host: str = "127.0.0.1", port: int | None = None, *, secret: bytes | str | None = None,
                  sock: socket.socket | None = None, connect_timeout: float = 10.0, **options: Any) -> Connection:  # fmt: skip
    """Connect to a server and run the handshake; returns the authenticated :class:`Connection`.

    ``sock``: an unconnected socket to connect from (e.g. one made inside a network
    namespace), connected to ``host:port``. Raises :class:`AuthenticationFailed` when the
    secrets differ, :class:`TransportTimeout` when the server does not answer in time.
    """
    loop = asyncio.get_running_loop()
    opts = ConnectionOptions(**options)
    secret_bytes = _secret(secret)
    if port is None:
        raise ValueError("connect() needs the server's port")
    try:
        if sock is not None:
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), connect_timeout)
            _, stream = await loop.create_connection(StreamProtocol, sock=sock)
        else:
            _, stream = await asyncio.wait_for(loop.create_connection(StreamProtocol, host, port), connect_timeout)
    except asyncio.TimeoutError:
        if sock is not None:
            sock.close()
        raise TransportTimeout(f"no connection to {host}:{port} within {connect_timeout:g} s") from None
    except BaseException:
        if sock is not None:
            sock.close()  # a refused connect (a dead peer) must not leak the namespace's socket
        raise
    conn = Connection(stream, opts, role="client")
    await client_handshake(conn, secret_bytes)
    return conn
