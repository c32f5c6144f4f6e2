"""The ``zstd`` bytes encoder: a Zstandard frame (``zstandard`` library) around the array encoder's bytes.

The stream is one standard zstd frame (RFC 8878) with its content size written and no
content checksum (the payload's checksums cover every stream), so ``zstd -d`` reads it.
The decoder checks, before it allocates, that the frame declares exactly the size the
payload header gives and that this size is one zstd could produce from so many bytes
(at most 32768x: a 4-byte RLE block spans 128 KiB); then that the frame ends exactly at
the end of the stream. A truncated frame raises :class:`~tensorwire.errors.Truncated`,
anything else zstd rejects :class:`~tensorwire.errors.CorruptData`. zstd has no check of
its own on literal bytes, so some bit flips decode to other bytes of the right size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

from ...errors import CorruptData, Truncated, require
from ..stage import BytesEncoder, is_int
from .streams import check_size

__all__ = ["MAX_LEVEL", "MIN_LEVEL", "Zstd"]

MIN_LEVEL = -(1 << 17)  # ZSTD_minCLevel(): the fastest of zstd's negative ("fast") levels
MAX_LEVEL = 22  # ZSTD_maxCLevel()
MAX_RATIO = 1 << 15  # a 3-byte header + 1-byte RLE block decodes to at most 128 KiB

_local = threading.local()  # zstd contexts are not thread-safe; reusing one per thread saves its setup


def _compressor(level: int):
    zstandard = require("zstandard")
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return cache[level]


def _decompressor():
    zstandard = require("zstandard")
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class Zstd(BytesEncoder):
    """Compress bytes with Zstandard.

    Parameters
    ----------
    level : int
        zstd compression level, ``-131072..22`` (negative: faster, larger; 3 is zstd's default,
        19+ is slow and only pays on highly redundant streams).

    Examples
    --------
    >>> z = Zstd(level=3)
    >>> data = bytes(1000)
    >>> packed = z.encode(data)
    >>> len(packed) < 30 and z.decode(packed, len(data)) == data
    True
    """

    level: int = 3
    id: ClassVar[str] = "zstd"
    search_space: ClassVar[dict[str, tuple]] = {"level": (1, 3, 9)}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(
            is_int(self.level, MIN_LEVEL, MAX_LEVEL),
            f"level must be an int in {MIN_LEVEL}..{MAX_LEVEL}, got {self.level!r}",
        )

    def encode(self, data: bytes | memoryview) -> bytes:
        return _compressor(self.level).compress(data)

    def decode(self, data: bytes | memoryview, size: int) -> bytes:
        zstandard = require("zstandard")
        view = memoryview(data).cast("B")
        size = check_size(size, view.nbytes, MAX_RATIO, "zstd")
        try:
            declared = zstandard.get_frame_parameters(view).content_size
        except zstandard.ZstdError as exc:
            raise _classify(view, exc) from exc
        if declared != size:
            found = "no size" if declared == zstandard.CONTENTSIZE_UNKNOWN else f"{declared} bytes"
            raise CorruptData(
                f"the zstd frame declares {found}, the payload header {size} bytes; the payload is corrupt"
            )
        if size == 0:
            # python-zstandard's one-shot decompress returns b"" for a frame that declares
            # size 0 without reading its blocks: parse the (tiny) frame with the streaming decoder.
            return _decode_empty(view)
        try:
            out = _decompressor().decompress(view, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise _classify(view, exc) from exc
        if len(out) != size:  # pragma: no cover - zstd checks the declared content size itself
            raise CorruptData(f"the zstd frame decoded to {len(out)} bytes, expected {size}")
        return out


def _decode_empty(view: memoryview) -> bytes:
    zstandard = require("zstandard")
    stream = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = stream.decompress(view)
    except zstandard.ZstdError as exc:
        raise CorruptData(f"zstd rejects the stream ({exc}); the payload is corrupt") from exc
    if not stream.eof:
        raise Truncated(f"the zstd frame ends early ({view.nbytes} bytes); the stream was cut")
    if out or stream.unused_data:
        raise CorruptData(
            f"an empty zstd frame is followed by {len(stream.unused_data)} bytes or decodes to {len(out)}; "
            "the payload is corrupt"
        )
    return b""


def _classify(view: memoryview, exc: Exception) -> Exception:
    """Truncated when a streaming decoder would just wait for more input, else CorruptData."""
    zstandard = require("zstandard")
    try:
        stream = zstandard.ZstdDecompressor().decompressobj()
        stream.decompress(view)
        cut = not stream.eof
    except zstandard.ZstdError:
        cut = False
    if cut:
        return Truncated(f"the zstd frame ends early ({view.nbytes} bytes, zstd says: {exc}); the stream was cut")
    return CorruptData(f"zstd rejects the stream ({exc}); the payload is corrupt")
