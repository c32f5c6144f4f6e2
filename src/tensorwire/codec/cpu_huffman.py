"""Numba kernels for the mode-2 (huffman) chunk stream of ``entropy.py``.

Encoding takes three passes over groups of blocks: split the values into symbols, byte
planes and a histogram; sum each block's code bits (a gather from the length table);
then, after a prefix sum of the block sizes, write every block's bitstream at its offset.

Decoding runs four blocks in lockstep, so that four independent load-lookup-shift chains
overlap, and looks up up to three codes at once in a 12-bit table built per chunk: on
real exponents (2.7 bits a symbol) that is about 2.5 symbols a lookup.

Each kernel comes in a parallel build (``prange`` over groups of blocks) and a serial
one, picked per chunk as in ``cpu.py``. The kernels trust their inputs: the decoder only
runs on plans checked by ``entropy.parse_huffman``, and it keeps every read inside the
buffer even when the bits are corrupt. Its per-block checks are those of
``entropy.check_blocks``, which names the first bad block when one fails.

Indices inside the hot loops are uint64 on purpose: numba wraps negative signed indices,
and that select on every access kept LLVM from merging byte loads into one load.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import CorruptData
from .blocks import BLOCK, MODE_HUFFMAN, n_blocks
from .cpu import compile_lock, layout_constants
from .entropy import (
    HEADER,
    MAX_BLOCK_BYTES,
    PADDING,
    SIZE_DTYPE,
    HuffmanPlan,
    _check_alphabet,
    alphabet_size,
    canonical_codes,
    check_blocks,
    huffman_lengths,
)
from .planes import FloatLayout

__all__ = ["encode_huffman", "decode_huffman", "decode_tables", "kernels", "SERIAL_BELOW"]

GROUP = 16  # blocks per parallel task, a multiple of the decoder's 4 lockstep blocks
SERIAL_BELOW = 64  # blocks; smaller chunks cost more to hand to threads than to code
U8 = np.uint8
U32 = np.uint32
U64 = np.uint64

# The decoder peeks PEEK_BITS bits and finds up to MULTI whole codes in them.
PEEK_BITS = 12  # = MAX_CODE_BITS, so the first code always fits in the peek
PEEK_MASK = U64((1 << PEEK_BITS) - 1)
MULTI = 3  # symbols per multi-code entry: three bytes of a uint32
SLOT = BLOCK + 16  # one block's symbols in the decoder's scratch, plus room for a 4-byte store
# A block decoder loads 8 bytes from the byte holding its next unread bit. While symbols
# remain, at most (BLOCK - 1) * MAX_CODE_BITS bits were read, so that byte lies within the
# first MAX_BLOCK_BYTES of the block, and every load within BLOCK_READ_SPAN bytes.
BLOCK_READ_SPAN = MAX_BLOCK_BYTES + 8


# ----------------------------------------------------------------------------- memory access


def _unaligned_store(bits: int):
    """An intrinsic ``store(arr, index, value)``: ``value`` as ``bits // 8`` little-endian
    bytes at ``arr[index]`` of a uint8 array, any alignment, no bounds check.

    One store instruction, where LLVM does not merge numba's byte stores of a shifted word.
    """
    word_type = {32: types.uint32, 64: types.uint64}[bits]

    @intrinsic
    def store(typingctx, arr, index, value):
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(index, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            array, i, v = args
            data = context.make_array(signature.args[0])(context, builder, array).data
            i = context.cast(builder, i, signature.args[1], types.intp)
            word = context.cast(builder, v, signature.args[2], word_type)
            target = builder.bitcast(builder.gep(data, [i]), ir.IntType(bits).as_pointer())
            builder.store(word, target, align=1)
            return context.get_dummy_value()

        return types.void(arr, index, value), codegen

    return store


_store32 = _unaligned_store(32)
_store64 = _unaligned_store(64)


@njit(nogil=True)
def _load64(buf, i):
    """Little-endian 8 bytes at ``i`` (LLVM combines the byte loads into one load)."""
    return (
        U64(buf[i])
        | (U64(buf[i + U64(1)]) << U64(8))
        | (U64(buf[i + U64(2)]) << U64(16))
        | (U64(buf[i + U64(3)]) << U64(24))
        | (U64(buf[i + U64(4)]) << U64(32))
        | (U64(buf[i + U64(5)]) << U64(40))
        | (U64(buf[i + U64(6)]) << U64(48))
        | (U64(buf[i + U64(7)]) << U64(56))
    )


@njit(nogil=True)
def _peek(buf, at, pos):
    """The bits of the block at byte ``at`` from its bit ``pos`` on, first bit lowest; the
    low 57 or more are the stream's."""
    return _load64(buf, at + (pos >> U64(3))) >> (pos & U64(7))


