"""Describe a .twz file from its index alone, without decoding a tensor."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

from ..codec.blocks import MODE_HUFFMAN, MODE_LANES, MODE_NARROW, MODE_RAW
from .reader import TwzFile

__all__ = ["describe"]

MODE_NAMES = {MODE_RAW: "stored", MODE_LANES: "lanes", MODE_HUFFMAN: "huffman", MODE_NARROW: "narrow"}


def describe(path: str | os.PathLike[str], modes: bool = True) -> dict[str, Any]:
    """Header, totals and per-tensor ratios. ``modes`` reads each chunk's first byte (no decode)."""
    with TwzFile(path) as f:
        tensors = []
        for entry in f.index.tensors:
            chunk_modes: Counter[str] = Counter()
            if modes:
                for chunk in entry.chunks:
                    mode = f.read_range(chunk.offset, 1)[0]
                    chunk_modes[MODE_NAMES.get(mode, f"unknown({mode})")] += 1
            tensors.append(
                {
                    "name": entry.name,
                    "dtype": entry.dtype,
                    "shape": list(entry.shape),
                    "bytes": entry.nbytes,
                    "stored": entry.stored_bytes,
                    "ratio": entry.nbytes / entry.stored_bytes if entry.stored_bytes else float("nan"),
                    "chunks": len(entry.chunks),
                    "modes": dict(chunk_modes),
                    "level": entry.codec.get("level"),
                }
            )
        original = sum(t["bytes"] for t in tensors)
        return {
            "path": str(path),
            "file_bytes": f.size,
            "original_bytes": original,
            "ratio": original / f.size if f.size else float("nan"),
            "metadata": f.metadata(),
            "source": (f.index.source or {}).get("kind"),
            "tensors": tensors,
            "dtypes": dict(Counter(t["dtype"] for t in tensors)),
            "median_tensor_ratio": float(np.median([t["ratio"] for t in tensors])) if tensors else float("nan"),
        }
