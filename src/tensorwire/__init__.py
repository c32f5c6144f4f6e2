"""tensorwire: make the bytes of large language models cheaper to move.

The small public API::

    tensorwire.save_file(tensors, "model.twz")          # like safetensors.torch.save_file
    tensors = tensorwire.load_file("model.twz")          # dict[str, torch.Tensor]
    with tensorwire.open("model.twz") as f: f.get_tensor("name")
    blob = tensorwire.compress(array); array = tensorwire.decompress(blob)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .codec import EnecCodec
from .container import load_file, open, save_file
from .errors import (
    BadMagic,
    ChecksumMismatch,
    CorruptData,
    FormatError,
    MissingDependency,
    TensorwireError,
    Truncated,
    UnsupportedDType,
    UnsupportedVersion,
)

__version__ = "0.1.0"

__all__ = [
    "compress",
    "decompress",
    "save_file",
    "load_file",
    "open",
    "EnecCodec",
    "TensorwireError",
    "FormatError",
    "BadMagic",
    "UnsupportedVersion",
    "Truncated",
    "ChecksumMismatch",
    "CorruptData",
    "UnsupportedDType",
    "MissingDependency",
]


def compress(array: Any, level: str = "fast") -> bytes:
    """Losslessly compress one array (numpy or torch) into a self-describing frame.

    Examples
    --------
    >>> import numpy as np, tensorwire
    >>> x = np.arange(10, dtype=np.float32)
    >>> bool((tensorwire.decompress(tensorwire.compress(x)) == x).all())
    True
    """
    from .codec.arrays import as_numpy

    return EnecCodec(level=level).encode(as_numpy(array))


def decompress(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decompress a frame made by :func:`compress` back to a numpy array, bit-exact."""
    return EnecCodec().decode(data)