# ----------------------------------------------------------------------------- decode tables


@njit(nogil=True, cache=True)
def decode_tables(lengths, table_bits):
    """The single-code and the multi-code decode table of a checked code.

    ``table`` equals ``entropy.decode_table`` (entry ``symbol | length << 8`` for each
    ``table_bits``-bit peek). Canonical codes are assigned as in DEFLATE (RFC 1951,
    3.2.2), which gives the codes of ``entropy.canonical_codes``.

    ``multi`` entry ``peek`` (PEEK_BITS bits) is ``s1 | s2 << 8 | s3 << 16 | bits << 24 |
    count << 28``: the ``count`` (1..3) codes that lie wholly inside the peek, decoded one
    after the other, and the ``bits`` they use together. The stream stores only code
    lengths; this table is the decoder's own.

    Parameters
    ----------
    lengths : numpy.ndarray
        uint8 code length per symbol: a complete code (checked by ``parse_huffman``).
    table_bits : int
        Longest code length, at most PEEK_BITS.

    Returns
    -------
    table : numpy.ndarray
        uint16, ``2**table_bits`` entries.
    multi : numpy.ndarray
        uint32, ``2**PEEK_BITS`` entries.
    """
    per_length = np.zeros(PEEK_BITS + 1, dtype=np.int64)
    for s in range(lengths.size):
        per_length[lengths[s]] += 1
    per_length[0] = 0
    next_code = np.zeros(PEEK_BITS + 1, dtype=np.int64)
    code = 0
    for bits in range(1, PEEK_BITS + 1):
        code = (code + per_length[bits - 1]) << 1
        next_code[bits] = code
    table = np.zeros(1 << table_bits, dtype=np.uint16)
    for s in range(lengths.size):
        length = np.int64(lengths[s])
        if length == 0:
            continue
        code = next_code[length]
        next_code[length] += 1
        reversed_code = 0
        for k in range(length):  # first code bit lowest: the stream is LSB-first
            reversed_code |= ((code >> (length - 1 - k)) & 1) << k
        for j in range(reversed_code, 1 << table_bits, 1 << length):
            table[j] = np.uint16(s | (length << 8))

    low = U32((1 << table_bits) - 1)
    budget = U32(PEEK_BITS)
    multi = np.empty(1 << PEEK_BITS, dtype=np.uint32)
    for p in range(1 << PEEK_BITS):
        # Branch-free (MULTI = 3 codes): which codes fit is data-dependent, so a branch
        # would mispredict often.
        peek = U32(p)
        e1 = U32(table[peek & low])
        l1 = e1 >> U32(8)
        e2 = U32(table[(peek >> l1) & low])
        l2 = e2 >> U32(8)
        e3 = U32(table[(peek >> (l1 + l2)) & low])
        l3 = e3 >> U32(8)
        two = U32(l1 + l2 <= budget)
        three = two & U32(l1 + l2 + l3 <= budget)
        used = l1 + two * l2 + three * l3
        symbols = (e1 & U32(0xFF)) | ((two * (e2 & U32(0xFF))) << U32(8)) | ((three * (e3 & U32(0xFF))) << U32(16))
        multi[p] = symbols | (used << U32(24)) | ((U32(1) + two + three) << U32(28))
    return table, multi


# ----------------------------------------------------------------------------- decoder


