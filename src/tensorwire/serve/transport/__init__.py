"""Transports of the wire protocol: TCP (asyncio), connections, KV streaming, link emulation.

* :mod:`.tcp`: :func:`start_server`, :func:`connect`;
* :mod:`.connection`: :class:`Connection` (messages, KV transfers, errors, close);
* :mod:`.kvstream`: the layer-by-layer KV transfer with encode/decode overlapped;
* :mod:`.stream`: the byte stream under a connection (reads into the caller's buffer);
* :mod:`.handshake`: the shared-secret handshake;
* :mod:`.stats`: :class:`TransferStats`;
* :mod:`.shaping`: the sender-side :class:`TokenBucket`;
* :mod:`.netns`: kernel shaping (network namespace + tc tbf);
* :mod:`.link`: :class:`EmulatedLink`, tbf where allowed, else the token bucket.
"""

from .connection import Connection, ConnectionOptions
from .link import EmulatedLink
from .netns import Netns, cleanup_stale_namespaces, kernel_shaping_status
from .shaping import TokenBucket, TraceRate, gbps, to_gbps
from .stats import TransferStats
from .tcp import Server, connect, start_server

__all__ = [
    "Connection",
    "ConnectionOptions",
    "EmulatedLink",
    "Netns",
    "Server",
    "TokenBucket",
    "TraceRate",
    "TransferStats",
    "cleanup_stale_namespaces",
    "connect",
    "gbps",
    "kernel_shaping_status",
    "start_server",
    "to_gbps",
]
