"""One chunk of one tensor: pick the stream mode on encode, check and dispatch on decode.

A chunk stream starts with its mode byte (docs/FORMAT.md, "Chunk streams"):

* mode 0, stored: the bytes unchanged (other dtypes, or data that did not compress);
* mode 1, lanes: the fast ENEC stream of ``blocks.py``;
* mode 2, huffman: the high-ratio stream of ``entropy.py``.

``impl="cpu"`` runs the numba kernels, ``impl="reference"`` the numpy reference; both
read and write the same bytes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import CorruptData, FormatError
from . import blocks, entropy
from .planes import DTYPE_ITEMSIZE, FloatLayout, layout_for

__all__ = ["LEVELS", "encode_chunk", "decode_chunk", "encode_huffman", "decode_huffman", "Impl", "Level"]

Level = Literal["fast", "max"]
Impl = Literal["cpu", "reference"]
LEVELS: tuple[str, ...] = ("fast", "max")
HUFFMAN_ALWAYS_ABOVE = 1 << 16  # values; larger chunks always take mode 2 at level "max"


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")


def _check_impl(impl: str) -> None:
    if impl not in ("cpu", "reference"):
        raise ValueError(f"unknown impl {impl!r}; expected 'cpu' or 'reference'")


def encode_chunk(data: np.ndarray, dtype: str, level: Level = "fast", impl: Impl = "cpu") -> np.ndarray:
    """Encode the values of one chunk (any array whose bytes are the little-endian values).

    Returns the chunk stream as a uint8 array. Falls back to stored mode when the codec
    would not make the chunk smaller.
    """
    _check_level(level)
    layout = layout_for(dtype)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n = raw.size // DTYPE_ITEMSIZE[dtype]
    if layout is None or n == 0:
        return np.frombuffer(blocks.encode_raw(raw, n), dtype=np.uint8)
    values = raw.view(layout.uint)
    encoded = _encode_lanes(values, layout, impl) if level == "fast" or n <= HUFFMAN_ALWAYS_ABOVE else None
    if level == "max":
        huffman = encode_huffman(values, layout, impl=impl)
        # Small chunks can lose to mode 1 (the code-length table is a fixed cost): keep the
        # smaller stream, so that "max" is never larger than "fast".
        if encoded is None or huffman.size < encoded.size:
            encoded = huffman
    if encoded.size >= raw.size + blocks.RAW_HEADER.size:
        return np.frombuffer(blocks.encode_raw(raw, n), dtype=np.uint8)
    return encoded


def _encode_lanes(values: np.ndarray, layout, impl: Impl) -> np.ndarray:
    if impl == "cpu":
        from . import cpu

        return cpu.encode_lanes(values, layout)
    return np.frombuffer(blocks.encode_lanes(values, layout), dtype=np.uint8)


def decode_chunk(buf: np.ndarray, dtype: str, n: int, out: np.ndarray | None = None, impl: Impl = "cpu") -> np.ndarray:
    """Decode one chunk stream of ``n`` values into ``out`` (a uint8 array of ``n*itemsize``).

    Every header field is checked before a kernel runs; bad input raises a
    :class:`~tensorwire.errors.FormatError` subclass. Returns ``out``.
    """
    itemsize = DTYPE_ITEMSIZE.get(dtype)
    if itemsize is None:
        layout_for(dtype)  # raises UnsupportedDType with the list of known dtypes
    if out is None:
        out = np.empty(n * itemsize, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.size != n * itemsize:
        raise ValueError(f"out must be a uint8 array of {n * itemsize} bytes, got {out.dtype} of {out.size}")
    buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    mode = blocks.chunk_mode(buf)
    layout = layout_for(dtype)
    if mode == blocks.MODE_RAW:
        out[:] = blocks.decode_raw(buf, itemsize, n)
        return out
    if layout is None:
        raise CorruptData(f"a chunk of dtype {dtype} must be stored (mode 0), found mode {mode}; the file is corrupt")
    values = out.view(layout.uint)
    if mode == blocks.MODE_LANES:
        plan = blocks.parse_lanes(buf, layout, n)
        if impl == "cpu":
            from . import cpu

            cpu.decode_lanes(buf, plan, layout, values)
        else:
            values[:] = blocks.decode_lanes(buf, layout, n)
        return out
    if mode == blocks.MODE_HUFFMAN:
        decode_huffman(buf, layout, n, values, impl=impl)
        return out
    raise FormatError(
        f"unknown chunk mode {mode}; this build knows modes 0-2. The file may come from a newer "
        "tensorwire: upgrade, or the file is corrupt"
    )


def encode_huffman(values: np.ndarray, layout: FloatLayout, impl: Impl = "cpu") -> np.ndarray:
    """Encode one chunk as a mode-2 stream.

    Parameters
    ----------
    values : numpy.ndarray
        Unsigned words of the chunk (any shape; at least one value).
    layout : FloatLayout
        Their float layout.
    impl : {"cpu", "reference"}
        numba kernels or the numpy reference; both write the same bytes.

    Returns
    -------
    numpy.ndarray
        uint8 chunk stream.
    """
    _check_impl(impl)
    values = np.ascontiguousarray(values).reshape(-1).view(layout.uint)
    if impl == "reference":
        return np.frombuffer(entropy.encode_reference(values, layout), dtype=np.uint8)
    from . import cpu_huffman

    return cpu_huffman.encode_huffman(values, layout)


def decode_huffman(
    buf: np.ndarray,
    layout: FloatLayout,
    n: int | None = None,
    values_out: np.ndarray | None = None,
    impl: Impl = "cpu",
) -> np.ndarray:
    """Decode a mode-2 chunk stream.

    Parameters
    ----------
    buf : numpy.ndarray or bytes-like
        Exactly the chunk stream.
    layout : FloatLayout
        Float layout of the values.
    n : int, optional
        Values the caller expects; a different count in the header raises CorruptData.
    values_out : numpy.ndarray, optional
        ``layout.uint`` array of ``n`` values to write into.
    impl : {"cpu", "reference"}
        numba kernels or the numpy reference; both accept the same streams.

    Returns
    -------
    numpy.ndarray
        The unsigned words (``values_out`` when given).

    Raises
    ------
    FormatError
        Or its subclasses Truncated and CorruptData, for any stream that is not a valid
        mode-2 chunk.
    """
    _check_impl(impl)
    buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    if impl == "reference":
        values = entropy.decode_reference(buf, layout, n)
        if values_out is None:
            return values
        values_out[:] = values
        return values_out
    from . import cpu_huffman

    plan = entropy.parse_huffman(buf, layout, n)
    return cpu_huffman.decode_huffman(buf, plan, layout, values_out)
