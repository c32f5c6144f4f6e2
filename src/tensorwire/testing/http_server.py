"""A real HTTP server for a folder that answers range requests, bound to 127.0.0.1.

The standard library's ``http.server`` ignores ``Range`` headers and sends whole files, so
it cannot stand in for object storage or a CDN. This one answers ``Range: bytes=a-b``
(also ``a-`` and ``-n``) with ``206 Partial Content`` and counts the bytes it sent, so that
tests and benchmarks can check that a reader fetched only what it needed::

    with RangeServer(folder) as server:
        url = server.url("model.twz")
        ...
        server.bytes_sent
"""

from __future__ import annotations

import os
import re
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["RangeServer"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(SimpleHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        wanted = self.headers.get("Range")
        start, end = 0, size  # [start, end)
        if wanted:
            match = _RANGE.match(wanted.strip())
            if not match or (not match.group(1) and not match.group(2)):
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            first, last = match.groups()
            if first:
                start, end = int(first), min(size, int(last) + 1) if last else size
            else:
                start, end = max(0, size - int(last)), size
            if start >= size or start >= end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(HTTPStatus.OK)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        with self.server.lock:
            self.server.requests += 1
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                data = f.read(min(left, 1 << 20))
                if not data:
                    break
                # Counted before the write: once a client holds the bytes, the count includes them.
                with self.server.lock:
                    self.server.bytes_sent += len(data)
                self.wfile.write(data)
                left -= len(data)

    def do_HEAD(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    bytes_sent = 0
    requests = 0

    def __init__(self, directory: str, *args, **kwargs):
        self.directory = directory
        self.lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def finish_request(self, request, client_address) -> None:
        _Handler(request, client_address, self, directory=self.directory)


class RangeServer:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) from a background thread."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RangeServer":
        self._server = _Server(str(self.folder), ("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not running"
        return self._server.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def bytes_sent(self) -> int:
        return self._server.bytes_sent if self._server is not None else 0

    @property
    def requests(self) -> int:
        return self._server.requests if self._server is not None else 0
