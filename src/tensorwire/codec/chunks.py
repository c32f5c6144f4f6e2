"""One chunk of one tensor: pick the stream mode on encode, check and dispatch on decode.

A chunk stream starts with its mode byte (docs/FORMAT.md, "Chunk streams"):

* mode 0, stored: the bytes unchanged (other dtypes, or data that did not compress);
* mode 1, lanes: the fast ENEC stream of ``blocks.py``;
* mode 2, huffman: the high-ratio stream of ``entropy.py``;
* mode 3, narrow: values whose lowest mantissa bits are all zero (an f32 checkpoint upcast
  from bf16, an f16 one cast from bf16) shifted right and coded as a narrower float by
  mode 1 or 2, which then no longer stores the zeros as raw bits.

``impl="cpu"`` runs the numba kernels, ``impl="reference"`` the numpy reference; both
read and write the same bytes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import CorruptData, FormatError, Truncated
from . import blocks, entropy
from .planes import DTYPE_ITEMSIZE, FloatLayout, layout_for, narrow_shifts, narrowed

__all__ = ["LEVELS", "encode_chunk", "decode_chunk", "encode_huffman", "decode_huffman", "Impl", "Level"]

Level = Literal["fast", "max"]
Impl = Literal["cpu", "reference"]
LEVELS: tuple[str, ...] = ("fast", "max")
HUFFMAN_ALWAYS_ABOVE = 1 << 16  # values; larger chunks always take mode 2 at level "max"
NARROW_SAMPLE_STRIDE = 16  # mode 3's shift is chosen on every 16th value


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")


def _check_impl(impl: str) -> None:
    if impl not in ("cpu", "reference"):
        raise ValueError(f"unknown impl {impl!r}; expected 'cpu' or 'reference'")


def encode_chunk(data: np.ndarray, dtype: str, level: Level = "fast", impl: Impl = "cpu", narrow: bool = True) -> np.ndarray:
    """Encode the values of one chunk (any array whose bytes are the little-endian values).

    Returns the chunk stream as a uint8 array. Falls back to stored mode when the codec
    would not make the chunk smaller. ``narrow=False`` never writes mode 3, for formats
    whose readers predate it.
    """
    _check_level(level)
    layout = layout_for(dtype)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n = raw.size // DTYPE_ITEMSIZE[dtype]
    if layout is None or n == 0:
        return np.frombuffer(blocks.encode_raw(raw, n), dtype=np.uint8)
    values = raw.view(layout.uint)
    encoded = _encode_narrow(values, layout, level, impl) if narrow else None
    if encoded is None:
        encoded = _encode_float(values, layout, level, impl)
    if encoded.size >= raw.size + blocks.RAW_HEADER.size:
        return np.frombuffer(blocks.encode_raw(raw, n), dtype=np.uint8)
    return encoded


def _encode_narrow(values: np.ndarray, layout: FloatLayout, level: Level, impl: Impl) -> np.ndarray | None:
    """A mode-3 stream when dropping low mantissa bits pays, else None.

    The shift is the one that saves the most bits, ``shift * n`` less the cost of the values
    that have a set bit below it (exceptions: a u32 position and the whole word each), as
    estimated on every 16th value; exceptions are then found exactly. An f16 cast from bf16
    has 3 zero bits except in its subnormals, a few in ten thousand.
    """
    n = values.size
    shifts = narrow_shifts(layout)
    exception_bits = 32 + 8 * values.itemsize
    sample = values[::NARROW_SAMPLE_STRIDE]
    if not shifts or np.count_nonzero(sample[:1024] & ((1 << shifts[0]) - 1)) * exception_bits >= shifts[-1] * min(sample.size, 1024):
        return None  # most values have their lowest bit set: the common case, decided on 1024 values
    gains: dict[int, int] = {}
    for s in shifts:  # a larger shift has at least as many exceptions: stop once none can pay
        exceptions = int(np.count_nonzero(sample & ((1 << s) - 1))) * NARROW_SAMPLE_STRIDE
        if exceptions * exception_bits >= shifts[-1] * n:
            break
        gains[s] = s * n - exceptions * exception_bits
    if not gains or max(gains.values()) <= 0:
        return None
    shift = max(gains, key=gains.get)
    positions = np.flatnonzero(values & ((1 << shift) - 1)).astype("<u4")
    if shift * n <= positions.size * exception_bits:
        return None
    inner = narrowed(layout, shift)
    header = blocks.NARROW_HEADER.pack(blocks.MODE_NARROW, shift, 0, 0, n, positions.size)
    body = _encode_float(np.right_shift(values, shift).astype(inner.uint), inner, level, impl)
    head = np.frombuffer(header + positions.tobytes() + values[positions].astype(layout.uint).tobytes(), dtype=np.uint8)
    return np.concatenate([head, body])


def _encode_float(values: np.ndarray, layout: FloatLayout, level: Level, impl: Impl) -> np.ndarray:
    """Mode 1 or 2, whichever ``level`` asks for (``max``: the smaller of the two on small chunks)."""
    n = values.size
    encoded = _encode_lanes(values, layout, impl) if level == "fast" or n <= HUFFMAN_ALWAYS_ABOVE else None
    if level == "max":
        huffman = encode_huffman(values, layout, impl=impl)
        # Small chunks can lose to mode 1 (the code-length table is a fixed cost): keep the
        # smaller stream, so that "max" is never larger than "fast".
        if encoded is None or huffman.size < encoded.size:
            encoded = huffman
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
    if mode == blocks.MODE_NARROW:
        _decode_narrow(buf, layout, n, out.view(layout.uint), impl)
        return out
    _decode_float(buf, mode, layout, n, out.view(layout.uint), impl)
    return out


def _decode_narrow(buf: np.ndarray, layout: FloatLayout, n: int, values: np.ndarray, impl: Impl) -> None:
    """Check and decode a mode-3 stream into ``values``."""
    size = blocks.NARROW_HEADER.size
    if buf.size < size:
        raise Truncated(f"narrow chunk has {buf.size} bytes, fewer than its header; the file is truncated")
    _, shift, r0, r1, count, n_exceptions = blocks.NARROW_HEADER.unpack_from(buf[:size].tobytes())
    if r0 or r1:
        raise CorruptData("reserved bytes of a narrow chunk are not zero; the chunk is corrupt")
    if shift not in narrow_shifts(layout):
        raise CorruptData(f"a narrow {layout.name} chunk declares a shift of {shift} bits, which {layout.name} cannot use; the chunk is corrupt")
    if count != n:
        raise CorruptData(f"narrow chunk declares {count} values, the index expects {n}; the file is corrupt")
    if n_exceptions > n:
        raise CorruptData(f"narrow chunk declares {n_exceptions} exceptions for {n} values; the chunk is corrupt")
    words_at = size + 4 * n_exceptions
    body_at = words_at + layout.uint.itemsize * n_exceptions
    if buf.size <= body_at:
        raise Truncated(f"narrow chunk has {buf.size} bytes, its {n_exceptions} exceptions and a stream need more; the file is truncated")
    positions = buf[size:words_at].view("<u4").astype(np.int64)
    if n_exceptions and (positions[-1] >= n or np.any(np.diff(positions) <= 0)):
        raise CorruptData(f"narrow chunk's exception positions are not ascending below {n}; the chunk is corrupt")
    inner = narrowed(layout, shift)
    body = buf[body_at:]
    if body[0] not in (blocks.MODE_LANES, blocks.MODE_HUFFMAN):
        raise CorruptData(f"a narrow chunk must wrap a mode 1 or 2 stream, found mode {body[0]}; the chunk is corrupt")
    words = np.empty(n, dtype=inner.uint)
    _decode_float(body, body[0], inner, n, words, impl)
    exceptions = buf[words_at:body_at].view(layout.uint)
    if np.any((exceptions >> shift) != words[positions]):
        raise CorruptData("a narrow chunk's exception words disagree with its coded values; the chunk is corrupt")
    np.left_shift(words, shift, out=values, dtype=layout.uint)
    values[positions] = exceptions


def _decode_float(buf: np.ndarray, mode: int, layout: FloatLayout, n: int, values: np.ndarray, impl: Impl) -> None:
    """Decode a mode 1 or 2 stream of ``layout`` into ``values`` (raises for other modes)."""
    if mode == blocks.MODE_LANES:
        plan = blocks.parse_lanes(buf, layout, n)
        if impl == "cpu":
            from . import cpu

            cpu.decode_lanes(buf, plan, layout, values)
        else:
            values[:] = blocks.decode_lanes(buf, layout, n)
        return
    if mode == blocks.MODE_HUFFMAN:
        decode_huffman(buf, layout, n, values, impl=impl)
        return
    raise FormatError(
        f"unknown chunk mode {mode}; this build knows modes 0-3. The file may come from a newer "
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
