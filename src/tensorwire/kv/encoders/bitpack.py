"""Bit packing of quantized codes: ``bits`` bits per value, LSB-first, as numba kernels.

The packed stream of ``n`` codes of ``b`` bits is one contiguous little-endian bitstream:
value ``i`` occupies bits ``[i*b, (i+1)*b)``, where bit ``k`` of the stream is bit
``k % 8`` of byte ``k // 8``; the stream is padded with zero bits to a whole byte, so it
is exactly ``ceil(n*b / 8)`` bytes. For ``b = 1`` this is
``numpy.packbits(codes, bitorder="little")``; for ``b = 8`` the bytes themselves.

Every group of 8 values fills exactly ``b`` whole bytes, whatever ``b`` is. The kernels
work on such groups, with ``b`` a compile-time constant: the loops over the 8 values and
the ``b`` bytes of a group are fully unrolled and every shift is a constant, so each
width gets the straight-line code one would write by hand for 1, 2, 4 (whole values per
byte), 3 and 6 (8 values in 3 bytes, 4 values in 3 bytes) and 5 and 7, and LLVM
vectorizes all of them. One template instead of seven hand-written kernel pairs, and as
fast as the hand-written ones we measured first: on a 393k-code plane, one thread of the
project's shared 2-core VM, 5.8-8.2 GB/s of codes packed and 9.9-19 GB/s unpacked for
widths 1-7 (``benchmarks/kv/encoder_speed.py``). A kernel with the width as a run-time
argument measured 3-10x slower.

Kernels are compiled on first use of a width (explicit signatures, cached on disk by
numba), so a process that only ever packs 2- and 4-bit codes compiles 4 kernels.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import NamedTuple

import numpy as np

from ...errors import CorruptData, Truncated

__all__ = ["check_codes", "pack", "packed_size", "unpack"]

_compile_lock = threading.Lock()


def packed_size(n: int, bits: int) -> int:
    """Bytes of ``n`` codes packed at ``bits`` bits each: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


class _Kernels(NamedTuple):
    pack: object
    unpack: object


