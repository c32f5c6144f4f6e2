"""``tensorwire verify``: every checksum, every chunk decoded, optionally compared to the source."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from ..container.reader import TwzFile
from ..errors import TensorwireError
from .safetensors import read_header

__all__ = ["VerifyReport", "verify_file", "sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB blocks (for byte-identity checks and data ids)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class VerifyReport:
    path: str
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    compared: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = "checksums, full decode" + (" and bit-exact match with the source" if self.compared else "")
        if self.ok:
            return f"OK {self.path}: {self.tensors} tensors, {self.bytes:,} bytes ({what})"
        return f"FAILED {self.path}: " + "; ".join(self.problems)


def verify_file(path: str | os.PathLike[str], against: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Decode every chunk of ``path`` (checking checksums); compare with ``against`` if given."""
    report = VerifyReport(str(path), compared=against is not None)
    with TwzFile(path) as twz:
        source = None
        if against is not None:
            _, header, data_start = read_header(against)
            source = open(against, "rb")
            missing = set(k for k in header if k != "__metadata__") ^ set(twz.keys())
            if missing:
                report.problems.append(f"tensor names differ from {against}: {sorted(missing)[:5]}")
        try:
            for entry in twz.index.tensors:
                try:
                    for at, data in twz.iter_chunk_bytes(entry):
                        if source is not None and entry.name in header:
                            info = header[entry.name]
                            if info["dtype"] != entry.dtype or list(info["shape"]) != list(entry.shape):
                                report.problems.append(f"{entry.name}: dtype/shape differ from the source")
                                break
                            source.seek(data_start + info["data_offsets"][0] + at)
                            if not np.array_equal(np.frombuffer(source.read(data.size), np.uint8), data):
                                report.problems.append(f"{entry.name}: bytes differ from the source at offset {at}")
                                break
                        report.bytes += data.size
                except TensorwireError as exc:
                    report.problems.append(f"{entry.name}: {type(exc).__name__}: {exc}")
                report.tensors += 1
        finally:
            if source is not None:
                source.close()
    return report
