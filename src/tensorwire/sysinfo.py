"""The machine a measurement was taken on, recorded with every benchmark and profile."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["machine_info", "package_version"]


def package_version(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _threading_layer() -> str | None:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            found = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        found = None
    return found or platform.processor() or platform.machine()


def machine_info(packages: Sequence[str] = ()) -> dict[str, Any]:
    """CPU, cores, load, platform, and the versions of tensorwire, the codec libraries and ``packages``.

    When torch is imported, its thread count is recorded too (it sets how fast the model runs).
    """
    import numba

    from . import __version__

    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numba_threads_max": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": _threading_layer(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "tensorwire": __version__,
            "numpy": np.__version__,
            "numba": numba.__version__,
            **{d: package_version(d) for d in ("zstandard", "lz4", "zipnn", "numcodecs", "ml_dtypes", *packages)},
        },
    }
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info