@njit(nogil=True)
def _lookup(multi, sym, at, bits):
    """One multi-code lookup of the low PEEK_BITS of ``bits``.

    Stores the entry's four bytes at ``sym[at:]`` in one store: the first ``count`` are
    symbols, the rest is overwritten by the next lookup or lies past the block. Returns
    ``count`` (at least 1: every code fits in the peek, so the decoder always advances),
    the bits used, and ``bits`` past them.
    """
    e = multi[bits & PEEK_MASK]
    _store32(sym, at, e)
    used = U64((e >> U32(24)) & U32(15))
    return U64(e >> U32(28)), used, bits >> used


@njit(nogil=True)
def _lookup4(multi, sym, at, bits):
    """Four lookups from one peek (4 * 12 bits <= 57); returns symbols and bits used."""
    k0, u0, bits = _lookup(multi, sym, at, bits)
    k1, u1, bits = _lookup(multi, sym, at + k0, bits)
    k2, u2, bits = _lookup(multi, sym, at + k0 + k1, bits)
    k3, u3, bits = _lookup(multi, sym, at + k0 + k1 + k2, bits)
    return k0 + k1 + k2 + k3, u0 + u1 + u2 + u3


@njit(nogil=True)
def _finish(buf, at, pos, table, mask, multi, sym, sym_at, done, total):
    """Decode symbols ``done..total`` of the block at ``buf[at:]`` from its bit ``pos``.

    Multi-code lookups while a whole entry (three symbols) is still due, single codes for
    the last ones, so that the block ends exactly at its last symbol. Returns the bits
    consumed.

    Loads are clamped to the buffer. A valid block never needs the clamp (its bits end at
    least PADDING bytes before the buffer does); a corrupt one that reaches it has read
    past its own bytes, so its bit count fails ``_block_ok`` whatever it decoded.
    """
    last = U64(buf.size - 8)
    while done < total:
        bits = _load64(buf, min(at + (pos >> U64(3)), last)) >> (pos & U64(7))
        if done + U64(MULTI) <= total:
            k, used, bits = _lookup(multi, sym, sym_at + done, bits)
            done += k
        else:
            e = table[bits & mask]
            sym[sym_at + done] = U8(e & np.uint16(0xFF))
            used = U64(e >> np.uint16(8))
            done += U64(1)
        pos += used
    return pos


@njit(nogil=True)
def _decode_block(buf, at, total, table, mask, multi, sym, sym_at):
    """Decode one block of ``total`` symbols from ``buf[at:]`` into ``sym[sym_at:]``;
    returns the bits consumed."""
    return _finish(buf, U64(at), U64(0), table, mask, multi, sym, sym_at, U64(0), U64(total))


@njit(nogil=True)
def _decode_quad(buf, offsets, blk, table, mask, multi, sym, sym_at):
    """Decode four full blocks in lockstep into ``sym[sym_at + q*SLOT:]``; returns the bits
    each used.

    The lockstep part runs while every block has room for four more lookups of three
    symbols each; each block then finishes alone.
    """
    a0, a1, a2, a3 = U64(offsets[blk]), U64(offsets[blk + 1]), U64(offsets[blk + 2]), U64(offsets[blk + 3])
    s0, s1, s2, s3 = sym_at, sym_at + U64(SLOT), sym_at + U64(2 * SLOT), sym_at + U64(3 * SLOT)
    p0 = p1 = p2 = p3 = U64(0)  # bits consumed
    d0 = d1 = d2 = d3 = U64(0)  # symbols decoded
    while max(max(d0, d1), max(d2, d3)) <= U64(BLOCK - 4 * MULTI):
        k0, u0 = _lookup4(multi, sym, s0 + d0, _peek(buf, a0, p0))
        k1, u1 = _lookup4(multi, sym, s1 + d1, _peek(buf, a1, p1))
        k2, u2 = _lookup4(multi, sym, s2 + d2, _peek(buf, a2, p2))
        k3, u3 = _lookup4(multi, sym, s3 + d3, _peek(buf, a3, p3))
        d0 += k0
        d1 += k1
        d2 += k2
        d3 += k3
        p0 += u0
        p1 += u1
        p2 += u2
        p3 += u3
    end = U64(BLOCK)
    p0 = _finish(buf, a0, p0, table, mask, multi, sym, s0, d0, end)
    p1 = _finish(buf, a1, p1, table, mask, multi, sym, s1, d1, end)
    p2 = _finish(buf, a2, p2, table, mask, multi, sym, s2, d2, end)
    p3 = _finish(buf, a3, p3, table, mask, multi, sym, s3, d3, end)
    return p0, p1, p2, p3


