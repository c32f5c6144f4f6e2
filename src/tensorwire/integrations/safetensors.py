"""Compress .safetensors files and Hugging Face model folders to .twz, and back.

Both directions stream: a chunk is read, coded and written before the next one is read,
so peak memory is a few chunks whatever the checkpoint size. The original safetensors
header is kept in the container's index, so decompression reproduces the original file
byte for byte (header, tensor order and padding included).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.frame import DEFAULT_CHUNK_BYTES
from ..codec.planes import DTYPE_ITEMSIZE
from ..container.reader import TwzFile
from ..container.writer import Writer, atomic_output
from ..errors import CorruptData, FormatError, Truncated, UnsupportedDType

__all__ = [
    "read_header",
    "compress_file",
    "decompress_file",
    "compress_folder",
    "decompress_folder",
    "compress_path",
    "decompress_path",
    "compressed_path",
    "restored_path",
]

Progress = Callable[[int], None]
MAX_HEADER = 100 << 20  # safetensors' own limit


def read_header(path: str | os.PathLike[str]) -> tuple[bytes, dict[str, Any], int]:
    """Return ``(raw header bytes, parsed header, data start)`` of a safetensors file, checked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise Truncated(f"{path} has {size} bytes; a safetensors file starts with an 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: header length {n} does not fit a {size}-byte file; not a valid safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_ITEMSIZE:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise UnsupportedDType(f"{path}: tensor {name!r} has dtype {dtype!r}; tensorwire stores {sorted(DTYPE_ITEMSIZE)}")
        begin, end = info["data_offsets"]
        numel = int(np.prod(info["shape"], dtype=object)) if info["shape"] else 1
        if end - begin != numel * DTYPE_ITEMSIZE[info["dtype"]] or not 0 <= begin <= end <= data_len:
            raise FormatError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not match its shape")
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise FormatError(f"{path}: tensor data has a gap or overlap at byte {covered}; not a valid safetensors file")
        covered = end
    if covered != data_len:
        raise FormatError(f"{path}: {data_len - covered} trailing bytes after the last tensor; not a valid safetensors file")
    return raw, header, 8 + n


def _read_chunks(f, start: int, nbytes: int, step: int, progress: Progress | None) -> Iterator[np.ndarray]:
    buf = np.empty(min(step, nbytes), dtype=np.uint8)
    f.seek(start)
    for at in range(0, nbytes, step):
        view = buf[: min(step, nbytes - at)]
        if f.readinto(memoryview(view)) != view.size:
            raise Truncated(f"safetensors data ended early at byte {start + at}")
        yield view
        if progress:
            progress(view.size)


def compress_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    level: str = "fast",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
) -> None:
    """Compress one .safetensors file to .twz (atomic; memory bounded by a few chunks)."""
    raw, header, data_start = read_header(src)
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    metadata = header.get("__metadata__") or {}
    with open(src, "rb") as f, atomic_output(dst) as out:
        writer = Writer(out, level=level, chunk_bytes=chunk_bytes)
        for name, info in tensors:
            begin, end = info["data_offsets"]
            step = writer.chunk_values(info["dtype"]) * DTYPE_ITEMSIZE[info["dtype"]]
            chunks = _read_chunks(f, data_start + begin, end - begin, step, progress)
            writer.add_chunks(name, info["dtype"], tuple(info["shape"]), chunks)
        writer.finish(metadata, source={"kind": "safetensors", "header": raw.decode("utf-8")})


def _safetensors_header(twz: TwzFile) -> tuple[bytes, dict[str, int]]:
    """The original header when the file came from safetensors, else a canonical one."""
    source = twz.index.source or {}
    if source.get("kind") == "safetensors" and isinstance(source.get("header"), str):
        raw = source["header"].encode("utf-8")
        try:
            parsed = json.loads(raw)
            offsets = {name: parsed[name]["data_offsets"][0] for name in twz.keys()}
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            raise CorruptData(f"stored safetensors header does not match the tensors ({exc})") from None
        return raw, offsets
    header: dict[str, Any] = {}
    if twz.index.metadata:
        header["__metadata__"] = twz.index.metadata
    offsets, at = {}, 0
    for entry in twz.index.tensors:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [at, at + entry.nbytes]}
        offsets[entry.name] = at
        at += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return raw, offsets


