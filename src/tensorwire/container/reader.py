"""Validating, lazy reader of .twz containers, local or remote.

Opening reads only the preamble, footer and index; tensors are decoded on request, chunk
by chunk, straight into the output buffer. Every chunk's checksum is verified before it
is decoded. Nothing in a file is ever executed.

Reading and decoding overlap: while chunk ``i`` is decoded (numba kernels, GIL released),
a reader thread fetches chunk ``i + 1`` into the other of two buffers. Memory is the
output plus two compressed chunks, whatever the tensor's size. The bytes come from a
:mod:`~tensorwire.container.source`: a local file, or a URL read by range requests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..codec.chunks import decode_chunk
from ..codec.dtypes import numpy_dtype
from ..codec.frame import checksum
from ..codec.planes import DTYPE_ITEMSIZE
from ..errors import ChecksumMismatch, Truncated, require
from .layout import FOOTER, PREAMBLE, ChunkRef, Index, TensorEntry, check_not_empty_file, parse_footer, parse_index, parse_preamble
from .source import ByteSource, Pacer, open_source

__all__ = ["TwzFile"]


class TwzFile:
    """An open .twz container, like ``safetensors.safe_open``.

    Examples
    --------
    >>> with TwzFile("model.twz") as f:  # doctest: +SKIP
    ...     for name in f.keys():
    ...         tensor = f.get_tensor(name)
    """

    def __init__(self, path: str | os.PathLike[str], *, pacer: Pacer | None = None,
                 storage_options: dict[str, Any] | None = None):  # fmt: skip
        """Open ``path``: a file, or a URL (``https://...``, ``s3://...``; extra ``remote``).

        ``pacer`` paces every read (a slow disk or link, emulated; e.g. the transport's
        ``TokenBucket``);
        ``storage_options`` go to fsspec for a URL (credentials, headers).
        """
        self.path = path
        self._source: ByteSource = open_source(path, pacer, storage_options)
        self._reader: ThreadPoolExecutor | None = None
        try:
            self.size = self._source.size
            check_not_empty_file(self.size)
            parse_preamble(self.read_range(0, min(PREAMBLE.size, self.size)))
            footer = self.read_range(self.size - FOOTER.size, FOOTER.size) if self.size >= FOOTER.size else b""
            offset, length, digest = parse_footer(footer, self.size)
            raw = self.read_range(offset, length)
            if checksum(raw) != digest:
                raise ChecksumMismatch(
                    f"index checksum is {checksum(raw):016x}, footer says {digest:016x}: the file was altered "
                    "after writing; compress the source again"
                )
            self.index: Index = parse_index(raw, offset)
            self._by_name = {t.name: t for t in self.index.tensors}
            self._buffers = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        except BaseException:
            self._source.close()
            raise

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "TwzFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
        self._source.close()

    # -- safetensors-like API --------------------------------------------------------------
    def keys(self) -> list[str]:
        return [t.name for t in self.index.tensors]

    def metadata(self) -> dict[str, str]:
        return dict(self.index.metadata)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}; it holds {len(self._by_name)} tensors") from None

    def get_numpy(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Decode one tensor into a numpy array (bf16/float8 as ml_dtypes)."""
        entry = self.entry(name)
        if out is None:
            out = np.empty(entry.shape, dtype=numpy_dtype(entry.dtype))
        elif out.shape != entry.shape or out.dtype != numpy_dtype(entry.dtype) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {entry.dtype} array of shape {entry.shape}")
        self._decode_into(entry, out.reshape(-1).view(np.uint8))
        return out

    def _decode_into(self, entry: TensorEntry, flat: np.ndarray) -> None:
        """Decode every chunk of ``entry`` into ``flat``, the tensor's bytes (uint8)."""
        for (i, chunk, span), stream in zip(self._chunk_spans(entry), self._streams(entry)):
            decode_chunk(stream, entry.dtype, chunk.values, flat[span])

    @staticmethod
    def _chunk_spans(entry: TensorEntry) -> Iterator[tuple[int, ChunkRef, slice]]:
        """Each chunk with the byte range it fills in the decoded tensor."""
        itemsize = DTYPE_ITEMSIZE[entry.dtype]
        at = 0
        for i, chunk in enumerate(entry.chunks):
            yield i, chunk, slice(at, at + chunk.values * itemsize)
            at += chunk.values * itemsize

    def iter_chunk_bytes(self, entry: TensorEntry) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(byte offset in the tensor, decoded bytes)`` per chunk, checksums verified.

        The yielded array is reused for the next chunk: copy it if you keep it.
        """
        itemsize = DTYPE_ITEMSIZE[entry.dtype]
        out = np.empty(max((c.values for c in entry.chunks), default=0) * itemsize, dtype=np.uint8)
        for (i, chunk, span), stream in zip(self._chunk_spans(entry), self._streams(entry)):
            nbytes = span.stop - span.start
            decode_chunk(stream, entry.dtype, chunk.values, out[:nbytes])
            yield span.start, out[:nbytes]

    def _streams(self, entry: TensorEntry) -> Iterator[np.ndarray]:
        """Every chunk's verified stream, in order; chunk ``i + 1`` is read while ``i`` is in use.

        A yielded stream stays valid until the next one is asked for (two buffers alternate).
        """
        if not entry.chunks:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="twz-read")
        pending: Future = self._reader.submit(self._read_verified, entry, 0, 0)
        try:
            for i in range(len(entry.chunks)):
                stream = pending.result()
                if i + 1 < len(entry.chunks):
                    pending = self._reader.submit(self._read_verified, entry, i + 1, (i + 1) % 2)
                yield stream
        finally:
            pending.cancel()  # a read-ahead nobody will use: dropped if it has not started

    def read_chunk(self, entry: TensorEntry, i: int) -> np.ndarray:
        """The stream of chunk ``i`` of a tensor, read into a reused buffer and checksum-verified."""
        return self._read_verified(entry, i, 0)

    def _read_verified(self, entry: TensorEntry, i: int, slot: int) -> np.ndarray:
        chunk = entry.chunks[i]
        if chunk.offset + chunk.size > self.size:
            raise Truncated(f"chunk {i} of {entry.name!r} ends past the end of the file; it is truncated")
        if self._buffers[slot].size < chunk.size:
            self._buffers[slot] = np.empty(chunk.size, dtype=np.uint8)
        view = self._buffers[slot][: chunk.size]
        self._source.read_into(chunk.offset, memoryview(view))
        digest = checksum(view)
        if digest != chunk.checksum:
            raise ChecksumMismatch(
                f"chunk {i} of tensor {entry.name!r} has checksum {digest:016x}, expected {chunk.checksum:016x}: "
                "the file was altered after writing; compress the source again"
            )
        return view

    def get_tensor(self, name: str, device: str = "cpu"):
        """Decode one tensor into a torch tensor on ``device``.

        On an accelerator the compressed chunks are copied over and decoded there (Triton
        kernels, ``tensorwire[gpu]``), so only compressed bytes cross the host link.
        """
        if str(device) == "cpu" or str(device).startswith("cpu:"):
            from ..codec.arrays import torch_dtype

            torch = require("torch")
            entry = self.entry(name)
            out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
            if out.numel():  # decoded straight into the tensor's memory, through a byte view
                self._decode_into(entry, out.view(-1).view(torch.uint8).numpy())
            return out
        return self.decode_to_device(name, device)

    def decode_to_device(self, name: str, device):
        """Decode one tensor with the device decoder into a new tensor on ``device``.

        Chunk checksums are verified on the host before upload. With ``TRITON_INTERPRET=1``
        ``device`` may be ``"cpu"``: that is how this path is tested without a GPU.
        """
        from ..codec.gpu import decode_chunk_device
        from ..codec.arrays import torch_dtype

        torch = require("torch")
        entry = self.entry(name)
        out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype), device=device)
        flat = out.reshape(-1).view(torch.uint8)
        for (i, chunk, span), stream in zip(self._chunk_spans(entry), self._streams(entry)):
            decode_chunk_device(stream, entry.dtype, chunk.values, flat[span])
        return out

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the file (one range request for a URL)."""
        return self._source.read(offset, size)