@njit(nogil=True)
def _read_safe(offsets, blk, limit):
    """Whether a block's decoder stays inside ``limit`` bytes whatever its bits say, so
    that the lockstep loop may load without clamping."""
    return offsets[blk] + BLOCK_READ_SPAN <= limit


@njit(nogil=True)
def _block_ok(buf, offsets, blk, bits):
    """``entropy.check_blocks`` for one block: ``bits`` end in its last byte, zero-padded."""
    end = offsets[blk + 1]
    if (bits + 7) >> 3 != end - offsets[blk]:
        return False
    return bits & 7 == 0 or (buf[end - 1] >> U8(bits & 7)) == 0


@njit(nogil=True, cache=True)
def _decode_span(buf, table, table_bits, multi, offsets, n, first, stop, sym, consumed):
    """Decode blocks ``first..stop-1`` into ``sym[(b - first) * SLOT:]``.

    Four full blocks at a time in lockstep where their loads cannot leave the buffer,
    otherwise one at a time with clamped loads. ``consumed[b]`` gets the bits block ``b``
    used. Returns the number of blocks that fail ``entropy.check_blocks``, checked here
    while they are in cache.

    Not inlined: the layouts' kernels share this one compiled loop.
    """
    mask = U64((1 << table_bits) - 1)
    limit = buf.size
    blk = first
    while blk < stop:
        at = U64((blk - first) * SLOT)
        if blk + 4 <= stop and (blk + 4) * BLOCK <= n and _read_safe(offsets, blk + 3, limit):
            u0, u1, u2, u3 = _decode_quad(buf, offsets, blk, table, mask, multi, sym, at)
            consumed[blk], consumed[blk + 1], consumed[blk + 2], consumed[blk + 3] = u0, u1, u2, u3
            blk += 4
        else:
            count = min(BLOCK, n - blk * BLOCK)
            consumed[blk] = _decode_block(buf, offsets[blk], count, table, mask, multi, sym, at)
            blk += 1
    bad = 0
    for b in range(first, stop):
        bad += not _block_ok(buf, offsets, b, consumed[b])
    return bad


# ----------------------------------------------------------------------------- encoder


@njit(nogil=True)
def _count_symbols(sym, start, stop, local):
    """Add ``sym[start:stop]`` to the histogram ``local`` (4 rows, summed by the caller).

    Four sub-histograms: runs of one symbol (common for exponents) would otherwise
    serialise on a single counter.
    """
    i = start
    while i + 4 <= stop:
        local[0, sym[i]] += 1
        local[1, sym[i + 1]] += 1
        local[2, sym[i + 2]] += 1
        local[3, sym[i + 3]] += 1
        i += 4
    for k in range(i, stop):
        local[0, sym[k]] += 1


@njit(nogil=True)
def _put(code_word, s, acc, filled):
    """Append the code of symbol ``s`` above the ``filled`` bits of ``acc``."""
    w = code_word[s]
    return acc | (U64(w & U32(0xFFFF)) << filled), filled + U64(w >> U32(16))


@njit(nogil=True)
def _flush(scratch, o, acc, filled):
    """Store the bit buffer, keep only the bits of its last partial byte (no branch)."""
    _store64(scratch, o, acc)
    whole = filled & U64(~7 & 63)
    return o + (whole >> U64(3)), acc >> whole, filled & U64(7)


@njit(nogil=True)
def _write_block(sym, start, stop, code_word, scratch):
    """The bitstream of ``sym[start:stop]`` into ``scratch``, LSB-first.

    Four codes (48 bits at most) go into the bit buffer between flushes. The 8-byte
    flushes write past the block's last byte, hence the scratch: written in place, they
    could clobber the next block, which another thread may own.
    """
    acc = filled = o = U64(0)
    i = U64(start)
    stop = U64(stop)
    while i + U64(4) <= stop:
        acc, filled = _put(code_word, sym[i], acc, filled)
        acc, filled = _put(code_word, sym[i + U64(1)], acc, filled)
        acc, filled = _put(code_word, sym[i + U64(2)], acc, filled)
        acc, filled = _put(code_word, sym[i + U64(3)], acc, filled)
        o, acc, filled = _flush(scratch, o, acc, filled)
        i += U64(4)
    while i < stop:  # at most 3 codes: 7 + 36 bits still fit the buffer
        acc, filled = _put(code_word, sym[i], acc, filled)
        i += U64(1)
    _store64(scratch, o, acc)  # the last bits; the bytes past them are zero