def decompress_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], progress: Progress | None = None) -> None:
    """Write the .safetensors file a .twz came from (byte-identical when it came from one)."""
    with TwzFile(src) as twz, atomic_output(dst) as out:
        raw, offsets = _safetensors_header(twz)
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        data_start = 8 + len(raw)
        for entry in sorted(twz.index.tensors, key=lambda e: offsets[e.name]):
            out.seek(data_start + offsets[entry.name])
            for _, data in twz.iter_chunk_bytes(entry):
                out.write(memoryview(data))
                if progress:
                    progress(data.size)


# ----------------------------------------------------------------------------- folders

INDEX_SUFFIX = ".safetensors.index.json"
TWZ_INDEX_SUFFIX = ".twz.index.json"
SOURCE_INDEX_KEY = "tensorwire_source_index"


def compress_folder(src: Path, dst: Path, level: str = "fast", chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: Progress | None = None) -> list[Path]:
    """Compress every ``*.safetensors`` shard of a model folder; copy the other files.

    The shard index ``*.safetensors.index.json`` is rewritten as ``*.twz.index.json`` with
    its weight map pointing at the ``.twz`` shards.
    """
    written = []
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_dir():
            continue
        if path.suffix == ".safetensors":
            target = dst / (path.stem + ".twz")
            compress_file(path, target, level, chunk_bytes, progress)
        elif path.name.endswith(INDEX_SUFFIX):
            original = path.read_text()
            index = json.loads(original)
            index["weight_map"] = {k: v.removesuffix(".safetensors") + ".twz" for k, v in index.get("weight_map", {}).items()}
            index[SOURCE_INDEX_KEY] = original  # restored verbatim by decompress_folder
            target = dst / (path.name.removesuffix(INDEX_SUFFIX) + TWZ_INDEX_SUFFIX)
            target.write_text(json.dumps(index, indent=2))
        else:
            target = dst / path.name
            shutil.copy2(path, target)
        written.append(target)
    return written


def decompress_folder(src: Path, dst: Path, progress: Progress | None = None) -> list[Path]:
    """Inverse of :func:`compress_folder`."""
    written = []
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_dir():
            continue
        if path.suffix == ".twz":
            target = dst / (path.stem + ".safetensors")
            decompress_file(path, target, progress)
        elif path.name.endswith(TWZ_INDEX_SUFFIX):
            index = json.loads(path.read_text())
            target = dst / (path.name.removesuffix(TWZ_INDEX_SUFFIX) + INDEX_SUFFIX)
            if isinstance(index.get(SOURCE_INDEX_KEY), str):
                target.write_text(index[SOURCE_INDEX_KEY])
            else:
                index["weight_map"] = {k: v.removesuffix(".twz") + ".safetensors" for k, v in index.get("weight_map", {}).items()}
                target.write_text(json.dumps(index, indent=2))
        else:
            target = dst / path.name
            shutil.copy2(path, target)
        written.append(target)
    return written


def compressed_path(src: Path) -> Path:
    """Where ``compress`` writes by default: ``X.safetensors`` → ``X.twz``, ``M/`` → ``M-twz/``."""
    return src.with_name(src.name + "-twz") if src.is_dir() else src.with_suffix(".twz")


def restored_path(src: Path) -> Path:
    """Where ``decompress`` writes by default: ``X.twz`` → ``X.safetensors``, ``M-twz/`` → ``M-restored/``."""
    return src.with_name(src.name.removesuffix("-twz") + "-restored") if src.is_dir() else src.with_suffix(".safetensors")


def compress_path(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Compress a file (``X.safetensors`` → ``X.twz``) or a model folder (``M`` → ``M-twz``)."""
    src = Path(src)
    target = Path(dst) if dst else compressed_path(src)
    if src.is_dir():
        compress_folder(src, target, **kwargs)
    else:
        compress_file(src, target, **kwargs)
    return target


def decompress_path(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Decompress a file (``X.twz`` → ``X.safetensors``) or a folder (``M-twz`` → ``M``-restored)."""
    src = Path(src)
    target = Path(dst) if dst else restored_path(src)
    if src.is_dir():
        decompress_folder(src, target, **kwargs)
    else:
        decompress_file(src, target, **kwargs)
    return target
