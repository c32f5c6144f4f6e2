"""Running the app with uvicorn: in the foreground (:func:`serve`) or on a thread
(:class:`BackgroundServer`, for tests and the demo).

The background server binds its own socket before uvicorn starts (port 0: a free port,
no race between choosing the port and binding it), waits until uvicorn serves, and on
exit asks uvicorn to stop and joins its thread, bounded in time.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

__all__ = ["BackgroundServer", "serve"]


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``.

    Parameters
    ----------
    app
        An ASGI app (``create_app(...)``).
    host, port
        Where to listen (default: 127.0.0.1 on a free port).
    start_timeout, stop_timeout : float
        Seconds to wait for uvicorn to start, and to stop (open streams are cut after
        ``stop_timeout / 2``).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0, log_level: str = "warning"):  # fmt: skip
        self.app = app
        self.host = host
        self.requested_port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        if self.port is None:
            raise RuntimeError("the server is not running")
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on",
                                timeout_graceful_shutdown=max(1, int(self.stop_timeout / 2)))  # fmt: skip
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign] - not the main thread
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not server.started:
            if self._error is not None or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"uvicorn did not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn did not start within {self.start_timeout} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.stop_timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(self.stop_timeout)
            alive = self._thread.is_alive()
            self._thread = None
            if alive:
                raise TimeoutError(f"uvicorn on port {self.port} did not stop within {2 * self.stop_timeout} s")
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
