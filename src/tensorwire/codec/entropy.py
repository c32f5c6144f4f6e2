"""Mode-2 chunk stream ("huffman", level ``max``): canonical Huffman codes for block symbols.

This module is the specification in code (docs/FORMAT.md, "Mode 2: huffman"); the numba
kernels of ``cpu_huffman.py`` must write and accept exactly the same bytes. The parsing
and validation in :func:`parse_huffman` and :func:`check_blocks` is shared by every
implementation, so a kernel only sees offsets and tables that were checked first.
``chunks.encode_huffman`` / ``chunks.decode_huffman`` choose between this reference and the
kernels; this module imports neither.

Each value of a chunk is split by ``planes.split`` into its exponent, its raw byte planes
and its ``rem`` bits. The symbol ``s = (exponent << rem_bits) | rem`` is Huffman coded,
the byte planes are stored as they are. Stream layout (little-endian)::

    u8 mode = 2 | u8 table_bits | u8 0 | u8 0 | u32 n           header, 8 bytes
    u8 length[2**(exp_bits + rem_bits)]                          code length per symbol
    u16 size[ceil(n / 256)]                                      bitstream bytes per block
    u8 plane[raw_bytes][n]                                       raw byte planes
    bitstream of block 0 | block 1 | ...                         sum(size) bytes
    8 zero bytes                                                 read-ahead padding

Codes are canonical (assigned in order of (length, symbol)) and written LSB-first: each
code is bit-reversed and appended at the low end of a little-endian bit buffer, so a
decoder peeks ``table_bits`` low bits and looks up (symbol, length) in one table. Each
block holds up to 256 symbols and is padded with zero bits to a whole byte, so its size
is exactly ``ceil(bits / 8)``.

A decoder rejects, before decoding: a table_bits outside 1..12, a code length above
table_bits, lengths whose Kraft sum is not exactly 1 (an incomplete or overfull code), a
block size outside ``ceil(count / 8) .. ceil(count * table_bits / 8)``, a stream length
other than the one the sizes imply, non-zero padding bytes; and after decoding, a block
whose bits do not end in its last byte or whose padding bits are not zero.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptData, FormatError, Truncated, UnsupportedDType
from .blocks import BLOCK, MODE_HUFFMAN, n_blocks
from .planes import FloatLayout, merge, split

__all__ = [
    "HEADER",
    "MAX_CODE_BITS",
    "PADDING",
    "HuffmanPlan",
    "alphabet_size",
    "block_symbols",
    "huffman_lengths",
    "canonical_codes",
    "decode_table",
    "parse_huffman",
    "check_blocks",
    "encode_reference",
    "decode_reference",
]

HEADER = struct.Struct("<BBBBI")  # mode, table_bits, reserved, reserved, n
MAX_CODE_BITS = 12  # a 4096-entry decode table (8 KiB of uint16) stays in L1
PADDING = 8  # zero bytes after the bitstreams: a decoder may load 8 bytes at any position
SIZE_DTYPE = np.dtype("<u2")
# Bytes a block's bitstream can need at most: every symbol at the longest code length.
MAX_BLOCK_BYTES = (BLOCK * MAX_CODE_BITS + 7) // 8


def alphabet_size(layout: FloatLayout) -> int:
    """Number of block symbols of a layout: ``2**(exp_bits + rem_bits)``."""
    return 1 << (layout.exp_bits + layout.rem_bits)


def _check_alphabet(layout: FloatLayout) -> None:
    # A decode-table entry is ``symbol | length << 8``: the symbol must fit in a byte.
    if alphabet_size(layout) > 256:
        raise UnsupportedDType(
            f"layout {layout.name} has {alphabet_size(layout)} block symbols; mode 2 supports at most 256: "
            "use level 'fast'"
        )


def block_symbols(values: np.ndarray, layout: FloatLayout) -> tuple[np.ndarray, np.ndarray]:
    """Symbols and raw byte planes of a chunk.

    Parameters
    ----------
    values : numpy.ndarray
        Unsigned words of the chunk (``layout.uint``).
    layout : FloatLayout
        Float layout of the values.

    Returns
    -------
    symbols : numpy.ndarray
        uint8, ``(exponent << rem_bits) | rem`` per value.
    planes : numpy.ndarray
        uint8 of shape ``(raw_bytes, n)``, as :func:`planes.split` gives them.
    """
    exponent, planes, rem = split(values, layout)
    symbols = ((exponent.astype(np.uint16) << layout.rem_bits) | rem).astype(np.uint8)
    return symbols, planes


# ----------------------------------------------------------------------------- code construction
# These are encoder choices: any lengths that form a complete code of at most MAX_CODE_BITS
# bits are valid. Both implementations call the same functions, so they write the same bytes.


def _huffman_depths(weights: list[int]) -> list[int]:
    """Code lengths of an unrestricted Huffman code for two or more positive weights."""
    k = len(weights)
    heap = [(w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = [0] * (2 * k - 1)
    node = k
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    # Internal nodes are numbered in creation order, so a parent always has a larger number
    # than its children: one backward pass from the root (the last node) gives every depth.
    depth = [0] * (2 * k - 1)
    for i in range(2 * k - 3, -1, -1):
        depth[i] = depth[parent[i]] + 1
    return depth[:k]


def huffman_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Code length per symbol for the given symbol counts, limited to ``max_bits``.

    Parameters
    ----------
    counts : numpy.ndarray
        Occurrences of each symbol of an alphabet of two or more; at least one positive.
    max_bits : int
        Longest code allowed.

    Returns
    -------
    numpy.ndarray
        uint8 length per symbol, 0 for absent symbols. The lengths form a complete code
        (Kraft sum exactly 1). A lone symbol gets length 1 together with the smallest other
        symbol, which does not occur, so that the code stays complete.

    Notes
    -----
    When the Huffman code is deeper than ``max_bits`` the counts are flattened (halved,
    rounding up, so no symbol disappears) and the code rebuilt; rare symbols then get
    shorter codes at a small cost to the frequent ones. This converges: equal weights
    give a code of depth ``ceil(log2(symbols))`` <= 8.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 0 or counts.size < 2:
        raise ValueError(f"need counts of 2 or more symbols, one of them positive; got {counts.size} symbols")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if present.size == 1:
        lone = int(present[0])
        lengths[lone] = 1
        lengths[1 if lone == 0 else 0] = 1
        return lengths
    weights = counts[present]
    while True:
        depths = _huffman_depths(weights.tolist())
        if max(depths) <= max_bits:
            break
        weights = (weights + 1) // 2
    lengths[present] = depths
    return lengths


def _reverse_bits(code: int, length: int) -> int:
    return int(format(code, f"0{length}b")[::-1], 2)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes, bit-reversed for LSB-first writing.

    Codes are assigned in order of (length, symbol): the first gets 0, each next one the
    previous code plus one, shifted left when the length grows (as in DEFLATE). The
    returned code of symbol ``s`` has its first bit in bit 0.

    Parameters
    ----------
    lengths : numpy.ndarray
        Code length per symbol, 0 for absent symbols.

    Returns
    -------
    numpy.ndarray
        uint32 reversed code per symbol (0 for absent symbols).
    """
    lengths = np.asarray(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    present = np.flatnonzero(lengths)
    order = present[np.argsort(lengths[present], kind="stable")]  # stable: ties by symbol
    code, previous = 0, 0
    for s in order.tolist():
        length = int(lengths[s])
        code <<= length - previous
        codes[s] = _reverse_bits(code, length)
        code += 1
        previous = length
    return codes


def decode_table(lengths: np.ndarray, table_bits: int) -> np.ndarray:
    """Decode table: entry ``peek`` is ``symbol | length << 8``.

    ``peek`` is the next ``table_bits`` bits of the stream, first bit lowest. A code of
    length ``l`` fills every entry whose low ``l`` bits equal its reversed code, so the
    entry depends only on the bits the code really uses. For a complete code (checked by
    :func:`parse_huffman`) every entry is filled exactly once.
    """
    table = np.zeros(1 << table_bits, dtype=np.uint16)
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(lengths).tolist():
        length = int(lengths[s])
        table[int(codes[s]) :: 1 << length] = s | (length << 8)
    return table


# ----------------------------------------------------------------------------- parse + validate


@dataclass(frozen=True)
class HuffmanPlan:
    """A checked mode-2 chunk: its code and the offsets of every part, all inside the buffer."""

    n: int
    table_bits: int
    lengths: np.ndarray  # uint8 per symbol, a complete code of at most table_bits bits
    sizes: np.ndarray  # uint16 per block: bitstream bytes
    block_offsets: np.ndarray  # int64, n_blocks + 1, absolute byte offsets of the bitstreams
    planes_at: int


def _header_fields(buf: np.ndarray) -> tuple[int, int, int, int, int]:
    if buf.size < HEADER.size:
        raise Truncated(
            f"mode-2 chunk has {buf.size} bytes, fewer than its {HEADER.size}-byte header; the file is truncated"
        )
    return HEADER.unpack_from(buf[: HEADER.size].tobytes())


def _check_code(lengths: np.ndarray, table_bits: int) -> None:
    """The lengths must form a complete prefix code no longer than ``table_bits``."""
    longest = int(lengths.max())
    if longest > table_bits:
        raise CorruptData(
            f"a code length of {longest} bits exceeds the header's table_bits {table_bits}; the chunk is corrupt"
        )
    # Kraft sum in units of 2**-MAX_CODE_BITS: exactly 1 for a complete code. Complete means
    # every table entry is filled (no undefined peek) and no two codes overlap.
    per_length = np.bincount(lengths, minlength=MAX_CODE_BITS + 1).tolist()
    kraft = sum(per_length[k] << (MAX_CODE_BITS - k) for k in range(1, MAX_CODE_BITS + 1))
    if kraft != 1 << MAX_CODE_BITS:
        raise CorruptData(
            f"code lengths have a Kraft sum of {kraft}/{1 << MAX_CODE_BITS}, expected exactly 1 "
            "(a complete prefix code); the chunk is corrupt"
        )


def _check_sizes(sizes: np.ndarray, n: int, table_bits: int) -> None:
    """Every symbol takes 1..table_bits bits, so each block's byte size is bounded both ways.

    This rejects a corrupted size before any bits are decoded. Full blocks are checked with
    two reductions; the per-block bounds are only built to name the first bad block.
    """
    last = n - BLOCK * (sizes.size - 1)
    full = sizes[:-1]
    ok = (last + 7) // 8 <= int(sizes[-1]) <= (last * table_bits + 7) // 8
    if full.size:
        ok = ok and BLOCK // 8 <= int(full.min()) and int(full.max()) <= BLOCK * table_bits // 8
    if ok:
        return
    counts = np.full(sizes.size, BLOCK, dtype=np.int64)
    counts[-1] = last
    low, high = (counts + 7) // 8, (counts * table_bits + 7) // 8
    b = int(np.flatnonzero((sizes < low) | (sizes > high))[0])
    raise CorruptData(
        f"block {b} declares {int(sizes[b])} bitstream bytes, expected {int(low[b])}..{int(high[b])} "
        f"for {int(counts[b])} symbols of at most {table_bits} bits; the chunk is corrupt"
    )


def parse_huffman(buf: np.ndarray, layout: FloatLayout, expected_n: int | None = None) -> HuffmanPlan:
    """Check a mode-2 chunk and compute the byte offset of every block's bitstream.

    Parameters
    ----------
    buf : numpy.ndarray
        uint8, exactly the chunk stream.
    layout : FloatLayout
        Float layout of the chunk's values.
    expected_n : int, optional
        Values the caller's index says the chunk holds.

    Returns
    -------
    HuffmanPlan

    Raises
    ------
    Truncated
        The stream is shorter than its header, tables and declared block sizes need.
    CorruptData
        A field is impossible: reserved bytes, code lengths, block sizes, a long stream,
        non-zero padding.
    FormatError
        The stream is not a mode-2 chunk.
    """
    _check_alphabet(layout)
    mode, table_bits, r0, r1, n = _header_fields(buf)
    if mode != MODE_HUFFMAN:
        raise FormatError(f"expected a mode-{MODE_HUFFMAN} (huffman) chunk, found mode {mode}")
    if r0 or r1:
        raise CorruptData(f"reserved chunk header bytes are {r0},{r1}, expected 0; the chunk is corrupt")
    if not 1 <= table_bits <= MAX_CODE_BITS:
        raise CorruptData(f"table_bits is {table_bits}, expected 1..{MAX_CODE_BITS}; the chunk is corrupt")
    if expected_n is not None and n != expected_n:
        raise CorruptData(f"chunk declares {n} values but the index expects {expected_n}; the file is corrupt")
    if n == 0:
        raise CorruptData("a mode-2 chunk declares 0 values; empty chunks are stored (mode 0); the chunk is corrupt")
    symbols = alphabet_size(layout)
    nb = n_blocks(n)
    lengths_at = HEADER.size
    sizes_at = lengths_at + symbols
    planes_at = sizes_at + SIZE_DTYPE.itemsize * nb
    bits_at = planes_at + layout.raw_bytes * n
    # Check the fixed-size parts before reading any table, so that an absurd n fails here.
    if bits_at + PADDING > buf.size:
        raise Truncated(
            f"chunk declares {n} values, needing at least {bits_at + PADDING} bytes, but has {buf.size}; "
            "the file is truncated or corrupt"
        )
    lengths = buf[lengths_at:sizes_at]
    _check_code(lengths, table_bits)
    sizes = buf[sizes_at:planes_at].view(SIZE_DTYPE)
    _check_sizes(sizes, n, table_bits)
    block_offsets = np.empty(nb + 1, dtype=np.int64)
    block_offsets[0] = bits_at
    np.cumsum(sizes, dtype=np.int64, out=block_offsets[1:])
    block_offsets[1:] += bits_at
    end = int(block_offsets[-1]) + PADDING
    if end != buf.size:
        kind = Truncated if end > buf.size else CorruptData
        raise kind(
            f"chunk needs exactly {end} bytes for its {nb} blocks, found {buf.size}; the file is truncated or corrupt"
        )
    if buf[end - PADDING :].tobytes() != bytes(PADDING):
        raise CorruptData(f"the {PADDING} padding bytes after the bitstreams are not zero; the chunk is corrupt")
    return HuffmanPlan(n, table_bits, lengths, sizes, block_offsets, planes_at)


def check_blocks(buf: np.ndarray, plan: HuffmanPlan, consumed: np.ndarray) -> None:
    """After decoding: every block must use exactly its bytes, with zero padding bits.

    Parameters
    ----------
    buf : numpy.ndarray
        The chunk stream.
    plan : HuffmanPlan
        Its checked plan.
    consumed : numpy.ndarray
        Bits each block's decoder consumed.

    Raises
    ------
    CorruptData
        A block read past its bytes, ended more than a byte early, or has non-zero padding
        bits: the bitstream was altered.
    """
    consumed = np.asarray(consumed, dtype=np.int64)
    used = (consumed + 7) // 8
    bad = np.flatnonzero(used != plan.sizes)
    if bad.size:
        b = int(bad[0])
        raise CorruptData(
            f"block {b} decodes from {int(consumed[b])} bits but declares {int(plan.sizes[b])} bytes; "
            "the bitstream is corrupt"
        )
    tail = consumed & 7
    last = buf[plan.block_offsets[1:] - 1] >> tail.astype(np.uint8)
    bad = np.flatnonzero((tail != 0) & (last != 0))
    if bad.size:
        raise CorruptData(f"block {int(bad[0])} has non-zero padding bits; the bitstream is corrupt")


# ----------------------------------------------------------------------------- reference codec


def _header_and_tables(n: int, lengths: np.ndarray, sizes: np.ndarray, planes: np.ndarray) -> bytes:
    table_bits = int(lengths.max())
    return b"".join(
        [
            HEADER.pack(MODE_HUFFMAN, table_bits, 0, 0, n),
            lengths.astype(np.uint8).tobytes(),
            sizes.astype(SIZE_DTYPE).tobytes(),
            planes.tobytes(),
        ]
    )


def _pack_blocks(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, bytes]:
    """Bitstreams of all blocks: bit ``k`` of a code lands at its offset plus ``k``, LSB-first."""
    n = symbols.size
    code_len = lengths[symbols].astype(np.int64)
    code = codes[symbols].astype(np.int64)
    block_starts = np.arange(0, n, BLOCK)
    bits = np.add.reduceat(code_len, block_starts)
    sizes = (bits + 7) // 8
    byte_at = np.concatenate([[0], np.cumsum(sizes)])
    ends = np.cumsum(code_len)
    starts = ends - code_len  # bit offset of each code from the first block's start
    block = np.arange(n) // BLOCK
    bit_at = 8 * byte_at[block] + starts - starts[block_starts][block]
    stream = np.zeros(8 * int(byte_at[-1]), dtype=np.uint8)
    for k in range(int(lengths.max())):
        has = code_len > k
        stream[bit_at[has] + k] = (code[has] >> k) & 1
    return sizes, np.packbits(stream, bitorder="little").tobytes()


def encode_reference(values: np.ndarray, layout: FloatLayout) -> bytes:
    """Reference mode-2 encoder (numpy).

    Parameters
    ----------
    values : numpy.ndarray
        Unsigned words of one chunk, at least one.
    layout : FloatLayout
        Their float layout.

    Returns
    -------
    bytes
        The chunk stream.
    """
    _check_alphabet(layout)
    symbols, planes = block_symbols(values, layout)
    if symbols.size == 0:
        raise ValueError("mode 2 needs at least one value; store empty chunks (mode 0)")
    lengths = huffman_lengths(np.bincount(symbols, minlength=alphabet_size(layout)))
    sizes, stream = _pack_blocks(symbols, canonical_codes(lengths), lengths)
    return _header_and_tables(symbols.size, lengths, sizes, planes) + stream + bytes(PADDING)


def _decode_block(data: bytes, count: int, table: np.ndarray, table_bits: int, out: np.ndarray) -> int:
    """Decode ``count`` symbols from one block's bytes; returns the bits consumed.

    Bits past the block's bytes read as zero, so a corrupt block can only over-consume,
    which :func:`check_blocks` then reports.
    """
    acc = int.from_bytes(data, "little")
    mask = (1 << table_bits) - 1
    pos = 0
    for i in range(count):
        entry = int(table[(acc >> pos) & mask])
        out[i] = entry & 0xFF
        pos += entry >> 8
    return pos


def decode_reference(buf: np.ndarray, layout: FloatLayout, expected_n: int | None = None) -> np.ndarray:
    """Reference mode-2 decoder (numpy and Python): the unsigned words of the chunk."""
    plan = parse_huffman(buf, layout, expected_n)
    n, nb = plan.n, plan.sizes.size
    table = decode_table(plan.lengths, plan.table_bits)
    symbols = np.empty(n, dtype=np.uint8)
    consumed = np.empty(nb, dtype=np.int64)
    for b in range(nb):
        data = buf[plan.block_offsets[b] : plan.block_offsets[b + 1]].tobytes()
        block = symbols[b * BLOCK : (b + 1) * BLOCK]
        consumed[b] = _decode_block(data, block.size, table, plan.table_bits, block)
    check_blocks(buf, plan, consumed)
    planes = buf[plan.planes_at : plan.planes_at + layout.raw_bytes * n].reshape(layout.raw_bytes, n)
    rem = symbols & ((1 << layout.rem_bits) - 1)
    exponent = symbols >> layout.rem_bits
    return merge(exponent, planes, rem, layout)
