"""Hypothesis strategies and hand-picked awkward inputs for lossless float codecs.

Arrays are built from raw bit patterns, so NaN payloads, signalling NaNs, infinities,
subnormals and -0.0 occur naturally; ``awkward_values`` adds them on purpose.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..codec.planes import LAYOUTS, FloatLayout

__all__ = ["awkward_values", "raw_words", "weight_like", "kv_tensor", "kv_like", "kv_cache_data", "kv_caches"]


def awkward_values(layout: FloatLayout) -> np.ndarray:
    """Every special class of value of a layout, as unsigned words."""
    bits, man, exp = layout.bits, layout.man_bits, layout.exp_bits
    top = 1 << (bits - 1)
    all_exp = ((1 << exp) - 1) << man
    words = [
        0, top,  # +0.0, -0.0
        1, top | 1, (1 << man) - 1,  # smallest and largest subnormals
        1 << man, all_exp - 1,  # smallest normal, a large finite value
        all_exp, top | all_exp,  # +-inf (e4m3fn: NaN patterns, still just bits)
        all_exp | 1, all_exp | ((1 << man) - 1), top | all_exp | (1 << (man - 1)),  # NaN payloads
        (1 << bits) - 1,
    ]  # fmt: skip
    return np.array(words, dtype=np.uint64).astype(layout.uint)


def weight_like(layout: FloatLayout, n: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights with a few zeros and outliers (for correctness, never for ratios)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float64) * 0.02
    if n == 0:
        x = x[:0]
    else:
        x[rng.integers(0, n, size=max(1, n // 100))] = 0.0
        x[rng.integers(0, n, size=max(1, n // 500))] *= 1e4
    import ml_dtypes

    dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[layout.name]  # fmt: skip
    with np.errstate(over="ignore"):
        return x.astype(dtype).view(layout.uint)


@st.composite
def raw_words(draw, layout_name: str | None = None, max_size: int = 2000):
    """``(layout, words)``: arbitrary bit patterns mixed with awkward and weight-like values."""
    name = layout_name or draw(st.sampled_from(sorted(LAYOUTS)))
    layout = LAYOUTS[name]
    n = draw(st.integers(0, max_size))
    kind = draw(st.sampled_from(["bits", "weights", "mixed"]))
    if kind == "bits":
        words = draw(hnp.arrays(layout.uint, n))
    else:
        words = weight_like(layout, n, seed=draw(st.integers(0, 2**16)))
        if kind == "mixed" and n:
            special = awkward_values(layout)
            where = draw(st.lists(st.integers(0, n - 1), max_size=20))
            for i, w in enumerate(where):
                words[w] = special[i % special.size]
    return layout, np.ascontiguousarray(words)


def kv_tensor(shape: tuple[int, ...], seed: "int | np.random.Generator" = 0) -> np.ndarray:
    """Key-like float32 values (for correctness, never for ratios): channels on the last axis.

    Heavy tails (Student t), channels at different offsets and a few large-magnitude
    channels, as in a real key cache: the entropy of 2-bit per-token codes is about 1.5
    bits (1.2 per channel), close to a SmolLM2 key layer's (1.46, 1.11).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = rng.standard_t(3, size=shape).astype(np.float32) * 0.5
    if not shape or shape[-1] == 0:
        return x
    x += rng.normal(0.0, 1.5, shape[-1]).astype(np.float32)
    x[..., rng.choice(shape[-1], size=max(1, shape[-1] // 16), replace=False)] *= 8.0
    return x


def kv_like(batch: int, heads: int, tokens: int, head_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of one layer, shaped like a cache: ``(batch, heads, tokens, head_dim)``."""
    rng = np.random.default_rng(seed)
    shape = (batch, heads, tokens, head_dim)
    return kv_tensor(shape, rng), kv_tensor(shape, rng) * 0.25


def kv_cache_data(n_layers: int, batch: int, heads: int, tokens: int, head_dim: int, seed: int = 0):
    """A :class:`~tensorwire.kv.stage.KVCacheData` of :func:`kv_like` layers at positions 0..tokens-1."""
    from ..kv.stage import KVCacheData, KVLayer

    layers = []
    for i in range(n_layers):
        keys, values = kv_like(batch, heads, tokens, head_dim, seed + i)
        positions = np.broadcast_to(np.arange(tokens, dtype=np.int64), (batch, heads, tokens)).copy()
        layers.append(KVLayer(keys, values, positions))
    return KVCacheData(layers, seq_len=tokens)


@st.composite
def kv_caches(draw, max_layers: int = 3, max_tokens: int = 70, head_dims=(8, 16, 64)):
    """Small random caches of awkward shapes: 1 token, odd token counts, batch 1-2, 1-4 heads."""
    return kv_cache_data(
        draw(st.integers(1, max_layers)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, max_tokens)),
        draw(st.sampled_from(head_dims)),
        draw(st.integers(0, 2**16)),
    )