@cache
def _build(bits: int) -> _Kernels:
    """Pack and unpack kernels for one width (1..7), with the width baked in as a constant."""
    import numba
    from numba import types

    B = bits
    MASK = (1 << bits) - 1
    readonly = types.Array(types.uint8, 1, "C", readonly=True)
    writable = types.Array(types.uint8, 1, "C")
    signature = types.void(readonly, writable)

    # Byte k of a group holds bits [8k, 8k+8) of the group's 8*B bits; value j holds bits
    # [B*j, B*j+B). ``lo = B*j - 8*k`` is where value j starts relative to byte k: they
    # overlap when -B < lo < 8. All of it folds to constants once the loops are unrolled.
    @numba.njit(signature, nogil=True, cache=True)
    def pack(codes, out):  # pragma: no cover - compiled
        for g in range(codes.size // 8):
            for k in range(B):
                byte = 0
                for j in range(8):
                    lo = B * j - 8 * k
                    if -B < lo < 8:
                        if lo >= 0:
                            byte |= np.int32(codes[8 * g + j]) << lo
                        else:
                            byte |= np.int32(codes[8 * g + j]) >> -lo
                out[B * g + k] = np.uint8(byte & 255)

    @numba.njit(signature, nogil=True, cache=True)
    def unpack(buf, out):  # pragma: no cover - compiled
        for g in range(out.size // 8):
            for j in range(8):
                value = 0
                for k in range(B):
                    lo = B * j - 8 * k
                    if -B < lo < 8:
                        if lo >= 0:
                            value |= np.int32(buf[B * g + k]) >> lo
                        else:
                            value |= np.int32(buf[B * g + k]) << -lo
                out[8 * g + j] = np.uint8(value & MASK)

    return _Kernels(pack, unpack)


def _kernels(bits: int) -> _Kernels:
    with _compile_lock:  # two threads' first calls would otherwise compile the same width twice
        return _build(bits)


def _readonly(array: np.ndarray) -> np.ndarray:
    # The kernels take read-only input (one compiled signature for bytes and for arrays alike).
    view = array.view()
    view.flags.writeable = False
    return view


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise CorruptData(f"codes are packed at 1..8 bits per value, got bits={bits!r}")


def check_codes(codes: np.ndarray, bits: int) -> None:
    """Raise :class:`CorruptData` unless every uint8 code is ``< 2**bits``."""
    if bits < 8 and codes.size and int(codes.max()) >> bits:
        flat = codes.reshape(-1)
        where = int(np.flatnonzero(flat >> bits)[0])
        raise CorruptData(
            f"code {int(flat[where])} at flat index {where} does not fit in {bits} bits (expected < {1 << bits}); "
            "the quantizer produced an out-of-range code"
        )


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes, each ``< 2**bits``, into ``ceil(n * bits / 8)`` bytes.

    Parameters
    ----------
    codes : numpy.ndarray
        uint8 codes of any shape (packed in C order).
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    numpy.ndarray
        The packed stream as a 1-D uint8 array.

    Raises
    ------
    CorruptData
        A code is ``>= 2**bits`` (it would not survive the round trip).

    Examples
    --------
    >>> import numpy as np
    >>> pack(np.array([1, 2, 3], np.uint8), 2).tolist()  # 0b11_10_01
    [57]
    """
    _check_bits(bits)
    if codes.dtype != np.uint8:
        raise CorruptData(f"codes must be uint8, got {codes.dtype}")
    flat = np.ascontiguousarray(codes).reshape(-1)
    n = flat.size
    check_codes(flat, bits)
    if bits == 8:
        return flat.copy()
    out = np.empty(packed_size(n, bits), dtype=np.uint8)
    kernels = _kernels(bits)
    full = n // 8 * 8
    if full:
        kernels.pack(_readonly(flat[:full]), out[: full // 8 * bits])
    if full < n:  # the last, partial group: pad with zero codes, keep the bytes it reaches
        group = np.zeros(8, dtype=np.uint8)
        group[: n - full] = flat[full:]
        packed = np.empty(bits, dtype=np.uint8)
        kernels.pack(_readonly(group), packed)
        out[full // 8 * bits :] = packed[: out.size - full // 8 * bits]
    return out


def unpack(buf, bits: int, n: int) -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits from a stream written by :func:`pack`.

    The stream must be exactly ``ceil(n * bits / 8)`` bytes and its padding bits zero;
    any other content is a valid stream (every bit pattern is some codes ``< 2**bits``),
    so a flipped bit changes a value and is caught only by the payload's checksum.

    Parameters
    ----------
    buf : bytes-like or numpy.ndarray
        The packed stream.
    bits : int
        Bits per code, 1..8.
    n : int
        Number of codes.

    Returns
    -------
    numpy.ndarray
        ``n`` uint8 codes (1-D, writable).

    Raises
    ------
    Truncated
        The stream is shorter than ``n`` codes need.
    CorruptData
        The stream is longer than that, or its padding bits are not zero.
    """
    _check_bits(bits)
    data = buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    expected = packed_size(n, bits)
    if data.size != expected:
        kind = Truncated if data.size < expected else CorruptData
        raise kind(
            f"a stream of {n} codes at {bits} bits is {expected} bytes, found {data.size}; "
            "the payload is damaged or was written for another shape"
        )
    if bits == 8:
        return data.copy()
    tail_bits = (n * bits) % 8
    if tail_bits and int(data[-1]) >> tail_bits:
        raise CorruptData(
            f"padding bits of the last byte are {int(data[-1]) >> tail_bits:#x}, expected 0; the stream is corrupt"
        )
    out = np.empty(n, dtype=np.uint8)
    kernels = _kernels(bits)
    full = n // 8 * 8
    if full:
        kernels.unpack(_readonly(data[: full // 8 * bits]), out[:full])
    if full < n:
        group = np.zeros(bits, dtype=np.uint8)
        rest = data[full // 8 * bits :]
        group[: rest.size] = rest
        values = np.empty(8, dtype=np.uint8)
        kernels.unpack(_readonly(group), values)
        out[full:] = values[: n - full]
    return out
