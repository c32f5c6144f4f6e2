"""Numba kernels for the mode-1 chunk stream of ``blocks.py``.

The kernels run in parallel over groups of blocks (``prange``); every block finds its
input and output by a prefix sum, so no block waits for another. Kernels are built once
per float layout with its bit positions as compile-time constants, and the lane loops
use fixed shifts and uint8 arithmetic: that is what lets LLVM vectorize them (a generic
kernel with run-time shifts measured 10x slower). They trust their offsets: callers pass
only plans checked by ``blocks.parse_lanes``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .blocks import (
    BLOCK,
    EXCEPTION_BITS,
    HEADER,
    MODE_LANES,
    LanesPlan,
    sample_stride,
    choose_base,
    n_blocks,
)
from .planes import FloatLayout

__all__ = ["encode_lanes", "decode_lanes", "set_threads", "get_threads", "one_thread", "kernels"]

GROUP = 16  # blocks per parallel task: amortises the per-task scratch allocation
U8 = np.uint8
compile_lock = threading.Lock()


def set_threads(n: int) -> None:
    """Threads the kernels use (capped at the cores numba sees)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def get_threads() -> int:
    return numba.get_num_threads()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block inside on one core: numba kernels and BLAS (numpy's matmul) alike.

    Per-core throughputs are timed inside it. Without the BLAS limit, the matrix products of
    some KV stages (Hadamard rotation, SnapKV scores) quietly run on every core.
    """
    from threadpoolctl import threadpool_limits

    before = get_threads()
    set_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        set_threads(before)


# ----------------------------------------------------------------------------- lane loops
# Lane ``l{bits}`` of a block holds BLOCK*bits/8 bytes; byte j carries values j, j+L, j+2L...
# (L = the lane length), so each statement below is a contiguous vector operation.


@njit(inline="always")
def _unpack_l4(buf, at, sym, s):
    for j in range(128):
        x = buf[at + j]
        sym[j] |= (x & U8(15)) << s
        sym[j + 128] |= (x >> U8(4)) << s


@njit(inline="always")
def _unpack_l2(buf, at, sym, s):
    for j in range(64):
        x = buf[at + j]
        sym[j] |= (x & U8(3)) << s
        sym[j + 64] |= ((x >> U8(2)) & U8(3)) << s
        sym[j + 128] |= ((x >> U8(4)) & U8(3)) << s
        sym[j + 192] |= (x >> U8(6)) << s


@njit(inline="always")
def _unpack_l1(buf, at, sym, s):
    for j in range(32):
        x = buf[at + j]
        sym[j] |= (x & U8(1)) << s
        sym[j + 32] |= ((x >> U8(1)) & U8(1)) << s
        sym[j + 64] |= ((x >> U8(2)) & U8(1)) << s
        sym[j + 96] |= ((x >> U8(3)) & U8(1)) << s
        sym[j + 128] |= ((x >> U8(4)) & U8(1)) << s
        sym[j + 160] |= ((x >> U8(5)) & U8(1)) << s
        sym[j + 192] |= ((x >> U8(6)) & U8(1)) << s
        sym[j + 224] |= (x >> U8(7)) << s


@njit(inline="always")
def _unpack(buf, at, width, sym):
    if width == 8:
        for j in range(BLOCK):
            sym[j] = buf[at + j]
        return
    for j in range(BLOCK):
        sym[j] = 0
    if width == 1:
        _unpack_l1(buf, at, sym, U8(0))
    elif width == 2:
        _unpack_l2(buf, at, sym, U8(0))
    elif width == 3:
        _unpack_l2(buf, at, sym, U8(0))
        _unpack_l1(buf, at + 64, sym, U8(2))
    elif width == 4:
        _unpack_l4(buf, at, sym, U8(0))
    elif width == 5:
        _unpack_l4(buf, at, sym, U8(0))
        _unpack_l1(buf, at + 128, sym, U8(4))
    elif width == 6:
        _unpack_l4(buf, at, sym, U8(0))
        _unpack_l2(buf, at + 128, sym, U8(4))
    elif width == 7:
        _unpack_l4(buf, at, sym, U8(0))
        _unpack_l2(buf, at + 128, sym, U8(4))
        _unpack_l1(buf, at + 192, sym, U8(6))


@njit(inline="always")
def _pack_l4(sym, s, out, at):
    for j in range(128):
        out[at + j] = ((sym[j] >> s) & U8(15)) | (((sym[j + 128] >> s) & U8(15)) << U8(4))


@njit(inline="always")
def _pack_l2(sym, s, out, at):
    for j in range(64):
        out[at + j] = (
            ((sym[j] >> s) & U8(3))
            | (((sym[j + 64] >> s) & U8(3)) << U8(2))
            | (((sym[j + 128] >> s) & U8(3)) << U8(4))
            | (((sym[j + 192] >> s) & U8(3)) << U8(6))
        )


@njit(inline="always")
def _pack_l1(sym, s, out, at):
    for j in range(32):
        out[at + j] = (
            ((sym[j] >> s) & U8(1))
            | (((sym[j + 32] >> s) & U8(1)) << U8(1))
            | (((sym[j + 64] >> s) & U8(1)) << U8(2))
            | (((sym[j + 96] >> s) & U8(1)) << U8(3))
            | (((sym[j + 128] >> s) & U8(1)) << U8(4))
            | (((sym[j + 160] >> s) & U8(1)) << U8(5))
            | (((sym[j + 192] >> s) & U8(1)) << U8(6))
            | (((sym[j + 224] >> s) & U8(1)) << U8(7))
        )


@njit(inline="always")
def _pack(sym, width, out, at):
    if width == 8:
        for j in range(BLOCK):
            out[at + j] = sym[j]
    elif width == 1:
        _pack_l1(sym, U8(0), out, at)
    elif width == 2:
        _pack_l2(sym, U8(0), out, at)
    elif width == 3:
        _pack_l2(sym, U8(0), out, at)
        _pack_l1(sym, U8(2), out, at + 64)
    elif width == 4:
        _pack_l4(sym, U8(0), out, at)
    elif width == 5:
        _pack_l4(sym, U8(0), out, at)
        _pack_l1(sym, U8(4), out, at + 128)
    elif width == 6:
        _pack_l4(sym, U8(0), out, at)
        _pack_l2(sym, U8(4), out, at + 128)
    elif width == 7:
        _pack_l4(sym, U8(0), out, at)
        _pack_l2(sym, U8(4), out, at + 128)
        _pack_l1(sym, U8(6), out, at + 192)


# ----------------------------------------------------------------------------- per-layout kernels

REPEAT = np.uint64(0x0101010101010101)
REPEAT16 = np.uint64(0x0001000100010001)
LOW_BYTES = np.uint64(0x00FF00FF00FF00FF)
DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
DEBRUIJN_BIT = np.zeros(64, dtype=np.int64)
for _bit in range(64):
    DEBRUIJN_BIT[(((1 << _bit) * int(DEBRUIJN)) & (2**64 - 1)) >> 58] = _bit


class Kernels:
    """The compiled kernels of one float layout."""

    def __init__(self, encode_blocks, decode_blocks, group: int):
        self.encode_blocks = encode_blocks
        self.decode_blocks = decode_blocks
        self.group = group


@njit(nogil=True, cache=True)
def _compact(out, codes_at, group, seg_codes, seg_exc, exc_scratch, exc_pos_at, exc_val_at):
    """Close the gaps between the tasks' code runs and append the exceptions, in block order."""
    half = exc_scratch.size // 2
    dst = codes_at
    for g in range(seg_codes.size):
        src = codes_at + g * group * BLOCK
        size = seg_codes[g]
        if src != dst:  # the first run (all of a serial encode) is already in place
            out[dst : dst + size] = out[src : src + size].copy()  # runs may overlap: copy first
        dst += size
    k = 0
    for g in range(seg_exc.size):
        src = g * group * BLOCK
        for i in range(seg_exc[g]):
            out[exc_pos_at + k] = exc_scratch[src + i]
            out[exc_val_at + k] = exc_scratch[half + src + i]
            k += 1


@njit(nogil=True, cache=True)
def _sampled_histogram(values, man_bits, exp_mask, stride, hist):
    for i in range(0, values.size, stride):
        hist[(values[i] >> man_bits) & exp_mask] += 1


@njit(inline="always")
def _count_above(codes, limit, acc, acc_words):
    """Number of codes above ``limit``, kept in byte lanes so that the loop vectorizes."""
    for j in range(64):
        acc[j] = U8(codes[j] > limit) + U8(codes[j + 64] > limit) + U8(codes[j + 128] > limit) + U8(codes[j + 192] > limit)
    total = np.uint64(0)
    for q in range(8):
        total += acc_words[q]  # each byte <= 32
    pairs = (total & LOW_BYTES) + ((total >> np.uint64(8)) & LOW_BYTES)  # 16-bit lanes <= 64
    return np.int64((pairs * REPEAT16) >> np.uint64(48))


@njit(inline="always")
def _choose_width(codes, exp_bits, acc, acc_words):
    """cost(w) = BLOCK*w + EXCEPTION_BITS*#(codes >= 2**w); ties go to the smaller w.

    Widths are tried upwards and the search stops once ``BLOCK*w`` alone reaches the best
    cost, since no wider block can then be cheaper: the same choice as trying all widths,
    in about half the counting passes on weights.
    """
    best_w, best_cost, best_exc = exp_bits, 1 << 30, 0
    for w in range(exp_bits + 1):
        if BLOCK * w >= best_cost:
            break
        count = _count_above(codes, U8((1 << w) - 1), acc, acc_words) if w < exp_bits else 0
        cost = BLOCK * w + EXCEPTION_BITS * count
        if count <= 255 and cost < best_cost:  # strict: ties keep the smaller width
            best_w, best_cost, best_exc = w, cost, count
    return best_w, best_exc


class LayoutConstants(NamedTuple):
    """A layout's bit positions as typed scalars, for kernels to capture as compile-time constants."""

    UT: type  # the unsigned word type
    EXP_MASK: Any
    MAN: Any
    MAN_MASK: Any
    SIGN: Any
    REM_SHIFT: Any
    REM: Any
    REM_MASK: Any
    CLEAR_EXP: Any
    RB: int


def layout_constants(bits: int, exp_bits: int, man_bits: int, raw_bytes: int, rem_bits: int) -> LayoutConstants:
    UT = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32  # narrowed layouts: 13 bits in a u16
    return LayoutConstants(
        UT=UT,
        EXP_MASK=UT((1 << exp_bits) - 1),
        MAN=UT(man_bits),
        MAN_MASK=UT((1 << man_bits) - 1),
        SIGN=UT(bits - 1),
        REM_SHIFT=UT(8 * raw_bytes),
        REM=U8(rem_bits),
        REM_MASK=U8((1 << rem_bits) - 1),
        CLEAR_EXP=UT(~(((1 << exp_bits) - 1) << man_bits) & ((1 << bits) - 1)),
        RB=raw_bytes,
    )


@functools.cache
def _build(bits: int, exp_bits: int, man_bits: int, raw_bytes: int, rem_bits: int) -> tuple[Kernels, Kernels]:
    # Unpacked into locals: numba captures closure values, not attribute lookups, as constants.
    UT, EXP_MASK, MAN, MAN_MASK, SIGN, REM_SHIFT, REM, REM_MASK, CLEAR_EXP, RB = layout_constants(
        bits, exp_bits, man_bits, raw_bytes, rem_bits
    )

    def variant(PARALLEL: bool) -> Kernels:
        # Blocks per task: the serial build runs all blocks as one task. G also tells the two
        # builds apart in numba's on-disk cache, which is keyed by closure values, not flags.
        G = GROUP if PARALLEL else 1 << 40
        @njit(parallel=PARALLEL, nogil=True, cache=True)
        def encode_blocks(values, base, widths, n_exc, codes_at, planes_at, out, exc_scratch, seg_codes, seg_exc):
            """Code every block. Task ``g`` packs its blocks contiguously from ``codes_at +
            g*G*BLOCK`` in ``out`` and its exceptions from ``g*G*BLOCK`` in ``exc_scratch``
            (positions, then exponents half the array further); :func:`_compact` closes the gaps."""
            n = values.size
            nb = widths.size
            b = UT(base)
            half = exc_scratch.size // 2
            for g in prange((nb + G - 1) // G):
                code_at = codes_at + g * G * BLOCK
                exc_at = g * G * BLOCK
                codes = np.empty(BLOCK, dtype=np.uint8)
                sym = np.empty(BLOCK, dtype=np.uint8)
                words = codes.view(np.uint64)
                acc = np.empty(64, dtype=np.uint8)
                acc_words = acc.view(np.uint64)
                for blk in range(g * G, min(nb, (g + 1) * G)):
                    start = blk * BLOCK
                    count = min(BLOCK, n - start)
                    # Exponent codes into ``codes``, rem bits into ``sym``, raw bytes into the planes.
                    v = values[start : start + count]
                    c = codes[:count]
                    r = sym[:count]
                    for i in range(count):
                        c[i] = U8(((v[i] >> MAN) - b) & EXP_MASK)
                    for i in range(count, BLOCK):
                        codes[i] = 0
                        sym[i] = 0
                    if RB == 0:
                        for i in range(count):
                            raw = (v[i] & MAN_MASK) | ((v[i] >> SIGN) << MAN)
                            r[i] = U8(raw) & REM_MASK
                    elif RB == 1:
                        p0 = out[planes_at + start : planes_at + start + count]
                        for i in range(count):
                            raw = (v[i] & MAN_MASK) | ((v[i] >> SIGN) << MAN)
                            p0[i] = U8(raw & UT(0xFF))
                            r[i] = U8(raw >> REM_SHIFT) & REM_MASK
                    else:
                        p0 = out[planes_at + start : planes_at + start + count]
                        p1 = out[planes_at + n + start : planes_at + n + start + count]
                        p2 = out[planes_at + (RB - 1) * n + start : planes_at + (RB - 1) * n + start + count]  # RB 2: unused
                        for i in range(count):
                            raw = (v[i] & MAN_MASK) | ((v[i] >> SIGN) << MAN)
                            p0[i] = U8(raw & UT(0xFF))
                            p1[i] = U8((raw >> UT(8)) & UT(0xFF))
                            if RB == 3:
                                p2[i] = U8((raw >> UT(16)) & UT(0xFF))
                            r[i] = U8(raw >> REM_SHIFT) & REM_MASK
                    w, n_e = _choose_width(codes, exp_bits, acc, acc_words)
                    widths[blk] = w
                    n_exc[blk] = n_e
                    limit = U8((1 << w) - 1)
                    for i in range(BLOCK):
                        sym[i] |= min(codes[i], limit) << REM
                    _pack(sym, w + rem_bits, out, code_at)
                    code_at += (w + rem_bits) * (BLOCK // 8)
                    if n_e:
                        # Exceptions are rare: test 8 codes at a time for a byte above ``limit``.
                        above = (np.uint64(0xFF) ^ np.uint64(limit)) * REPEAT
                        for q in range(BLOCK // 8):
                            hits = words[q] & above
                            while hits:
                                # byte index of the lowest set bit (de Bruijn multiply, no branch per byte)
                                low = hits & (~hits + np.uint64(1))
                                i = 8 * q + (DEBRUIJN_BIT[(low * DEBRUIJN) >> np.uint64(58)] >> 3)
                                hits &= ~(np.uint64(0xFF) << np.uint64(8 * (i - 8 * q)))
                                exc_scratch[exc_at] = i
                                exc_scratch[half + exc_at] = U8((values[start + i] >> MAN) & EXP_MASK)
                                exc_at += 1
                seg_codes[g] = code_at - (codes_at + g * G * BLOCK)
                seg_exc[g] = exc_at - g * G * BLOCK

        @njit(parallel=PARALLEL, nogil=True, cache=True)
        def decode_blocks(buf, base, widths, code_offsets, exc_offsets, exc_pos_at, exc_val_at, planes_at, out):
            n = out.size
            nb = widths.size
            b = U8(base)
            for g in prange((nb + G - 1) // G):
                sym = np.empty(BLOCK, dtype=np.uint8)
                for blk in range(g * G, min(nb, (g + 1) * G)):
                    start = blk * BLOCK
                    count = min(BLOCK, n - start)
                    _unpack(buf, code_offsets[blk], widths[blk] + rem_bits, sym)
                    o = out[start : start + count]
                    if RB == 0:
                        for i in range(count):
                            s = sym[i]
                            raw = UT(s & REM_MASK)
                            e = UT(((s >> REM) + b) & U8(EXP_MASK))
                            o[i] = ((raw >> MAN) << SIGN) | (e << MAN) | (raw & MAN_MASK)
                    elif RB == 1:
                        p0 = buf[planes_at + start : planes_at + start + count]
                        for i in range(count):
                            s = sym[i]
                            raw = UT(p0[i]) | (UT(s & REM_MASK) << REM_SHIFT)
                            e = UT(((s >> REM) + b) & U8(EXP_MASK))
                            o[i] = ((raw >> MAN) << SIGN) | (e << MAN) | (raw & MAN_MASK)
                    else:
                        p0 = buf[planes_at + start : planes_at + start + count]
                        p1 = buf[planes_at + n + start : planes_at + n + start + count]
                        p2 = buf[planes_at + (RB - 1) * n + start : planes_at + (RB - 1) * n + start + count]  # RB 2: unused
                        for i in range(count):
                            s = sym[i]
                            raw = UT(p0[i]) | (UT(p1[i]) << UT(8)) | (UT(s & REM_MASK) << REM_SHIFT)
                            if RB == 3:
                                raw |= UT(p2[i]) << UT(16)
                            e = UT(((s >> REM) + b) & U8(EXP_MASK))
                            o[i] = ((raw >> MAN) << SIGN) | (e << MAN) | (raw & MAN_MASK)
                    for k in range(exc_offsets[blk], exc_offsets[blk + 1]):
                        i = buf[exc_pos_at + k]
                        o[i] = (o[i] & CLEAR_EXP) | (UT(buf[exc_val_at + k]) << MAN)


        return Kernels(encode_blocks, decode_blocks, G)

    return variant(True), variant(False)


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A per-thread scratch buffer, kept between chunks so that pages fault in only once."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.size < size:
        buf = _local.scratch = np.empty(size, dtype=np.uint8)
    return buf[:size]


SERIAL_BELOW = 64  # blocks; smaller chunks cost more to hand to threads than to code


def kernels(layout: FloatLayout, n_blocks: int = 0) -> Kernels:
    """The kernels for a layout: the parallel build for big chunks, the serial one otherwise."""
    with compile_lock:  # numba compiles once per layout; concurrent first calls would race
        parallel, serial = _build(layout.bits, layout.exp_bits, layout.man_bits, layout.raw_bytes, layout.rem_bits)
    return parallel if n_blocks >= SERIAL_BELOW and numba.get_num_threads() > 1 else serial


# ----------------------------------------------------------------------------- entry points


def encode_lanes(values: np.ndarray, layout: FloatLayout) -> np.ndarray:
    """Mode-1 encoder; byte-identical to ``blocks.encode_lanes``. Returns a uint8 array."""
    values = np.ascontiguousarray(values).reshape(-1).view(layout.uint)
    n = values.size
    nb = n_blocks(n)
    k = kernels(layout, nb)
    hist = np.zeros(1 << layout.exp_bits, dtype=np.int64)
    _sampled_histogram(values, layout.man_bits, layout.exp_mask, sample_stride(n), hist)
    base = choose_base(hist, layout)
    widths = np.empty(nb, dtype=np.uint8)
    n_exc = np.empty(nb, dtype=np.uint8)
    planes_at = HEADER.size + 2 * nb
    codes_at = planes_at + layout.raw_bytes * n
    # A width is only chosen when it costs no more than the full exponent width, so a block's
    # codes and exceptions fit in BLOCK bytes: this bounds the chunk, and each task's run.
    out = np.empty(codes_at + nb * BLOCK, dtype=np.uint8)
    exc_scratch = _scratch(2 * nb * BLOCK)
    tasks = -(-nb // min(k.group, max(nb, 1)))
    seg_codes = np.zeros(tasks, dtype=np.int64)
    seg_exc = np.zeros(tasks, dtype=np.int64)
    k.encode_blocks(values, base, widths, n_exc, codes_at, planes_at, out, exc_scratch, seg_codes, seg_exc)
    exc_pos_at = codes_at + int(seg_codes.sum())
    total_exc = int(seg_exc.sum())
    _compact(out, codes_at, min(k.group, max(nb, 1)), seg_codes, seg_exc, exc_scratch, exc_pos_at, exc_pos_at + total_exc)
    out[: HEADER.size] = np.frombuffer(HEADER.pack(MODE_LANES, base, 0, 0, n, total_exc), dtype=np.uint8)
    out[HEADER.size : HEADER.size + nb] = widths
    out[HEADER.size + nb : planes_at] = n_exc
    return out[: exc_pos_at + 2 * total_exc]


def decode_lanes(buf: np.ndarray, plan: LanesPlan, layout: FloatLayout, out: np.ndarray | None = None) -> np.ndarray:
    """Mode-1 decoder over a plan checked by ``blocks.parse_lanes``; writes into ``out`` if given."""
    if out is None:
        out = np.empty(plan.n, dtype=layout.uint)
    kernels(layout, plan.widths.size).decode_blocks(buf, plan.base, plan.widths, plan.code_offsets, plan.exc_offsets,
                                  plan.exc_pos_at, plan.exc_val_at, plan.planes_at, out)  # fmt: skip
    return out