# ----------------------------------------------------------------------------- kernel builds


class Kernels:
    """The compiled kernels of one float layout, parallel or serial build.

    ``group`` is the number of blocks per task; ``split_values`` writes one histogram row
    per group.
    """

    def __init__(self, group, split_values, block_bits, write_blocks, decode_blocks):
        self.group = group
        self.split_values = split_values
        self.block_bits = block_bits
        self.write_blocks = write_blocks
        self.decode_blocks = decode_blocks


def _group(parallel: bool) -> int:
    """Blocks per task. The serial build has no threads to balance, so it takes bigger
    groups (fewer calls; the decoder's symbol scratch, 64 * SLOT bytes, stays in cache).
    The different value also keeps the two builds apart in numba's on-disk cache, which
    is keyed by closure values, not by the ``parallel`` flag."""
    return GROUP if parallel else 4 * GROUP


@functools.cache
def _coding_passes(parallel: bool):
    """The layout-independent encoder passes: ``(block_bits, write_blocks)``."""
    G = _group(parallel)

    @njit(parallel=parallel, nogil=True, cache=True)
    def block_bits(sym, code_len, bits):
        """Pass 2: code bits of every block (a gather from the length table)."""
        n = sym.size
        nb = bits.size
        for g in prange((nb + G - 1) // G):
            for blk in range(g * G, min(nb, (g + 1) * G)):
                total = 0
                for i in range(blk * BLOCK, min(n, blk * BLOCK + BLOCK)):
                    total += code_len[sym[i]]
                bits[blk] = total

    @njit(parallel=parallel, nogil=True, cache=True)
    def write_blocks(sym, code_word, offsets, out):
        """Pass 3: each block's bitstream at its offset (``code_word``: reversed code |
        length << 16)."""
        n = sym.size
        nb = offsets.size - 1
        for g in prange((nb + G - 1) // G):
            scratch = np.zeros(MAX_BLOCK_BYTES + 8, dtype=np.uint8)
            for blk in range(g * G, min(nb, (g + 1) * G)):
                _write_block(sym, blk * BLOCK, min(n, blk * BLOCK + BLOCK), code_word, scratch)
                o = offsets[blk]
                for i in range(offsets[blk + 1] - o):  # a plain loop compiles far faster than a slice copy
                    out[o + i] = scratch[i]

    return block_bits, write_blocks


@functools.cache
def _build(bits: int, exp_bits: int, man_bits: int, raw_bytes: int, rem_bits: int) -> tuple[Kernels, Kernels]:
    UT, EXP_MASK, MAN, MAN_MASK, SIGN, REM_SHIFT, REM, REM_MASK, _, RB = layout_constants(
        bits, exp_bits, man_bits, raw_bytes, rem_bits
    )
    SYMBOLS = 1 << (exp_bits + rem_bits)

    def variant(parallel: bool) -> Kernels:
        G = _group(parallel)

        @njit(parallel=parallel, nogil=True, cache=True)
        def split_values(values, sym, planes_at, out, hist):
            """Pass 1: symbols, byte planes, and a histogram per group of blocks (``hist[g]``)."""
            n = values.size
            nb = (n + BLOCK - 1) // BLOCK
            for g in prange((nb + G - 1) // G):
                local = np.zeros((4, SYMBOLS), dtype=np.int32)
                for blk in range(g * G, min(nb, (g + 1) * G)):
                    start = blk * BLOCK
                    count = min(BLOCK, n - start)
                    # Symbols into ``sym``, raw bytes into the planes. Written out here: a
                    # per-layout helper would be a closure over another kernel, which
                    # defeats numba's on-disk cache.
                    v = values[start : start + count]
                    s = sym[start : start + count]
                    if RB == 0:
                        for i in range(count):
                            raw = (v[i] & MAN_MASK) | ((v[i] >> SIGN) << MAN)
                            s[i] = (U8((v[i] >> MAN) & EXP_MASK) << REM) | (U8(raw) & REM_MASK)
                    elif RB == 1:
                        p0 = out[planes_at + start : planes_at + start + count]
                        for i in range(count):
                            raw = (v[i] & MAN_MASK) | ((v[i] >> SIGN) << MAN)
                            p0[i] = U8(raw & UT(0xFF))
                            s[i] = (U8((v[i] >> MAN) & EXP_MASK) << REM) | (U8(raw >> REM_SHIFT) & REM_MASK)
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
                            s[i] = (U8((v[i] >> MAN) & EXP_MASK) << REM) | (U8(raw >> REM_SHIFT) & REM_MASK)
                    _count_symbols(sym, start, start + count, local)
                for c in range(SYMBOLS):
                    hist[g, c] = local[0, c] + local[1, c] + local[2, c] + local[3, c]

        @njit(parallel=parallel, nogil=True, cache=True)
        def decode_blocks(buf, table, table_bits, multi, offsets, planes_at, out, consumed):
            """Decode every block into ``out``; ``consumed[b]`` gets the bits block ``b`` used.

            Returns the number of blocks that fail ``entropy.check_blocks``.
            """
            n = out.size
            nb = offsets.size - 1
            bad = 0
            for g in prange((nb + G - 1) // G):
                sym = np.empty(G * SLOT, dtype=np.uint8)
                first = g * G
                stop = min(nb, first + G)
                bad += _decode_span(buf, table, table_bits, multi, offsets, n, first, stop, sym, consumed)
                # Words from symbols and byte planes, written out here as in split_values.
                for blk in range(first, stop):
                    start = blk * BLOCK
                    count = min(BLOCK, n - start)
                    o = out[start : start + count]
                    s = sym[(blk - first) * SLOT : (blk - first) * SLOT + count]
                    if RB == 0:
                        for i in range(count):
                            raw = UT(s[i] & REM_MASK)
                            o[i] = ((raw >> MAN) << SIGN) | (UT(s[i] >> REM) << MAN) | (raw & MAN_MASK)
                    elif RB == 1:
                        p0 = buf[planes_at + start : planes_at + start + count]
                        for i in range(count):
                            raw = UT(p0[i]) | (UT(s[i] & REM_MASK) << REM_SHIFT)
                            o[i] = ((raw >> MAN) << SIGN) | (UT(s[i] >> REM) << MAN) | (raw & MAN_MASK)
                    else:
                        p0 = buf[planes_at + start : planes_at + start + count]
                        p1 = buf[planes_at + n + start : planes_at + n + start + count]
                        p2 = buf[planes_at + (RB - 1) * n + start : planes_at + (RB - 1) * n + start + count]  # RB 2: unused
                        for i in range(count):
                            raw = UT(p0[i]) | (UT(p1[i]) << UT(8)) | (UT(s[i] & REM_MASK) << REM_SHIFT)
                            if RB == 3:
                                raw |= UT(p2[i]) << UT(16)
                            o[i] = ((raw >> MAN) << SIGN) | (UT(s[i] >> REM) << MAN) | (raw & MAN_MASK)
            return bad

        block_bits, write_blocks = _coding_passes(parallel)
        return Kernels(G, split_values, block_bits, write_blocks, decode_blocks)

    return variant(True), variant(False)


def kernels(layout: FloatLayout, n_blocks: int = 0) -> Kernels:
    """The kernels for a layout: the parallel build for big chunks, the serial one otherwise."""
    with compile_lock:  # numba compiles once per layout; concurrent first calls would race
        parallel, serial = _build(layout.bits, layout.exp_bits, layout.man_bits, layout.raw_bytes, layout.rem_bits)
    return parallel if n_blocks >= SERIAL_BELOW and numba.get_num_threads() > 1 else serial


_local = threading.local()


def _symbol_scratch(n: int) -> np.ndarray:
    """A per-thread buffer for a chunk's symbols, kept so that its pages fault in once."""
    buf = getattr(_local, "symbols", None)
    if buf is None or buf.size < n:
        buf = _local.symbols = np.empty(n, dtype=np.uint8)
    return buf[:n]


# ----------------------------------------------------------------------------- entry points


def encode_huffman(values: np.ndarray, layout: FloatLayout) -> np.ndarray:
    """Mode-2 encoder; byte-identical to ``entropy.encode_reference``.

    Parameters
    ----------
    values : numpy.ndarray
        Contiguous 1-d ``layout.uint`` words, at least one.
    layout : FloatLayout
        Their float layout.

    Returns
    -------
    numpy.ndarray
        uint8 chunk stream.
    """
    _check_alphabet(layout)
    n = values.size
    if n == 0:
        raise ValueError("mode 2 needs at least one value; store empty chunks (mode 0)")
    nb = n_blocks(n)
    k = kernels(layout, nb)
    symbols = alphabet_size(layout)
    sizes_at = HEADER.size + symbols
    planes_at = sizes_at + SIZE_DTYPE.itemsize * nb
    bits_at = planes_at + layout.raw_bytes * n
    # Every block fits in MAX_BLOCK_BYTES, so this bounds the stream; pages past the end
    # are never touched, and the result is a view of the written part.
    out = np.empty(bits_at + nb * MAX_BLOCK_BYTES + PADDING, dtype=np.uint8)
    sym = _symbol_scratch(n)
    hist = np.empty((-(-nb // k.group), symbols), dtype=np.int32)
    k.split_values(values, sym, planes_at, out, hist)

    lengths = huffman_lengths(hist.sum(axis=0, dtype=np.int64))
    code_word = canonical_codes(lengths) | (lengths.astype(np.uint32) << np.uint32(16))
    bits = np.empty(nb, dtype=np.int64)
    k.block_bits(sym, lengths, bits)
    sizes = (bits + 7) // 8
    offsets = np.empty(nb + 1, dtype=np.int64)
    offsets[0] = bits_at
    np.cumsum(sizes, out=offsets[1:])
    offsets[1:] += bits_at
    k.write_blocks(sym, code_word, offsets, out)

    end = int(offsets[-1])
    out[: HEADER.size] = np.frombuffer(HEADER.pack(MODE_HUFFMAN, int(lengths.max()), 0, 0, n), dtype=np.uint8)
    out[HEADER.size : sizes_at] = lengths
    out[sizes_at:planes_at] = sizes.astype(SIZE_DTYPE).view(np.uint8)
    out[end : end + PADDING] = 0
    return out[: end + PADDING]


def decode_huffman(
    buf: np.ndarray, plan: HuffmanPlan, layout: FloatLayout, out: np.ndarray | None = None
) -> np.ndarray:
    """Mode-2 decoder over a plan checked by ``entropy.parse_huffman``.

    Parameters
    ----------
    buf : numpy.ndarray
        uint8 chunk stream.
    plan : HuffmanPlan
        Its checked plan.
    layout : FloatLayout
        Float layout of the values.
    out : numpy.ndarray, optional
        ``layout.uint`` array of ``plan.n`` values to write into.

    Returns
    -------
    numpy.ndarray
        The unsigned words (``out`` when given).

    Raises
    ------
    CorruptData
        A block's bits do not match its declared size (see ``entropy.check_blocks``).
    """
    if out is None:
        out = np.empty(plan.n, dtype=layout.uint)
    elif out.dtype != layout.uint or out.size != plan.n:
        raise ValueError(f"out must be a {layout.uint} array of {plan.n} values, got {out.dtype} of {out.size}")
    consumed = np.empty(plan.sizes.size, dtype=np.int64)
    table, multi = decode_tables(plan.lengths, plan.table_bits)
    k = kernels(layout, plan.sizes.size)
    bad = k.decode_blocks(buf, table, plan.table_bits, multi, plan.block_offsets, plan.planes_at, out, consumed)
    if bad:
        check_blocks(buf, plan, consumed)  # raises, naming the first bad block
        raise CorruptData(f"{bad} blocks fail their size or padding check; the bitstream is corrupt")
    return out
