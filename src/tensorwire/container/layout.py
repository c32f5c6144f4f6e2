"""Byte layout of the .twz container (docs/FORMAT.md, "Container"): constants and index checks.

```
preamble  16 B   magic "\\x89TWZ\\r\\n\\x1a\\n", u16 version, u16 flags (0), u32 reserved (0)
chunks           chunk streams, at the offsets the index gives
index            UTF-8 JSON: metadata, tensors, their chunks (values, offset, size, xxh3-64)
footer    40 B   u64 index offset, u64 index size, u64 xxh3-64 of the index, u64 reserved (0),
                 magic "TWZ-END\\n"
```
The index sits at the end so that a writer can stream chunks as it compresses them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..codec.frame import check_plausible
from ..codec.planes import DTYPE_ITEMSIZE
from ..errors import BadMagic, CorruptData, FormatError, Truncated, UnsupportedVersion

__all__ = [
    "MAGIC",
    "END_MAGIC",
    "VERSION",
    "READABLE_VERSIONS",
    "PREAMBLE",
    "FOOTER",
    "ChunkRef",
    "TensorEntry",
    "Index",
    "parse_preamble",
    "parse_footer",
    "parse_index",
]

MAGIC = b"\x89TWZ\r\n\x1a\n"
END_MAGIC = b"TWZ-END\n"
VERSION = 2  # what this build writes; 2 added chunk mode 3 (narrow)
READABLE_VERSIONS = (1, 2)
PREAMBLE = struct.Struct("<8sHHI")
FOOTER = struct.Struct("<QQQQ8s")
MAX_NDIM = 64
MAX_INDEX_BYTES = 1 << 30


@dataclass(frozen=True)
class ChunkRef:
    values: int
    offset: int
    size: int
    checksum: int


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: dict[str, Any]
    chunks: list[ChunkRef] = field(default_factory=list)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]

    @property
    def stored_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codec": self.codec,
            "chunks": [[c.values, c.offset, c.size, c.checksum] for c in self.chunks],
        }


@dataclass
class Index:
    tensors: list[TensorEntry]
    metadata: dict[str, str]
    source: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        doc = {
            "format": "tensorwire",
            "version": VERSION,
            "metadata": self.metadata,
            "source": self.source,
            "tensors": [t.to_json() for t in self.tensors],
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_preamble(data: bytes) -> None:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BadMagic(
            f"not a tensorwire file: starts with {bytes(data[:8])!r}, expected {MAGIC!r}. "
            "Is it a .safetensors file? Compress it with `tensorwire compress` first"
        )
    if len(data) < PREAMBLE.size:
        raise Truncated(f"file has {len(data)} bytes, fewer than the {PREAMBLE.size}-byte preamble")
    _, version, flags, reserved = PREAMBLE.unpack(data[: PREAMBLE.size])
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersion(
            f"file format version {version}; this build reads versions {READABLE_VERSIONS}: upgrade tensorwire"
        )
    if flags or reserved:
        raise CorruptData(f"reserved preamble fields are flags={flags}, reserved={reserved}; expected 0")


def parse_footer(data: bytes, file_size: int) -> tuple[int, int, int]:
    """Return (index offset, index size, index checksum) after checking them against the file size."""
    if file_size < PREAMBLE.size + FOOTER.size:
        raise Truncated(
            f"file has {file_size} bytes, fewer than a preamble and footer ({PREAMBLE.size + FOOTER.size}); "
            "it is truncated: compress the source again"
        )
    offset, size, checksum, reserved, magic = FOOTER.unpack(data)
    if magic != END_MAGIC:
        raise Truncated(
            f"file does not end with the footer magic {END_MAGIC!r} (found {magic!r}): it was truncated or "
            "not completely written; compress the source again"
        )
    if reserved:
        raise CorruptData(f"reserved footer field is {reserved}, expected 0")
    if offset < PREAMBLE.size or size > MAX_INDEX_BYTES or offset + size + FOOTER.size != file_size:
        raise CorruptData(
            f"footer places the index at {offset} with {size} bytes, which does not end at the footer of a "
            f"{file_size}-byte file; the file is corrupt"
        )
    return offset, size, checksum


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CorruptData(f"index is malformed: {what}; the file is corrupt")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_index(raw: bytes, index_offset: int) -> Index:
    """Decode and check the JSON index; every chunk must lie between the preamble and the index."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptData(f"index is not valid UTF-8 JSON ({exc}); the file is corrupt") from None
    _expect(isinstance(doc, dict) and doc.get("format") == "tensorwire", "no 'format': 'tensorwire' field")
    if doc.get("version") not in READABLE_VERSIONS:
        raise UnsupportedVersion(f"index version {doc.get('version')!r}; this build reads {READABLE_VERSIONS}: upgrade tensorwire")
    metadata = doc.get("metadata") or {}
    _expect(isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()),
            "metadata must map strings to strings")  # fmt: skip
    source = doc.get("source")
    _expect(source is None or isinstance(source, dict), "'source' must be an object")
    tensors_doc = doc.get("tensors")
    _expect(isinstance(tensors_doc, list), "'tensors' must be a list")
    tensors: list[TensorEntry] = []
    names: set[str] = set()
    for t in tensors_doc:
        _expect(isinstance(t, dict), "a tensor entry is not an object")
        name, dtype, shape, codec, chunks = (t.get(k) for k in ("name", "dtype", "shape", "codec", "chunks"))
        _expect(isinstance(name, str) and name not in names, f"tensor name {name!r} missing or repeated")
        names.add(name)
        _expect(dtype in DTYPE_ITEMSIZE, f"tensor {name!r} has unknown dtype {dtype!r}")
        _expect(isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_uint(d) for d in shape),
                f"tensor {name!r} has an invalid shape {shape!r}")  # fmt: skip
        _expect(isinstance(codec, dict), f"tensor {name!r} has no codec object")
        _expect(isinstance(chunks, list), f"tensor {name!r} has no chunk list")
        entry = TensorEntry(name, dtype, tuple(shape), codec)
        for c in chunks:
            _expect(isinstance(c, list) and len(c) == 4 and all(_is_uint(x) for x in c), f"tensor {name!r} has a bad chunk entry {c!r}")
            values, offset, size, checksum = c
            _expect(offset >= PREAMBLE.size and offset + size <= index_offset,
                    f"a chunk of {name!r} at {offset}+{size} lies outside the data region [{PREAMBLE.size}, {index_offset})")  # fmt: skip
            check_plausible(values, size, dtype)
            entry.chunks.append(ChunkRef(values, offset, size, checksum))
        _expect(sum(c.values for c in entry.chunks) == entry.numel,
                f"chunks of {name!r} hold {sum(c.values for c in entry.chunks)} values, its shape {tuple(shape)} needs {entry.numel}")  # fmt: skip
        tensors.append(entry)
    return Index(tensors, dict(metadata), source)


def check_not_empty_file(size: int) -> None:
    if size == 0:
        raise FormatError("file is empty: expected a tensorwire container; compress the source again")
