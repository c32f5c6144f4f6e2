"""Where a container's bytes come from: a local file, or a URL read by ranges through fsspec.

A reader asks for ``(offset, size)`` ranges only: the preamble, the footer, the index, then
one chunk at a time. A local file answers with ``pread``; a remote one (``http://``,
``https://``, ``s3://`` with s3fs, any fsspec protocol) with one range request per chunk,
so a reader that wants one tensor moves that tensor's compressed bytes and nothing else.

A ``pacer`` paces every read: any object with ``take(nbytes) -> seconds to wait`` and a
``chunk`` size in bytes, such as the serving transport's token bucket
(:class:`~tensorwire.serve.transport.shaping.TokenBucket`, passed in by the caller: the
container layer sits below serving). That emulates a slow disk or a slow link to object
storage on the read path, the way the serving link is emulated on the wire.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from ..errors import Truncated, require

__all__ = ["ByteSource", "LocalSource", "Pacer", "RemoteSource", "open_source", "is_url"]


class Pacer(Protocol):
    """What paces reads: credit for ``nbytes`` (returns the seconds to wait), in pieces of ``chunk``."""

    chunk: int

    def take(self, nbytes: int) -> float: ...


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a remote object (``scheme://...``, other than ``file://``)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


class ByteSource:
    """Random-access bytes of known size; see the module docstring."""

    name: str
    size: int

    def __init__(self, pacer: Pacer | None = None):
        self.pacer = pacer

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset``; :class:`Truncated` if the source ends first."""
        step = self.pacer.chunk if self.pacer is not None else len(view)
        for at in range(0, len(view), max(step, 1)):
            piece = view[at : at + step]
            if self.pacer is not None:
                wait = self.pacer.take(len(piece))
                if wait > 0:
                    time.sleep(wait)
            got = self._read_into(offset + at, piece)
            if got != len(piece):
                raise Truncated(
                    f"wanted {len(view)} bytes at {offset} of {self.name}, the source ended after {at + got}; "
                    "the file is truncated"
                )

    def read(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def _read_into(self, offset: int, view: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalSource(ByteSource):
    """A local file, read with ``os.preadv`` (no shared file position: readers may run in threads)."""

    def __init__(self, path: str | os.PathLike[str], pacer: Pacer | None = None):
        super().__init__(pacer)
        self.name = str(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def _read_into(self, offset: int, view: memoryview) -> int:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RemoteSource(ByteSource):
    """An object behind an fsspec URL; each read is one range request (``fs.cat_file``)."""

    def __init__(self, url: str, pacer: Pacer | None = None, storage_options: dict[str, Any] | None = None):
        super().__init__(pacer)
        fsspec = require("fsspec")
        self.name = url
        self._fs, self._path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.size = int(self._fs.size(self._path))

    def _read_into(self, offset: int, view: memoryview) -> int:
        if offset >= self.size:
            return 0
        data = self._fs.cat_file(self._path, start=offset, end=min(offset + len(view), self.size))
        view[: len(data)] = data
        return len(data)


def open_source(path: str | os.PathLike[str], pacer: Pacer | None = None, storage_options: dict[str, Any] | None = None) -> ByteSource:
    """A :class:`RemoteSource` for a URL, else a :class:`LocalSource` (``file://`` stripped)."""
    if is_url(path):
        return RemoteSource(os.fspath(path), pacer, storage_options)
    text = os.fspath(path)
    return LocalSource(Path(text[len("file://") :] if text.startswith("file://") else text), pacer)
