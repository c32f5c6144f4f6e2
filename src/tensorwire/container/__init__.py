"""The .twz container: chunked, checksummed, streamed and lazily read (docs/FORMAT.md)."""

from __future__ import annotations

import os
from typing import Any


from ..codec.dtypes import dtype_name_of
from ..codec.frame import DEFAULT_CHUNK_BYTES
from .reader import TwzFile
from .writer import Writer, atomic_output

__all__ = ["save_file", "load_file", "open", "TwzFile", "Writer", "atomic_output"]


def save_file(
    tensors: dict[str, Any],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    level: str = "fast",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Compress a dict of tensors (torch or numpy) into a .twz file, atomically.

    The twin of ``safetensors.torch.save_file``.

    Examples
    --------
    >>> import numpy as np, tensorwire
    >>> tensorwire.save_file({"w": np.ones((2, 3), np.float32)}, "/tmp/doc.twz")
    >>> tensorwire.load_file("/tmp/doc.twz")["w"].shape
    torch.Size([2, 3])
    """
    from ..codec.arrays import as_numpy

    arrays = {name: as_numpy(t) for name, t in tensors.items()}
    with atomic_output(path) as f:
        writer = Writer(f, level=level, chunk_bytes=chunk_bytes)
        for name, arr in arrays.items():
            writer.add_array(name, arr, dtype_name_of(arr.dtype))
        writer.finish(metadata)


def load_file(path: str | os.PathLike[str], device: str = "cpu", **source: Any) -> dict[str, Any]:
    """Decompress every tensor of a .twz file (or URL) into torch tensors on ``device``.

    The twin of ``safetensors.torch.load_file``. Each tensor is decoded chunk by chunk into
    its own memory while the next chunk is read. ``source``: ``pacer``,
    ``storage_options`` (see :class:`TwzFile`).
    """
    with TwzFile(path, **source) as f:
        return {name: f.get_tensor(name, device=device) for name in f.keys()}


def open(path: str | os.PathLike[str], **source: Any) -> TwzFile:  # noqa: A001 - mirrors safetensors.safe_open
    """Open a .twz file or URL for lazy access: ``keys()``, ``metadata()``, ``get_tensor(name)``."""
    return TwzFile(path, **source)
