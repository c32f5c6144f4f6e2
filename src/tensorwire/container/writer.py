"""Streaming, atomic writer of .twz containers.

Chunks are compressed and written as they come, so memory stays bounded by a chunk, not a
tensor. The file is written under a temporary name beside the target and renamed into
place only after the index and footer are on disk: a killed compression never leaves a
truncated file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..codec.blocks import BLOCK
from ..codec.chunks import LEVELS, encode_chunk
from ..codec.frame import DEFAULT_CHUNK_BYTES, checksum, values_per_chunk
from ..codec.planes import DTYPE_ITEMSIZE
from .layout import FOOTER, MAGIC, PREAMBLE, VERSION, ChunkRef, Index, TensorEntry, END_MAGIC

__all__ = ["Writer", "atomic_output"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_output:
    """Context manager: a temporary file in the target's folder, renamed over it on success."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __enter__(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fchmod(self.file.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is not what users expect
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


class Writer:
    """Write tensors chunk by chunk to an open binary file; call :meth:`finish` once.

    Parameters
    ----------
    file : binary file opened for writing, positioned at 0
    level : codec level, ``"fast"`` or ``"max"``
    chunk_bytes : original bytes per chunk
    """

    def __init__(self, file: BinaryIO, level: str = "fast", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
        if chunk_bytes < 4 * BLOCK:
            raise ValueError(f"chunk_bytes must be at least {4 * BLOCK}, got {chunk_bytes}")
        self.file = file
        self.level = level
        self.chunk_bytes = chunk_bytes
        self.tensors: list[TensorEntry] = []
        self._names: set[str] = set()
        self._offset = PREAMBLE.size
        file.write(PREAMBLE.pack(MAGIC, VERSION, 0, 0))

    def chunk_values(self, dtype: str) -> int:
        return values_per_chunk(DTYPE_ITEMSIZE[dtype], self.chunk_bytes)

    def add_chunks(self, name: str, dtype: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> TensorEntry:
        """Add a tensor from its values, given as consecutive uint8 arrays of whole values.

        Each array should hold :meth:`chunk_values` values (the last may hold fewer); the
        caller decides where the bytes come from (a file read, an array slice).
        """
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        itemsize = DTYPE_ITEMSIZE[dtype]
        entry = TensorEntry(name, dtype, tuple(int(d) for d in shape), {"id": "tensorwire.enec", "level": self.level})
        for data in chunks:
            stream = encode_chunk(data, dtype, self.level)
            self.file.write(memoryview(stream))
            entry.chunks.append(ChunkRef(data.size // itemsize, self._offset, stream.size, checksum(stream)))
            self._offset += stream.size
        if sum(c.values for c in entry.chunks) != entry.numel:
            raise ValueError(f"tensor {name!r}: chunks held {sum(c.values for c in entry.chunks)} values, shape {shape} needs {entry.numel}")
        self._names.add(name)
        self.tensors.append(entry)
        return entry

    def add_array(self, name: str, array: np.ndarray, dtype: str) -> TensorEntry:
        """Add a tensor from an in-memory array (no copy beyond one chunk at a time)."""
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        step = self.chunk_values(dtype) * DTYPE_ITEMSIZE[dtype]
        return self.add_chunks(name, dtype, array.shape, (flat[i : i + step] for i in range(0, flat.size, step)))

    def finish(self, metadata: dict[str, str] | None = None, source: dict[str, Any] | None = None) -> Index:
        metadata = dict(metadata or {})
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {v!r}")
        index = Index(self.tensors, metadata, source)
        raw = index.to_bytes()
        self.file.write(raw)
        self.file.write(FOOTER.pack(self._offset, len(raw), checksum(raw), 0, END_MAGIC))
        return index
