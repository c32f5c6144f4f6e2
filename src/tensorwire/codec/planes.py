"""Float bit layouts and the split of each value into an exponent field and raw bits.

This module is the specification in code (docs/FORMAT.md, "Planes"). For a float of
``bits`` bits with ``exp_bits`` exponent bits and ``man_bits`` mantissa bits:

* ``exponent = (v >> man_bits) & (2**exp_bits - 1)``
* ``raw = (v & (2**man_bits - 1)) | (sign << man_bits)``: the sign moved just above the
  mantissa, ``1 + man_bits`` bits in all. Its low ``raw_bytes`` whole bytes are stored as
  byte planes; the ``rem_bits`` left over (the sign and the top mantissa bits) travel with
  the exponent code inside the block symbols.

Everything here works on unsigned integer views, so NaN payloads, infinities, subnormals
and -0.0 are just bit patterns and survive unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedDType

__all__ = ["FloatLayout", "LAYOUTS", "DTYPE_ITEMSIZE", "layout_for", "narrow_shifts", "narrowed", "split", "merge"]


@dataclass(frozen=True)
class FloatLayout:
    """Bit layout of one floating-point dtype, named by its safetensors dtype string."""

    name: str
    bits: int
    exp_bits: int
    man_bits: int

    @property
    def uint(self) -> np.dtype:
        """The smallest unsigned word that holds ``bits`` bits (a narrowed layout's may be wider)."""
        return np.dtype(f"<u{1 if self.bits <= 8 else 2 if self.bits <= 16 else 4}")

    @property
    def raw_bits(self) -> int:
        return 1 + self.man_bits

    @property
    def raw_bytes(self) -> int:
        """Whole bytes of the raw field stored as byte planes."""
        return self.raw_bits // 8

    @property
    def rem_bits(self) -> int:
        """Raw bits that do not fill a byte; they ride in the low bits of each block symbol."""
        return self.raw_bits % 8

    @property
    def exp_mask(self) -> int:
        return (1 << self.exp_bits) - 1


LAYOUTS: dict[str, FloatLayout] = {
    layout.name: layout
    for layout in (
        FloatLayout("BF16", 16, 8, 7),
        FloatLayout("F16", 16, 5, 10),
        FloatLayout("F32", 32, 8, 23),
        FloatLayout("F8_E4M3", 8, 4, 3),
        FloatLayout("F8_E5M2", 8, 5, 2),
    )
}

# Every dtype the container stores, with its item size. Non-float dtypes are stored raw.
DTYPE_ITEMSIZE: dict[str, int] = {
    "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
    "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1,
}  # fmt: skip


def layout_for(dtype_name: str) -> FloatLayout | None:
    """The float layout for a dtype name, or ``None`` for dtypes that are stored raw."""
    if dtype_name not in DTYPE_ITEMSIZE:
        raise UnsupportedDType(
            f"dtype {dtype_name!r} is not supported; expected one of {sorted(DTYPE_ITEMSIZE)}"
        )
    return LAYOUTS.get(dtype_name)


def narrowed(layout: FloatLayout, shift: int) -> FloatLayout:
    """The layout of ``v >> shift`` for values whose ``shift`` lowest mantissa bits are zero.

    Such values come from a narrower float (f32 upcast from bf16 has 16 zero bits, f16 cast
    from bf16 has 3): dropping the zeros leaves a float of ``bits - shift`` bits with the same
    exponent and ``man_bits - shift`` mantissa bits, which the same kernels code.
    """
    return FloatLayout(f"{layout.name}>>{shift}", layout.bits - shift, layout.exp_bits, layout.man_bits - shift)


@functools.cache
def narrow_shifts(layout: FloatLayout) -> tuple[int, ...]:
    """The shifts a layout can be narrowed by, ascending (none for bf16).

    A narrowed layout must keep every block symbol in a byte (``exp_bits + rem_bits <= 8``),
    so an f32 drops 8 or 16 bits, never 13 (an f16 upcast to f32): 16 - 3 raw bits would not fit.
    """
    return tuple(s for s in range(1, layout.man_bits + 1) if layout.exp_bits + narrowed(layout, s).rem_bits <= 8)


def split(values: np.ndarray, layout: FloatLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split unsigned words into ``(exponent, byte_planes, rem)``.

    ``exponent`` and ``rem`` are uint8 arrays of the same length as ``values``;
    ``byte_planes`` has shape ``(raw_bytes, n)``, plane ``p`` holding byte ``p`` of the raw field.
    """
    v = np.ascontiguousarray(values, dtype=layout.uint).astype(np.uint32)
    exponent = ((v >> layout.man_bits) & layout.exp_mask).astype(np.uint8)
    sign = v >> (layout.bits - 1)
    raw = (v & ((1 << layout.man_bits) - 1)) | (sign << layout.man_bits)
    planes = np.empty((layout.raw_bytes, v.size), dtype=np.uint8)
    for p in range(layout.raw_bytes):
        planes[p] = (raw >> (8 * p)) & 0xFF
    rem = (raw >> (8 * layout.raw_bytes)).astype(np.uint8)
    return exponent, planes, rem


def merge(
    exponent: np.ndarray, planes: np.ndarray, rem: np.ndarray, layout: FloatLayout
) -> np.ndarray:
    """Inverse of :func:`split`: rebuild the unsigned words."""
    raw = rem.astype(np.uint32) << (8 * layout.raw_bytes)
    for p in range(layout.raw_bytes):
        raw |= planes[p].astype(np.uint32) << (8 * p)
    sign = raw >> layout.man_bits
    v = (sign << (layout.bits - 1)) | (exponent.astype(np.uint32) << layout.man_bits)
    v |= raw & ((1 << layout.man_bits) - 1)
    return v.astype(layout.uint)
