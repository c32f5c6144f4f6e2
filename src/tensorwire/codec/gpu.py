"""Triton decoder for chunk streams, on the device that holds the output tensor.

Mode-1 ("lanes") streams decode on the device; the result is bit-identical to
``cpu.decode_lanes`` and ``blocks.decode_lanes``. Mode 0 (stored) is a device copy.
Mode 2 (Huffman) has no device kernel yet: it is decoded on the CPU by
``chunks.decode_chunk`` and copied to the device (see :func:`decode_chunk_device`).

Headers are parsed and checked on the host by ``blocks.parse_lanes``, so the kernels see
only offsets that lie inside the buffer. Triton and torch are imported on first use:
importing this module never fails, and calling a decoder without triton installed raises
:class:`~tensorwire.errors.MissingDependency` naming the ``gpu`` extra. With
``TRITON_INTERPRET=1`` (read at each call, so it may be set after triton is imported),
the kernels run in Triton's interpreter on CPU tensors: that is how the tests run
without a GPU. Without it, CPU tensors are refused.

Kernel layout (one launch per chunk)
------------------------------------
* One program per ``group`` consecutive blocks. The program works on a
  ``[group, BLOCK]`` tile: row ``g`` is block ``pid*group + g``, column ``i`` its value ``i``.
  Per row it loads the block's symbol width ``W = w + rem_bits`` (the widths bytes of
  the stream, already on the device) and its code offset (uploaded: relative to the first
  block's codes, a multiple of 32 bytes).
* Lanes are decoded without branching on ``W``: each of the four possible lanes is one
  masked load plus shifts, and ``W``'s binary digits say which lanes exist and where
  (``blocks.LANES``): the 8-bit lane iff ``W == 8``; the 4-bit lane iff ``W & 4``, at byte
  0; the 2-bit lane iff ``W & 2``, at byte ``32*(W & 4)``, shifted by ``W & 4``; the 1-bit lane
  iff ``W & 1``, at byte ``32*(W & 6)``, shifted by ``W & 6``. Symbol ``i`` of a lane of
  ``b`` bits sits in byte ``i % (32*b)`` of the lane, at bit ``b * (i // (32*b))``, so a warp
  reads consecutive bytes of each lane and the byte planes and the output are contiguous
  runs over the whole tile.
* Base, rem bits and byte planes are merged as in ``cpu.decode_blocks``, in int32, and
  the tile is stored; then (after a barrier) the program patches the exponents of its
  blocks' exceptions, ``EXC_TILE`` at a time, with a read-modify-write of those few
  values. Its exceptions are one contiguous range of the exception arrays; each one's
  block is found by comparing its index with the program's ``exc_offsets``.

Every encoder writes the exceptions of a block in increasing position. A stream where
they are not (possible only for a hand-made stream; its two patches of one value would
race on the device) is detected on the host and decoded on the CPU, whose last-patch-wins
result is then copied to the device, so the result matches the CPU decoder for every
stream ``parse_lanes`` accepts.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptData, require
from . import blocks
from .blocks import BLOCK, LanesPlan
from .planes import DTYPE_ITEMSIZE, FloatLayout, layout_for

__all__ = [
    "GROUP",
    "NUM_WARPS",
    "DevicePlan",
    "available",
    "decode_chunk_device",
    "decode_lanes_device",
    "upload_chunk",
    "upload_plan",
]

GROUP = 8  # blocks per program
NUM_WARPS = 4
EXC_TILE = 64  # exceptions patched per loop step of a program
ALIGN = 256  # upload_chunk puts the byte planes (and, for whole chunks, the codes) at this alignment

# Set by _kernels() on first use; the kernel bodies below read it as a module global,
# as Triton kernels normally do.
tl: Any = None


def available() -> bool:
    """Whether triton can be imported (a decode can run, on a GPU or in the interpreter)."""
    try:
        require("triton")
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- kernels
# Plain functions, wrapped by triton.jit in _kernels() (so that this module imports without
# triton, and so that the interpreter or the compiler is chosen when the kernel is built).


def _lanes_kernel(
    codes,  # *u8: the first block's packed codes
    planes,  # *u8: byte plane 0 (plane p at + p*n); unused when RB == 0
    widths,  # *u8: per-block exponent code width w
    offsets,  # *i32/i64: per-block code offset relative to ``codes``, multiples of 32
    exc_offsets,  # *i32/i64: nb + 1 prefix sums of the per-block exception counts
    exc_pos,  # *u8: exception positions (within their block)
    exc_val,  # *u8: exception exponents
    out,  # *i16/i32/u8: n output words
    n,
    nb,
    base,
    REM: tl.constexpr,
    RB: tl.constexpr,
    MAN: tl.constexpr,
    SIGN: tl.constexpr,
    EXP_MASK: tl.constexpr,
    G: tl.constexpr,
    BLK: tl.constexpr,
    EXC: tl.constexpr,
    BIG: tl.constexpr,
    PATCH: tl.constexpr,
):
    pid = tl.program_id(0)
    if BIG:
        blk0 = pid.to(tl.int64) * G
    else:
        blk0 = pid * G
    g = tl.arange(0, G)
    blk = blk0 + g  # [G]
    live = blk < nb
    W = tl.load(widths + blk, mask=live, other=0).to(tl.int32) + REM  # symbol width, 0..8
    at = tl.load(offsets + blk, mask=live, other=0)
    at = tl.multiple_of(at, 32)  # every block's codes are W*32 bytes
    W = W[:, None]  # [G, 1]
    at = at[:, None]
    i = tl.arange(0, BLK)[None, :]  # [1, BLK]
    idx = blk[:, None] * BLK + i  # value index, [G, BLK]
    valid = idx < n
    # Code loads are masked per row (a block's codes cover its padding too), so that they
    # stay 16-byte vector loads whatever n is.
    row = live[:, None]
    # The 8-bit lane (W == 8): byte i.
    x8 = tl.load(codes + at + i, mask=row & (W == 8), other=0).to(tl.int32)
    # The 4-bit lane (W & 4): byte i % 128, nibble i // 128.
    x4 = tl.load(codes + at + i % 128, mask=row & ((W & 4) != 0), other=0).to(tl.int32)
    s2 = W & 4  # where the 2-bit lane starts (in units of 32 bytes) and its bit shift
    x2 = tl.load(codes + at + 32 * s2 + i % 64, mask=row & ((W & 2) != 0), other=0).to(tl.int32)
    s1 = W & 6
    x1 = tl.load(codes + at + 32 * s1 + i % 32, mask=row & ((W & 1) != 0), other=0).to(tl.int32)
    sym = x8 | ((x4 >> (4 * (i // 128))) & 15)
    sym = sym | (((x2 >> (2 * (i // 64))) & 3) << s2)
    sym = sym | (((x1 >> (i // 32)) & 1) << s1)
    e = ((sym >> REM) + base) & EXP_MASK
    raw = (sym & ((1 << REM) - 1)) << (8 * RB)
    if RB >= 1:
        raw = raw | tl.load(planes + idx, mask=valid, other=0).to(tl.int32)
    if RB >= 2:
        raw = raw | (tl.load(planes + (idx + n), mask=valid, other=0).to(tl.int32) << 8)
    if RB >= 3:
        raw = raw | (tl.load(planes + (idx + n) + n, mask=valid, other=0).to(tl.int32) << 16)
    v = ((raw >> MAN) << SIGN) | (e << MAN) | (raw & ((1 << MAN) - 1))
    tl.store(out + idx, v.to(out.dtype.element_ty), mask=valid)

    if PATCH:
        # Exceptions of this program's blocks: a contiguous range of the exception arrays.
        last = tl.minimum(blk0 + G, nb)
        e0 = tl.load(exc_offsets + blk0)
        e1 = tl.load(exc_offsets + last)
        tl.debug_barrier()  # the tile's stores are visible to the whole program
        for k0 in range(e0, e1, EXC):
            k = k0 + tl.arange(0, EXC)
            m = k < e1
            pos = tl.load(exc_pos + k, mask=m, other=0).to(tl.int32)
            val = tl.load(exc_val + k, mask=m, other=0).to(tl.int32)
            # block of exception k: blk0 + the number of this program's blocks that end at or
            # before k (scalar loads of exc_offsets, no cross-thread reduction)
            where = blk0 * BLK + pos
            for j in tl.static_range(1, G):
                end = tl.load(exc_offsets + tl.minimum(blk0 + j, last))
                where += (end <= k).to(where.dtype) * BLK
            o = tl.load(out + where, mask=m, other=0).to(tl.int32)
            o = (o & ~(EXP_MASK << MAN)) | (val << MAN)
            tl.store(out + where, o.to(out.dtype.element_ty), mask=m)


@functools.cache
def _build(interpret: bool):
    """The jitted kernels, built once for the interpreter and once for the compiler."""
    global tl
    triton = require("triton")
    tl = require("triton.language")
    try:  # wrap as asked, whatever TRITON_INTERPRET says now
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
    except ImportError:  # pragma: no cover - other triton layouts
        wrap = triton.jit
    # n stays specialised (n % 16 == 0 lets the plane loads and the stores be 16 bytes wide)
    return {"lanes": wrap(_lanes_kernel, do_not_specialize=["nb", "base"])}


def _interpreting() -> bool:
    triton = require("triton")
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # pragma: no cover


def _kernels():
    return _build(_interpreting())


def _torch():
    return require("torch")


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class DevicePlan:
    """The device tensors one mode-1 decode needs, built from a checked :class:`LanesPlan`."""

    codes: Any  # uint8 view of the device buffer at the first block's codes
    planes: Any  # uint8 view at byte plane 0
    widths: Any  # uint8 view of the widths table in the device buffer
    offsets: Any  # int32/int64, per block, relative to ``codes``
    exc_offsets: Any  # int32/int64, nb + 1
    exc_pos: Any  # uint8 view of the exception positions
    exc_val: Any  # uint8 view of the exception exponents
    big: bool  # offsets need 64-bit arithmetic
    canonical: bool  # exception positions strictly increase inside each block


def _host_u8(buf) -> np.ndarray:
    import torch

    if isinstance(buf, torch.Tensor):
        return buf.detach().reshape(-1).view(torch.uint8).cpu().numpy()
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _from_host(arr: np.ndarray, device):
    """Upload a host array (read-only arrays too: torch only reads it)."""
    torch = _torch()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr).to(device)


def _exceptions_canonical(pos: np.ndarray, plan: LanesPlan) -> bool:
    """Whether positions strictly increase inside every block (what every encoder writes)."""
    if pos.size < 2:
        return True
    step = np.diff(pos.astype(np.int16)) > 0
    # pairs that straddle a block boundary are not compared
    starts = plan.exc_offsets[1:-1]
    starts = starts[(starts > 0) & (starts < pos.size)]
    step[starts - 1] = True
    return bool(step.all())


def upload_plan(buf, plan: LanesPlan, layout: FloatLayout, host_buf: np.ndarray | None = None) -> DevicePlan:
    """Device tensors for decoding ``buf`` (the chunk, uint8, on the device) with ``plan``.

    ``host_buf`` is the same chunk on the host; without it the exception positions are
    copied back from the device to check their order.
    """
    torch = _torch()
    total = int(plan.exc_offsets[-1])
    nb = plan.widths.size
    big = buf.numel() >= 2**31 - 2 * BLOCK or 3 * plan.n >= 2**31 - 2 * BLOCK
    index = torch.int64 if big else torch.int32
    codes_at = int(plan.code_offsets[0])
    offsets = (plan.code_offsets[:-1] - codes_at).astype(np.int64 if big else np.int32)
    exc_offsets = plan.exc_offsets.astype(np.int64 if big else np.int32)
    if host_buf is not None:
        pos_host = host_buf[plan.exc_pos_at : plan.exc_val_at]
    else:
        pos_host = buf[plan.exc_pos_at : plan.exc_val_at].cpu().numpy()
    header = blocks.HEADER.size
    return DevicePlan(
        codes=buf[codes_at:],
        planes=buf[plan.planes_at :],
        widths=buf[header : header + nb],
        offsets=_from_host(offsets, buf.device).to(index),
        exc_offsets=_from_host(exc_offsets, buf.device).to(index),
        exc_pos=buf[plan.exc_pos_at : plan.exc_pos_at + total],
        exc_val=buf[plan.exc_val_at : plan.exc_val_at + total],
        big=big,
        canonical=_exceptions_canonical(pos_host, plan),
    )


_WORD = {8: "uint8", 16: "int16", 32: "int32"}


def _words(out, layout: FloatLayout):
    """``out`` as a flat tensor of signed/unsigned words of the layout's width."""
    torch = _torch()
    if not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor")
    if out.element_size() * 8 != layout.bits:
        raise ValueError(f"out must hold {layout.bits}-bit values for {layout.name}, got {out.dtype}")
    return out.reshape(-1).view(getattr(torch, _WORD[layout.bits]))


