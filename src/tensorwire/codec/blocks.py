"""Chunk streams of the ENEC codec: exponent transform, per-block widths, lane packing, offsets.

This is the pure-numpy reference implementation; ``cpu.py`` holds the numba kernels that
must produce and accept exactly the same bytes. docs/FORMAT.md ("Chunk streams") is the
normative description; the parsing and validation here is shared by every implementation,
so a kernel only ever sees offsets that were checked to lie inside the buffer.

A chunk holds ``n`` values of one float layout. Values are cut into blocks of ``BLOCK``.
Per block the exponent code ``c = (exponent - base) mod 2**exp_bits`` is stored at a width
``w`` picked for that block; values whose code does not fit in ``w`` bits are *exceptions*:
the stored code is clipped and a (position, exponent) pair patches the value on decode,
so a zero or a rare huge value never widens the block. Each block symbol is
``(min(c, 2**w - 1) << rem_bits) | rem``, ``W = w + rem_bits <= 8`` bits, packed in lanes
of 4, 2 and 1 bits (hierarchical halving) or one 8-bit lane, each lane strided so that
packing and unpacking are plain vector loops. A block's byte offset is the prefix sum of
``BLOCK * W / 8`` over the blocks before it, so blocks decode independently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptData, FormatError, Truncated
from .planes import FloatLayout, merge, split

__all__ = [
    "BLOCK",
    "MODE_RAW",
    "MODE_LANES",
    "MODE_HUFFMAN",
    "MODE_NARROW",
    "NARROW_HEADER",
    "LANES",
    "EXCEPTION_BITS",
    "sample_stride",
    "choose_base",
    "choose_widths",
    "LanesPlan",
    "parse_lanes",
    "encode_lanes",
    "decode_lanes",
    "encode_raw",
    "decode_raw",
    "chunk_mode",
    "block_offsets",
    "n_blocks",
]

BLOCK = 256
MODE_RAW = 0
MODE_LANES = 1
MODE_HUFFMAN = 2
MODE_NARROW = 3
EXCEPTION_BITS = 16  # one position byte + one exponent byte
HEADER = struct.Struct("<BBBBII")  # mode, base, reserved, reserved, n, n_exceptions
RAW_HEADER = struct.Struct("<BBBBI")  # mode, 3 reserved, n
NARROW_HEADER = struct.Struct("<BBBBII")  # mode, shift, 2 reserved, n, n_exceptions
BASE_SAMPLE_STRIDE = 16
BASE_SAMPLE_MIN = 1 << 16

# Symbol width W -> lanes as (lane width, bit shift), low bits first.
LANES: tuple[tuple[tuple[int, int], ...], ...] = (
    (),
    ((1, 0),),
    ((2, 0),),
    ((2, 0), (1, 2)),
    ((4, 0),),
    ((4, 0), (1, 4)),
    ((4, 0), (2, 4)),
    ((4, 0), (2, 4), (1, 6)),
    ((8, 0),),
)


def n_blocks(n: int) -> int:
    return -(-n // BLOCK)


def block_offsets(widths: np.ndarray, rem_bits: int) -> np.ndarray:
    """Prefix sum of the packed block sizes: ``n_blocks + 1`` offsets, the first one 0."""
    offsets = np.zeros(widths.size + 1, dtype=np.int64)
    np.cumsum((widths.astype(np.int64) + rem_bits) * (BLOCK // 8), out=offsets[1:])
    return offsets


def chunk_mode(buf) -> int:
    if len(buf) < 1:
        raise Truncated("empty chunk stream: expected at least a mode byte; the file is truncated")
    return buf[0]


# ----------------------------------------------------------------------------- encoder choices


def sample_stride(n: int) -> int:
    """The base is chosen on every value of a small chunk and every 16th of a large one."""
    return 1 if n <= BASE_SAMPLE_MIN else BASE_SAMPLE_STRIDE


def choose_base(hist: np.ndarray, layout: FloatLayout) -> int:
    """Reference exponent for a chunk: the window start that minimises the estimated size.

    ``hist`` counts the exponents of the sampled values (:func:`sample_stride`); the choice
    only affects size, never correctness.
    """
    size = 1 << layout.exp_bits
    hist = np.asarray(hist, dtype=np.int64)
    total = int(hist.sum())
    if total == 0:
        return 0
    doubled = np.concatenate([hist, hist])
    csum = np.concatenate([[0], np.cumsum(doubled)])
    best_cost, best_base = None, 0
    for w in range(layout.exp_bits + 1):
        span = 1 << w
        inside = csum[np.arange(size) + span] - csum[np.arange(size)]
        cost = total * w + EXCEPTION_BITS * (total - inside)
        b = int(np.argmin(cost))
        if best_cost is None or cost[b] < best_cost:
            best_cost, best_base = int(cost[b]), b
    return best_base


def block_codes(exponent: np.ndarray, base: int, layout: FloatLayout) -> np.ndarray:
    """Exponent codes padded with zeros to whole blocks, shape ``(n_blocks, BLOCK)``."""
    nb = n_blocks(exponent.size)
    codes = np.zeros(nb * BLOCK, dtype=np.uint8)
    codes[: exponent.size] = (exponent.astype(np.int32) - base) & layout.exp_mask
    return codes.reshape(nb, BLOCK)


def choose_widths(codes: np.ndarray, exp_bits: int) -> np.ndarray:
    """Per-block code width: minimise ``BLOCK*w + EXCEPTION_BITS*exceptions(w)``.

    Ties go to the smaller width; a width with more than 255 exceptions is not allowed
    (the count is a byte). ``w = exp_bits`` never has exceptions, so a choice always exists.
    """
    ws = np.arange(exp_bits + 1)
    counts = (codes[:, None, :] >= (1 << ws)[None, :, None]).sum(axis=2)
    cost = BLOCK * ws[None, :] + EXCEPTION_BITS * counts
    cost[counts > 255] = np.iinfo(np.int64).max
    return np.argmin(cost, axis=1).astype(np.uint8)


# ----------------------------------------------------------------------------- lane packing


def pack_block(symbols: np.ndarray, width: int) -> bytes:
    """Pack one block of ``BLOCK`` symbols of ``width`` bits into strided lanes."""
    out = []
    for lane_bits, shift in LANES[width]:
        per_byte = 8 // lane_bits
        stride = BLOCK // per_byte
        part = ((symbols.astype(np.uint32) >> shift) & ((1 << lane_bits) - 1)).reshape(per_byte, stride)
        lane = np.zeros(stride, dtype=np.uint32)
        for k in range(per_byte):
            lane |= part[k] << (k * lane_bits)
        out.append(lane.astype(np.uint8).tobytes())
    return b"".join(out)


def unpack_block(data: np.ndarray, width: int) -> np.ndarray:
    symbols = np.zeros(BLOCK, dtype=np.uint32)
    pos = 0
    for lane_bits, shift in LANES[width]:
        per_byte = 8 // lane_bits
        stride = BLOCK // per_byte
        lane = data[pos : pos + stride].astype(np.uint32)
        for k in range(per_byte):
            symbols[k * stride : (k + 1) * stride] |= ((lane >> (k * lane_bits)) & ((1 << lane_bits) - 1)) << shift
        pos += stride
    return symbols.astype(np.uint8)


# ----------------------------------------------------------------------------- parse + validate


@dataclass(frozen=True)
class LanesPlan:
    """A checked mode-1 chunk: every offset a decoder needs, all inside the buffer."""

    n: int
    base: int
    widths: np.ndarray  # uint8, per block: exponent code width w
    n_exc: np.ndarray  # uint8, per block
    code_offsets: np.ndarray  # int64, n_blocks + 1, absolute byte offsets (prefix sum)
    exc_offsets: np.ndarray  # int64, n_blocks + 1, indices into the exception arrays
    exc_pos_at: int
    exc_val_at: int
    planes_at: int


def parse_lanes(buf: np.ndarray, layout: FloatLayout, expected_n: int | None = None) -> LanesPlan:
    """Check a mode-1 chunk and compute its offsets (the prefix sums)."""
    if buf.size < HEADER.size:
        raise Truncated(f"chunk has {buf.size} bytes, fewer than its {HEADER.size}-byte header; the file is truncated")
    mode, base, r0, r1, n, total_exc = HEADER.unpack_from(buf[: HEADER.size].tobytes())
    if mode != MODE_LANES:
        raise FormatError(f"expected a mode-{MODE_LANES} chunk, found mode {mode}")
    if r0 or r1:
        raise CorruptData(f"reserved chunk header bytes are {r0},{r1}, expected 0; the chunk is corrupt")
    if expected_n is not None and n != expected_n:
        raise CorruptData(f"chunk declares {n} values but the index expects {expected_n}; the file is corrupt")
    if base > layout.exp_mask:
        raise CorruptData(f"exponent base {base} does not fit {layout.exp_bits} bits; the chunk is corrupt")
    nb = n_blocks(n)
    # Check the fixed-size parts before touching any per-block table, so that an absurd
    # count fails here instead of allocating.
    fixed = HEADER.size + 2 * nb + layout.raw_bytes * n + 2 * total_exc
    if fixed > buf.size:
        raise Truncated(
            f"chunk declares {n} values and {total_exc} exceptions, needing at least {fixed} bytes, "
            f"but has {buf.size}; the file is truncated or corrupt"
        )
    widths = buf[HEADER.size : HEADER.size + nb]
    n_exc = buf[HEADER.size + nb : HEADER.size + 2 * nb]
    max_w = layout.exp_bits
    if nb and int(widths.max()) > max_w:
        raise CorruptData(f"a block width of {int(widths.max())} bits exceeds the {max_w}-bit exponent; the chunk is corrupt")
    if int(n_exc.sum(dtype=np.int64)) != total_exc:
        raise CorruptData(f"block exception counts sum to {int(n_exc.sum())}, header says {total_exc}; the chunk is corrupt")
    planes_at = HEADER.size + 2 * nb
    code_offsets = planes_at + layout.raw_bytes * n + block_offsets(widths, layout.rem_bits)
    exc_pos_at = int(code_offsets[-1])
    exc_val_at = exc_pos_at + total_exc
    end = exc_val_at + total_exc
    if end != buf.size:
        kind = Truncated if end > buf.size else CorruptData
        raise kind(f"chunk needs exactly {end} bytes for its {nb} blocks, found {buf.size}; the file is truncated or corrupt")
    exc_offsets = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(n_exc, out=exc_offsets[1:])
    if total_exc:
        # A position byte addresses any value of a full block; only the last block may be
        # short, and a patch in its padding would write past the output.
        last = buf[exc_pos_at + int(exc_offsets[-2]) : exc_val_at]
        if last.size and int(last.max()) >= n - (nb - 1) * BLOCK:
            raise CorruptData("an exception position lies past the last value; the chunk is corrupt")
        if layout.exp_bits < 8 and int(buf[exc_val_at:end].max()) > layout.exp_mask:
            raise CorruptData("an exception exponent does not fit the exponent field; the chunk is corrupt")
    return LanesPlan(n, base, widths, n_exc, code_offsets, exc_offsets, exc_pos_at, exc_val_at, planes_at)


# ----------------------------------------------------------------------------- reference codec


def encode_lanes(values: np.ndarray, layout: FloatLayout) -> bytes:
    """Reference mode-1 encoder (numpy). ``values`` are the unsigned words of one chunk."""
    exponent, planes, rem = split(values, layout)
    n = exponent.size
    hist = np.bincount(exponent[:: sample_stride(n)], minlength=1 << layout.exp_bits)
    base = choose_base(hist, layout)
    codes = block_codes(exponent, base, layout)
    nb = codes.shape[0]
    valid = np.zeros(nb * BLOCK, dtype=bool)
    valid[:n] = True
    widths = choose_widths(codes, layout.exp_bits)
    rem_padded = np.zeros(nb * BLOCK, dtype=np.uint8)
    rem_padded[:n] = rem
    rem_padded = rem_padded.reshape(nb, BLOCK)
    exp_padded = np.zeros(nb * BLOCK, dtype=np.uint8)
    exp_padded[:n] = exponent
    exp_padded = exp_padded.reshape(nb, BLOCK)
    code_parts, positions, exc_values, n_exc = [], [], [], np.zeros(nb, dtype=np.uint8)
    for b in range(nb):
        w = int(widths[b])
        limit = (1 << w) - 1
        is_exc = codes[b] > limit
        idx = np.flatnonzero(is_exc)
        n_exc[b] = idx.size
        positions.append(idx.astype(np.uint8))
        exc_values.append(exp_padded[b, idx])
        clipped = np.minimum(codes[b], limit).astype(np.uint32)
        symbols = (clipped << layout.rem_bits) | rem_padded[b]
        code_parts.append(pack_block(symbols, w + layout.rem_bits))
    total_exc = int(n_exc.sum())
    header = HEADER.pack(MODE_LANES, base, 0, 0, n, total_exc)
    return b"".join(
        [
            header,
            widths.tobytes(),
            n_exc.tobytes(),
            planes.tobytes(),
            *code_parts,
            np.concatenate(positions).tobytes() if nb else b"",
            np.concatenate(exc_values).tobytes() if nb else b"",
        ]
    )


def decode_lanes(buf: np.ndarray, layout: FloatLayout, expected_n: int | None = None) -> np.ndarray:
    """Reference mode-1 decoder (numpy): unsigned words of the chunk."""
    plan = parse_lanes(buf, layout, expected_n)
    n, nb = plan.n, plan.widths.size
    exponent = np.zeros(nb * BLOCK, dtype=np.uint8)
    rem = np.zeros(nb * BLOCK, dtype=np.uint8)
    rem_mask = (1 << layout.rem_bits) - 1
    for b in range(nb):
        w = int(plan.widths[b])
        symbols = unpack_block(buf[plan.code_offsets[b] : plan.code_offsets[b + 1]], w + layout.rem_bits)
        block = slice(b * BLOCK, (b + 1) * BLOCK)
        exponent[block] = ((symbols >> layout.rem_bits).astype(np.int32) + plan.base) & layout.exp_mask
        rem[block] = symbols & rem_mask
        e0, e1 = plan.exc_offsets[b], plan.exc_offsets[b + 1]
        pos = buf[plan.exc_pos_at + e0 : plan.exc_pos_at + e1].astype(np.int64)
        exponent[b * BLOCK + pos] = buf[plan.exc_val_at + e0 : plan.exc_val_at + e1]
    planes = buf[plan.planes_at : plan.planes_at + layout.raw_bytes * n].reshape(layout.raw_bytes, n)
    return merge(exponent[:n], planes, rem[:n], layout)


def encode_raw(data: np.ndarray, n: int) -> bytes:
    """Stored mode: the bytes of ``n`` values unchanged, for incompressible data and other dtypes."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return RAW_HEADER.pack(MODE_RAW, 0, 0, 0, n) + raw.tobytes()


def decode_raw(buf: np.ndarray, itemsize: int, expected_n: int | None = None) -> np.ndarray:
    """The raw bytes of a stored chunk, as uint8, after checking the header."""
    if buf.size < RAW_HEADER.size:
        raise Truncated(f"stored chunk has {buf.size} bytes, fewer than its header; the file is truncated")
    mode, r0, r1, r2, n = RAW_HEADER.unpack_from(buf[: RAW_HEADER.size].tobytes())
    if mode != MODE_RAW:
        raise FormatError(f"expected a stored (mode 0) chunk, found mode {mode}")
    if r0 or r1 or r2:
        raise CorruptData("reserved bytes of a stored chunk are not zero; the chunk is corrupt")
    if expected_n is not None and n != expected_n:
        raise CorruptData(f"stored chunk declares {n} values, the index expects {expected_n}; the file is corrupt")
    need = RAW_HEADER.size + n * itemsize
    if need != buf.size:
        kind = Truncated if need > buf.size else CorruptData
        raise kind(f"stored chunk of {n} values needs {need} bytes, found {buf.size}; the file is truncated or corrupt")
    return buf[RAW_HEADER.size :]
