"""The ``raw`` array encoder: floats as their bytes, codes bit-packed. No compression beyond that.

Stream layout (the decoder gets dtype, shape and bits from the caller, so nothing else is stored):

* a float plane (float32, float16, bfloat16, float8_e4m3fn, float8_e5m2): its values'
  little-endian bytes in C order, ``n * itemsize`` bytes;
* a code plane (uint8 with ``bits`` in 1..8): the codes packed at ``bits`` bits each,
  LSB-first, in one contiguous bitstream padded with zero bits to a whole byte
  (``ceil(n * bits / 8)`` bytes; see :mod:`.bitpack` for the bit order).

The decoder checks the stream length exactly and that the padding bits are zero. Beyond
that every stream is valid (any bit pattern is some floats or some codes ``< 2**bits``):
integrity is the payload's job, whose checksums cover every stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import ArrayEncoder, Plane
from . import bitpack
from .streams import as_bytes, check_request, decode_floats, encode_floats, plane_values

__all__ = ["Raw"]


@dataclass(frozen=True)
class Raw(ArrayEncoder):
    """Store a plane as it is: float bytes, or codes bit-packed at ``bits`` bits per value.

    The baseline every other encoder is measured against, and the fastest: packing and
    unpacking run at several GB/s per thread (numba kernels in :mod:`.bitpack`).

    Examples
    --------
    >>> import numpy as np
    >>> from tensorwire.kv.stage import Plane
    >>> codes = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    >>> data = Raw().encode(Plane(codes, bits=2))
    >>> len(data)  # 6 codes x 2 bits = 12 bits -> 2 bytes
    2
    >>> Raw().decode(data, np.uint8, (2, 3), 2).tolist()
    [[0, 1, 2], [3, 2, 1]]
    """

    id: ClassVar[str] = "raw"
    search_space: ClassVar[dict[str, tuple]] = {}  # joins the offline search; no parameters

    def encode(self, plane: Plane) -> bytes:
        values, name = plane_values(plane)
        if name is not None:
            return encode_floats(values)
        return bitpack.pack(values, plane.bits).tobytes()

    def decode(self, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], bits: int | None) -> np.ndarray:
        dtype, name, shape, n = check_request(dtype, shape, bits)
        if name is not None:
            return decode_floats(data, dtype, name, shape, n)
        return bitpack.unpack(as_bytes(data), bits, n).reshape(shape)
