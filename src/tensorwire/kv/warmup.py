"""Compile (or load) every KV kernel ahead of the first real cache.

The stages' numba kernels compile on first use, about 10 s for a KIVI + ans pipeline on a
2-core machine, and later processes load them from numba's on-disk cache in well under a
second. :func:`warm_up` runs the pipelines once on a small synthetic cache: numba
specialises on dtypes and layouts, not sizes, so that is every kernel a real cache of the
same float32 layout needs. ``scripts/setup.sh`` runs it once (``tensorwire kv warm``) so
that no process of a fresh install compiles on a request's path; serving workers also
call :func:`warm_up` with a real cache at start, and the vLLM connector with a synthetic
cache of its model's shape. Without it a decode worker's first 512-token transfer took
0.49 s instead of about 0.05 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from .pipeline import Pipeline
from .stage import KVCacheData, KVLayer, Observations

__all__ = ["synthetic_cache", "warm_up", "shipped_pipelines"]


def synthetic_cache(n_layers: int = 2, kv_heads: int = 2, tokens: int = 96, head_dim: int = 64,
                    q_heads: int | None = None, window: int = 16, seed: int = 0) -> KVCacheData:  # fmt: skip
    """A small float32 cache with observations, shaped like a real one (batch 1; ``q_heads``: 2 per KV head)."""
    rng = np.random.default_rng(seed)
    q_heads = q_heads or 2 * kv_heads
    shape = (1, kv_heads, tokens, head_dim)
    positions = np.broadcast_to(np.arange(tokens, dtype=np.int64), shape[:3]).copy()
    layers = [KVLayer(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32),
                      positions.copy()) for _ in range(n_layers)]  # fmt: skip
    queries = [rng.standard_normal((1, q_heads, window, head_dim), dtype=np.float32) for _ in range(n_layers)]
    return KVCacheData(layers, seq_len=tokens, observations=Observations(queries))


def shipped_pipelines() -> list[dict]:
    """Every preset and every profile of the shipped library."""
    from ..data import SMOLLM2_LIBRARY
    from .presets import PRESETS
    from .profiles import ProfileLibrary

    library = ProfileLibrary.load(SMOLLM2_LIBRARY)
    return [*PRESETS.values(), *(profile.pipeline for profile in library)]


def warm_up(pipelines: Iterable[dict] | None = None, cache: KVCacheData | None = None) -> float:
    """Encode and decode ``cache`` with each pipeline config; returns the seconds it took.

    ``pipelines`` defaults to :func:`shipped_pipelines`, ``cache`` to a
    :func:`synthetic_cache` of the shipped library's model shape (some profiles, such as
    ``mixed`` widths, hold one setting per layer of that model).
    """
    began = time.perf_counter()
    if cache is None:
        from ..data import SMOLLM2_LIBRARY
        from .profiles import ProfileLibrary

        model = ProfileLibrary.load(SMOLLM2_LIBRARY).model
        cache = synthetic_cache(n_layers=model.n_layers, kv_heads=model.kv_heads, head_dim=model.head_dim)
    for config in shipped_pipelines() if pipelines is None else pipelines:
        Pipeline.decode_data(Pipeline.from_config(config).encode(cache))
    return time.perf_counter() - began
