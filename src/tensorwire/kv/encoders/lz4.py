"""The ``lz4`` bytes encoder: one LZ4 block (``lz4.block``) around the array encoder's bytes.

The stream is a bare LZ4 block (no frame, no stored size: the payload header gives the
exact decoded size), made in LZ4's default mode or, with ``level >= 1``, by LZ4-HC at
that level; both decode with the same fast decoder. Before allocating, the decoder checks
that the size is one an LZ4 block of so many bytes can reach (one byte of a block
expands to at most 255 bytes); LZ4's safe decoder then never writes past the size, and
a block that does not decode to exactly that size raises
:class:`~tensorwire.errors.CorruptData`. A cut block cannot be told apart from a damaged
one. LZ4 has no check of its own on literal bytes, so some bit flips decode to other
bytes of the right size: integrity is the payload's job, whose checksums cover every
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import CorruptData, require
from ..stage import BytesEncoder, is_int
from .streams import check_size

__all__ = ["LZ4", "MAX_LEVEL"]

MAX_LEVEL = 12  # LZ4HC_CLEVEL_MAX
MAX_RATIO = 256  # a match length grows by 255 per extra length byte


@dataclass(frozen=True)
class LZ4(BytesEncoder):
    """Compress bytes with LZ4: fastest of the general-purpose compressors, modest ratios.

    Parameters
    ----------
    level : int
        ``0``: LZ4's default mode (fastest). ``1..12``: LZ4-HC at that level (slower to
        compress, a little smaller, decodes as fast).

    Examples
    --------
    >>> c = LZ4()
    >>> data = bytes(range(16)) * 100
    >>> packed = c.encode(data)
    >>> len(packed) < 100 and c.decode(packed, len(data)) == data
    True
    """

    level: int = 0
    id: ClassVar[str] = "lz4"
    search_space: ClassVar[dict[str, tuple]] = {"level": (0, 9)}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(
            is_int(self.level, 0, MAX_LEVEL),
            f"level must be an int in 0..{MAX_LEVEL} (0: default mode, 1..12: LZ4-HC), got {self.level!r}",
        )

    def encode(self, data: bytes | memoryview) -> bytes:
        block = require("lz4.block")
        if self.level == 0:
            return block.compress(data, mode="default", store_size=False)
        return block.compress(data, mode="high_compression", compression=self.level, store_size=False)

    def decode(self, data: bytes | memoryview, size: int) -> bytes:
        block = require("lz4.block")
        view = memoryview(data).cast("B")
        size = check_size(size, view.nbytes, MAX_RATIO, "lz4")
        try:
            out = block.decompress(view, uncompressed_size=size)
        except block.LZ4BlockError as exc:
            raise CorruptData(
                f"the lz4 block is damaged or truncated (lz4 says: {exc}); the payload is corrupt"
            ) from exc
        if len(out) != size:
            raise CorruptData(
                f"the lz4 block decodes to {len(out)} bytes, the payload header says {size}; the payload is corrupt"
            )
        return out
