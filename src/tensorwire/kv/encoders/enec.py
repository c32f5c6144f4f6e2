"""The ``enec`` array encoder: tensorwire's own lossless block codec (the ENEC method) for KV planes.

Float planes go through the chunk streams of :mod:`tensorwire.codec.chunks` under their
own dtype (``"F32"``, ``"BF16"``, ``"F16"``, ``"F8_E4M3"``, ``"F8_E5M2"``): exponents
coded per block (level ``"fast"``) or Huffman coded (level ``"max"``), the sign and
mantissa bits stored as they are.

Code planes (uint8, ``bits`` in 1..8) are coded as if their bytes were ``F8_E4M3``
values. In that layout a value has 4 exponent bits and 1 + 3 sign/mantissa bits, so no
whole raw byte plane is left over (``raw_bytes = 0``) and all 8 bits of a byte ride in
its block symbol ``(exponent << 4) | (sign << 3) | mantissa``, a permutation of the
byte. Level ``"max"`` (the default; chunk mode 2) Huffman codes these symbols with a
canonical code per chunk, so it is an exact order-0 entropy coder of the code bytes:
less than ``H(codes) + 1`` bits per value, never less than 1 (use ``ans`` for 1-bit or
very skewed codes), plus a 256-byte length table per chunk; every byte value survives
bit-exactly. Level ``"fast"`` still stores the 4 sign/mantissa bits of every value, so
at least 4 bits per code: use it for floats, and ``"max"``,
:class:`~tensorwire.kv.encoders.ans.ANS` or :class:`~tensorwire.kv.encoders.raw.Raw` for
codes. Either level falls back to storing a chunk's bytes (8 bits per code) when coding
would not make it smaller, so on tiny planes ``raw`` packing is smaller.

Stream layout (little-endian; dtype, shape and bits come from the caller)::

    u32 size[ceil(n / 2**20)]     bytes of each chunk stream
    chunk stream 0 | 1 | ...      codec/chunks.py streams of modes 0-2; chunk i holds values [i*2**20, min(n, (i+1)*2**20))

Chunks of at most 2**20 values bound the codec's scratch memory and keep a chunk's byte
count within a u32 (4 MiB of float32). Chunk streams carry their own mode byte and are
validated by the codec; this layer checks that the sizes add up to the stream exactly and
that no chunk is asked for more values than its bytes could hold (every mode spends at
least one bit per value), before the output is allocated. A decoded code plane must hold only values ``< 2**bits``. Bit flips are found
where they break a structure (a Huffman code, a block width); others change values:
integrity is the payload's job, whose checksums cover every stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...codec.chunks import LEVELS, Level, decode_chunk, encode_chunk
from ...codec.frame import check_plausible
from ...codec.planes import DTYPE_ITEMSIZE
from ...errors import CorruptData, Truncated
from ..stage import ArrayEncoder, Plane
from .bitpack import check_codes
from .streams import as_bytes, check_request, plane_values

__all__ = ["CHUNK_VALUES", "CODE_LAYOUT", "Enec"]

CHUNK_VALUES = 1 << 20  # part of the stream format: never change
CODE_LAYOUT = "F8_E4M3"  # the layout code planes are coded in (all 8 bits in the block symbol)
_SIZE = np.dtype("<u4")


@dataclass(frozen=True)
class Enec(ArrayEncoder):
    """Lossless ENEC coding of float planes and (at level ``"max"``) entropy coding of code planes.

    Parameters
    ----------
    level : {"fast", "max"}
        ``"fast"``: fixed-width exponent codes per block of 256 values (fastest).
        ``"max"``: canonical Huffman codes per chunk (smallest; for code planes an exact
        byte-level entropy coder).

    Examples
    --------
    >>> import numpy as np
    >>> from tensorwire.kv.stage import Plane
    >>> codes = np.random.default_rng(0).binomial(15, 0.5, size=(1, 2, 300, 64)).astype(np.uint8)
    >>> enc = Enec(level="max")
    >>> data = enc.encode(Plane(codes, bits=4))
    >>> len(data) < codes.size * 4 // 8  # below 4 bits per code: the codes are not uniform
    True
    >>> bool((enc.decode(data, np.uint8, codes.shape, 4) == codes).all())
    True
    """

    level: Level = "max"
    id: ClassVar[str] = "enec"
    search_space: ClassVar[dict[str, tuple]] = {"level": ("fast", "max")}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(self.level in LEVELS, f"level must be one of {list(LEVELS)}, got {self.level!r}")

    def encode(self, plane: Plane) -> bytes:
        values, name = plane_values(plane)
        if name is None:
            check_codes(values, plane.bits)
        dtype_name = name or CODE_LAYOUT
        streams = [
            # No mode 3 (weight format version 2): KV payload version 1 readers know modes 0-2.
            encode_chunk(values[i : i + CHUNK_VALUES], dtype_name, self.level, narrow=False)
            for i in range(0, values.size, CHUNK_VALUES)
        ]
        table = np.array([s.size for s in streams], dtype=_SIZE)
        return b"".join([table.tobytes(), *map(memoryview, streams)])

    def decode(self, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], bits: int | None) -> np.ndarray:
        dtype, name, shape, n = check_request(dtype, shape, bits)
        dtype_name = name or CODE_LAYOUT
        buf = as_bytes(data)
        n_chunks = -(-n // CHUNK_VALUES)
        body_at = _SIZE.itemsize * n_chunks
        if buf.size < body_at:
            raise Truncated(
                f"{n} values need a table of {n_chunks} chunk sizes ({body_at} bytes), the stream has {buf.size} bytes"
            )
        sizes = buf[:body_at].view(_SIZE).astype(np.int64)
        end = body_at + int(sizes.sum())
        if end != buf.size:
            kind = Truncated if end > buf.size else CorruptData
            raise kind(f"chunk sizes cover {end} bytes, the stream has {buf.size}; the payload is damaged")
        counts = [min(CHUNK_VALUES, n - i) for i in range(0, n, CHUNK_VALUES)]
        for count, size in zip(counts, sizes.tolist()):
            check_plausible(count, size, dtype_name)  # before the output is allocated
        itemsize = DTYPE_ITEMSIZE[dtype_name]
        out = np.empty(n * itemsize, dtype=np.uint8)
        at, value_at = body_at, 0
        for count, size in zip(counts, sizes.tolist()):
            decode_chunk(
                buf[at : at + size], dtype_name, count, out[value_at * itemsize : (value_at + count) * itemsize]
            )
            at += size
            value_at += count
        if bits is not None and bits < 8 and n and int(out.max()) >> bits:
            raise CorruptData(
                f"decoded code {int(out.max())} does not fit in {bits} bits (expected < {1 << bits}); the stream is corrupt"
            )
        return out.view(dtype).reshape(shape)