def decode_lanes_device(
    buf,
    plan: LanesPlan,
    layout: FloatLayout,
    out,
    *,
    host_buf: np.ndarray | None = None,
    device_plan: DevicePlan | None = None,
    group: int = GROUP,
    num_warps: int = NUM_WARPS,
    cpu_impl: str = "cpu",
):
    """Decode a mode-1 chunk on the device.

    Parameters
    ----------
    buf : torch.Tensor
        The whole chunk stream, uint8, on the device (``upload_chunk`` aligns it well).
    plan : LanesPlan
        ``blocks.parse_lanes`` of the same bytes (parsed on the host).
    layout : FloatLayout
        The chunk's float layout.
    out : torch.Tensor
        ``plan.n`` values on ``buf``'s device, contiguous, of the layout's width (for example
        bfloat16, or its int16 view); written in place and returned.
    host_buf : numpy.ndarray, optional
        The chunk on the host; saves a small device-to-host copy of the exception positions.
    device_plan : DevicePlan, optional
        From :func:`upload_plan`, to decode the same chunk again without re-uploading.
    group, num_warps : int
        Blocks per program (a power of two) and warps per program.
    cpu_impl : {"cpu", "reference"}
        The host decoder for the rare stream that must be decoded on the CPU (exception
        positions out of order, see the module docstring).
    """
    torch = _torch()
    kernels = _kernels()
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"buf must be a 1-d uint8 tensor, got {buf.dtype} of shape {tuple(buf.shape)}")
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of two, got {group}")
    words = _words(out, layout)
    if words.numel() != plan.n:
        raise ValueError(f"out holds {words.numel()} values, the chunk {plan.n}")
    if words.device != buf.device:
        raise ValueError(f"out is on {words.device}, the chunk on {buf.device}")
    if words.device.type == "cpu" and not _interpreting():
        raise ValueError(
            "the Triton decoder needs tensors on a GPU (or TRITON_INTERPRET=1 for the interpreter); "
            "decode on the CPU with tensorwire.codec.chunks.decode_chunk"
        )
    nb = plan.widths.size
    if nb == 0:
        return out
    dp = device_plan if device_plan is not None else upload_plan(buf, plan, layout, host_buf)
    if not dp.canonical:
        # Two patches of one value: the CPU decoder applies them in order (last wins).
        host = host_buf if host_buf is not None else buf.cpu().numpy()
        if cpu_impl == "cpu":
            from . import cpu

            values = cpu.decode_lanes(host, plan, layout)
        else:
            values = blocks.decode_lanes(host, layout, plan.n)
        words.copy_(_from_host(values.view(np.dtype(_WORD[layout.bits])), "cpu"))
        return out
    grid = (-(-nb // group),)
    kernels["lanes"][grid](
        dp.codes, dp.planes, dp.widths, dp.offsets, dp.exc_offsets, dp.exc_pos, dp.exc_val, words,
        plan.n, nb, plan.base,
        REM=layout.rem_bits, RB=layout.raw_bytes, MAN=layout.man_bits, SIGN=layout.bits - 1,
        EXP_MASK=layout.exp_mask, G=group, BLK=BLOCK, EXC=EXC_TILE, BIG=dp.big,
        PATCH=bool(int(plan.exc_offsets[-1])), num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- chunks


def upload_chunk(host_buf, device, anchor: int | None = None):
    """Copy a chunk stream to ``device`` so that byte ``anchor`` lands on an ``ALIGN`` boundary.

    The default anchor is the start of a mode-1 chunk's byte planes; for a chunk of a whole
    number of 16 values (every full chunk) that also aligns every plane and the codes, so
    the kernel can read them 16 bytes at a time. Returns a 1-d uint8 tensor view.
    """
    torch = _torch()
    host = _host_u8(host_buf)
    if anchor is None:
        anchor = 0
        if host.size >= blocks.HEADER.size and host[0] == blocks.MODE_LANES:
            n = int.from_bytes(host[4:8].tobytes(), "little")
            anchor = min(host.size, blocks.HEADER.size + 2 * blocks.n_blocks(n))
    store = torch.empty(host.size + ALIGN, dtype=torch.uint8, device=device)
    shift = (-(store.data_ptr() + anchor)) % ALIGN
    dev = store[shift : shift + host.size]
    if host.size:
        dev.copy_(_from_host(host, "cpu"))
    return dev


def decode_chunk_device(chunk, dtype: str, n: int, out, *, device_chunk=None, cpu_impl: str = "cpu", **kernel_options):
    """Decode one chunk stream of ``n`` values of ``dtype`` into the device tensor ``out``.

    Parameters
    ----------
    chunk : numpy.ndarray, bytes-like or torch.Tensor
        The chunk stream. Its header is parsed and checked on the host, so pass the host
        copy when you have it; a device tensor is copied back to the host for parsing.
    dtype : str
        The safetensors dtype name of the values.
    n : int
        Values the chunk must hold.
    out : torch.Tensor
        Contiguous, ``n * itemsize`` bytes in all, on the target device, of any dtype (a
        uint8 slice of a larger buffer too); written in place.
    device_chunk : torch.Tensor, optional
        The same stream already on ``out``'s device (uint8, 1-d); uploaded when missing.
    cpu_impl : {"cpu", "reference"}
        The host decoder used for mode 2 (numba kernels or the numpy reference).
    **kernel_options
        ``group`` and ``num_warps`` for :func:`decode_lanes_device`.

    Mode 0 (stored) is copied on the device; mode 1 (lanes) is decoded by the Triton
    kernel. Mode 2 (Huffman) has no device kernel: it is decoded on the CPU with
    ``chunks.decode_chunk`` (numba) and the values are copied to the device, so it works
    everywhere but at CPU speed. Bad streams raise the same errors as on the CPU.

    Returns ``out``.
    """
    torch = _torch()
    _kernels()  # fail early, naming the extra, when triton is missing
    itemsize = DTYPE_ITEMSIZE.get(dtype)
    if itemsize is None:
        layout_for(dtype)  # raises UnsupportedDType with the list of known dtypes
    if isinstance(chunk, torch.Tensor) and chunk.device.type != "cpu" and device_chunk is None:
        device_chunk = chunk.reshape(-1).view(torch.uint8)
    host = _host_u8(chunk)
    if not out.is_contiguous() or out.numel() * out.element_size() != n * itemsize:
        raise ValueError(f"out must be a contiguous tensor of {n * itemsize} bytes for {n} {dtype} values")
    if device_chunk is not None and (device_chunk.numel() != host.size or device_chunk.device != out.device):
        raise ValueError("device_chunk must be the same stream as chunk, on out's device")
    out_bytes = out.reshape(-1).view(torch.uint8)
    mode = blocks.chunk_mode(host)
    layout = layout_for(dtype)
    if mode == blocks.MODE_RAW:
        payload = blocks.decode_raw(host, itemsize, n)  # checks the header and the size
        if device_chunk is not None:
            out_bytes.copy_(device_chunk[blocks.RAW_HEADER.size :])
        elif payload.size:
            out_bytes.copy_(_from_host(payload, "cpu"))
        return out
    if mode == blocks.MODE_LANES and layout is not None:
        plan = blocks.parse_lanes(host, layout, n)
        if device_chunk is None:
            device_chunk = upload_chunk(host, out.device)
        words = out_bytes.view(getattr(torch, _WORD[layout.bits]))  # out may be any dtype, a byte view too
        decode_lanes_device(device_chunk, plan, layout, words, host_buf=host, cpu_impl=cpu_impl, **kernel_options)
        return out
    if layout is None:
        raise CorruptData(f"a chunk of dtype {dtype} must be stored (mode 0), found mode {mode}; the file is corrupt")
    # Mode 2 (Huffman) and unknown modes: the CPU decoder checks and decodes (or raises).
    from . import chunks

    values = chunks.decode_chunk(host, dtype, n, impl=cpu_impl)
    out_bytes.copy_(_from_host(values, "cpu"))
    return out
