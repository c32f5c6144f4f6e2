"""Disaggregated serving: prefill and decode workers exchanging compressed KV over TCP,
the wire protocol and its transports (docs/PROTOCOL.md), and the OpenAI-compatible front
end (:mod:`tensorwire.serve.http`, loaded lazily: its web stack is the ``serve`` extra).

A prefill worker sends a request's compressed KV cache to a decode worker over TCP::

    from tensorwire.serve import connect, start_server

    async def handler(conn):                                   # the decode worker
        request = await conn.recv_message(timeout=math.inf)
        cache, stats = await conn.recv_kv(expect={"n_layers": 30})
        await conn.send_message({"type": "done", "request_id": request["request_id"]})

    server = await start_server(handler, secret=secret)         # port 0: server.port
    conn = await connect("127.0.0.1", server.port, secret=secret)   # the prefill worker
    await conn.send_message({"type": "request", "request_id": "r1"})
    stats = await conn.send_kv("r1", pipeline.encode_stream(cache))

The secret comes from ``TENSORWIRE_SECRET`` or a file (:func:`load_secret`,
:func:`ensure_secret_file`). Link emulation: :class:`TokenBucket` (any machine) and
:class:`EmulatedLink` (a network namespace with ``tc tbf`` where allowed).
"""

from .auth import ensure_secret_file, generate_secret, load_secret
from .protocol import DEFAULT_MAX_FRAME, VERSION, FrameType
from .transport import (
    Connection,
    ConnectionOptions,
    EmulatedLink,
    Netns,
    Server,
    TokenBucket,
    TransferStats,
    cleanup_stale_namespaces,
    connect,
    gbps,
    kernel_shaping_status,
    start_server,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "VERSION",
    "Connection",
    "ConnectionOptions",
    "EmulatedLink",
    "FrameType",
    "Netns",
    "Server",
    "TokenBucket",
    "TransferStats",
    "cleanup_stale_namespaces",
    "connect",
    "ensure_secret_file",
    "gbps",
    "generate_secret",
    "kernel_shaping_status",
    "load_secret",
    "start_server",
]
