"""The standalone frame: one array, self-describing, as returned by ``tensorwire.compress``.

Layout (docs/FORMAT.md, "Frame"): a fixed header, the shape, a chunk table with an XXH3-64
checksum per chunk, then the chunk streams of ``chunks.py``. Everything is checked before
a single value is decoded, so a truncated or altered frame raises a named error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ..errors import BadMagic, ChecksumMismatch, CorruptData, Truncated, UnsupportedVersion
from .blocks import BLOCK
from .chunks import LEVELS, Impl, Level, decode_chunk, encode_chunk
from .dtypes import DTYPE_CODES, CODE_DTYPES, numpy_dtype, dtype_name_of
from .planes import DTYPE_ITEMSIZE, LAYOUTS

__all__ = ["EnecCodec", "FRAME_MAGIC", "FRAME_VERSION", "DEFAULT_CHUNK_BYTES", "values_per_chunk"]

FRAME_MAGIC = b"\x89TWF\r\n\x1a\n"
FRAME_VERSION = 2  # what this build writes; 2 added chunk mode 3 (narrow)
FRAME_READABLE_VERSIONS = (1, 2)
FRAME_HEADER = struct.Struct("<8sHHBBHI")  # magic, version, flags, dtype, ndim, reserved, n_chunks
CHUNK_ENTRY = struct.Struct("<QQQ")  # values, bytes, xxh3_64 of the chunk stream
MAX_NDIM = 64
DEFAULT_CHUNK_BYTES = 4 << 20


def values_per_chunk(itemsize: int, chunk_bytes: int) -> int:
    """Values in each full chunk: ``chunk_bytes`` worth, a whole number of blocks."""
    return max(BLOCK, (chunk_bytes // itemsize) // BLOCK * BLOCK)


def checksum(buf) -> int:
    return xxhash.xxh3_64_intdigest(buf)


@dataclass(frozen=True)
class EnecCodec:
    """The lossless ENEC float codec with the numcodecs contract.

    Parameters
    ----------
    level : {"fast", "max"}
        ``"fast"``: fixed-width block codes (fastest). ``"max"``: Huffman-coded exponents
        (closest to the entropy bound).
    chunk_bytes : int
        Original bytes per independently decodable chunk.

    Examples
    --------
    >>> import numpy as np
    >>> codec = EnecCodec()
    >>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
    >>> bool((codec.decode(codec.encode(x)) == x).all())
    True
    """

    level: Level = "fast"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    codec_id = "tensorwire.enec"

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}; expected one of {LEVELS}")
        if self.chunk_bytes < BLOCK * 4:
            raise ValueError(f"chunk_bytes must be at least {BLOCK * 4}, got {self.chunk_bytes}")

    def to_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level, "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "EnecCodec":
        config = dict(config)
        if config.pop("id", cls.codec_id) != cls.codec_id:
            raise ValueError(f"config is not for {cls.codec_id}: {config}")
        return cls(**config)

    def encode(self, array: np.ndarray, impl: Impl = "cpu") -> bytes:
        """Compress a numpy array (ml_dtypes bfloat16/float8 included) to a frame.

        ``tensorwire.compress`` also takes torch tensors; the codec layer works on numpy only.
        """
        arr = np.asarray(array)
        name = dtype_name_of(arr.dtype)
        itemsize = DTYPE_ITEMSIZE[name]
        flat = np.ascontiguousarray(arr).reshape(-1)
        step = values_per_chunk(itemsize, self.chunk_bytes)
        streams = [encode_chunk(flat[i : i + step], name, self.level, impl) for i in range(0, flat.size, step)]
        counts = [min(step, flat.size - i) for i in range(0, flat.size, step)]
        header = FRAME_HEADER.pack(FRAME_MAGIC, FRAME_VERSION, 0, DTYPE_CODES[name], arr.ndim, 0, len(streams))
        shape = struct.pack(f"<{arr.ndim}Q", *arr.shape)
        table = b"".join(CHUNK_ENTRY.pack(c, s.size, checksum(s)) for c, s in zip(counts, streams))
        return b"".join([header, shape, table, *map(memoryview, streams)])  # one copy of each stream

    def decode(self, buf, out: np.ndarray | None = None, impl: Impl = "cpu") -> np.ndarray:
        """Decompress a frame to a numpy array (written into ``out`` when given)."""
        data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
        name, shape, entries, body_at = _parse_header(data)
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        dtype = numpy_dtype(name)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}")
        flat = out.reshape(-1).view(np.uint8)
        itemsize = DTYPE_ITEMSIZE[name]
        at, value_at = body_at, 0
        for index, (count, size, digest) in enumerate(entries):
            stream = data[at : at + size]
            if checksum(stream) != digest:
                raise ChecksumMismatch(
                    f"chunk {index} checksum is {checksum(stream):016x}, expected {digest:016x}: "
                    "the data was altered after compression; recover it from its source"
                )
            decode_chunk(stream, name, count, flat[value_at * itemsize : (value_at + count) * itemsize], impl)
            at += size
            value_at += count
        if value_at != numel:  # pragma: no cover - guarded by _parse_header
            raise CorruptData(f"chunks hold {value_at} values, shape needs {numel}")
        return out


def _parse_header(data: np.ndarray) -> tuple[str, tuple[int, ...], list[tuple[int, int, int]], int]:
    if data.size < len(FRAME_MAGIC) or data[: len(FRAME_MAGIC)].tobytes() != FRAME_MAGIC:
        found = data[: len(FRAME_MAGIC)].tobytes()
        raise BadMagic(f"not a tensorwire frame: starts with {found!r}, expected {FRAME_MAGIC!r}")
    if data.size < FRAME_HEADER.size:
        raise Truncated(f"frame has {data.size} bytes, fewer than its {FRAME_HEADER.size}-byte header")
    _, version, flags, code, ndim, reserved, n_chunks = FRAME_HEADER.unpack_from(data[: FRAME_HEADER.size].tobytes())
    if version not in FRAME_READABLE_VERSIONS:
        raise UnsupportedVersion(
            f"frame version {version}, this build reads versions {FRAME_READABLE_VERSIONS}: upgrade tensorwire to read it"
        )
    if flags or reserved:
        raise CorruptData(f"reserved frame fields are flags={flags}, reserved={reserved}; expected 0")
    if code not in CODE_DTYPES:
        raise CorruptData(f"unknown dtype code {code}; known codes are {sorted(CODE_DTYPES)}")
    if ndim > MAX_NDIM:
        raise CorruptData(f"frame declares {ndim} dimensions, more than the {MAX_NDIM} allowed")
    table_at = FRAME_HEADER.size + 8 * ndim
    body_at = table_at + CHUNK_ENTRY.size * n_chunks
    if body_at > data.size:
        raise Truncated(f"frame header and chunk table need {body_at} bytes, the frame has {data.size}")
    shape = struct.unpack_from(f"<{ndim}Q", data[FRAME_HEADER.size : table_at].tobytes())
    entries = [CHUNK_ENTRY.unpack_from(data[table_at + CHUNK_ENTRY.size * i : table_at + CHUNK_ENTRY.size * (i + 1)].tobytes()) for i in range(n_chunks)]
    numel = 1
    for d in shape:
        numel *= d
    if sum(e[0] for e in entries) != numel:
        raise CorruptData(f"chunks declare {sum(e[0] for e in entries)} values, the shape {shape} holds {numel}")
    total = sum(e[1] for e in entries)
    if body_at + total != data.size:
        kind = Truncated if body_at + total > data.size else CorruptData
        raise kind(f"chunk table covers {body_at + total} bytes, the frame has {data.size}")
    name = CODE_DTYPES[code]
    for count, size, _ in entries:
        check_plausible(count, size, name)
    return name, tuple(shape), entries, body_at


def check_plausible(count: int, size: int, dtype: str) -> None:
    """Refuse value counts no chunk of ``size`` bytes could hold, before anything is allocated."""
    if count > max_values(size, dtype):
        raise CorruptData(
            f"a chunk of {size} bytes cannot hold {count} {dtype} values; the header is corrupt"
        )


def max_values(size: int, dtype: str) -> int:
    # The densest stream spends at least one bit per value (Huffman) plus its raw bytes.
    layout = LAYOUTS.get(dtype)
    if layout is None:
        return size // DTYPE_ITEMSIZE[dtype]
    return 8 * size
