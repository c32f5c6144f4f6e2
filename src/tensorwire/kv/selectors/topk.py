"""Helpers shared by the token selectors: the token budget and per-head top-k.

Every fraction-based selector keeps ``budget(keep_fraction, tokens)`` tokens, so that two
selectors given the same ``keep_fraction`` are compared at the same size, and so that every
layer of one cache keeps the same number of tokens (the decoded cache must be a regular
``DynamicCache``).
"""

from __future__ import annotations

import math

import numpy as np

from ..stage import KVCacheData, ShapeMismatch

__all__ = ["batch_and_tokens", "budget", "top_k", "valid_fraction"]


def valid_fraction(keep_fraction: object) -> bool:
    """Whether ``keep_fraction`` is a real number in ``(0, 1]`` (bools and NaN are not)."""
    return (
        isinstance(keep_fraction, (int, float))
        and not isinstance(keep_fraction, bool)
        and math.isfinite(keep_fraction)
        and 0.0 < keep_fraction <= 1.0
    )


def budget(keep_fraction: float, tokens: int) -> int:
    """Tokens kept out of ``tokens``: ``max(1, min(tokens, round(keep_fraction * tokens)))``.

    ``round`` is Python's (half to even: 3.5 -> 4, 2.5 -> 2). At least one token is kept
    so that a compressed cache is never empty (generation needs something to attend to);
    an empty cache keeps nothing.

    Examples
    --------
    >>> budget(0.25, 300), budget(0.25, 1), budget(1.0, 7), budget(0.5, 5)
    (75, 1, 7, 2)
    """
    if tokens <= 0:
        return 0
    return max(1, min(tokens, round(keep_fraction * tokens)))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores along the last axis, ascending, as int64.

    ``scores`` has shape ``(..., tokens)``; the result has shape ``(..., k)``. Ties at the
    boundary are broken by ``numpy.argpartition`` (deterministic for one numpy build, which
    is all that matters: the sender chooses, the receiver only reads the kept positions).
    NaN scores rank above every number, so callers must not produce them.
    """
    tokens = scores.shape[-1]
    if not 0 <= k <= tokens:
        raise ValueError(f"cannot keep {k} of {tokens} tokens")
    if k == tokens:
        chosen = np.broadcast_to(np.arange(tokens, dtype=np.int64), scores.shape)
        return np.ascontiguousarray(chosen)
    # argpartition is O(tokens) per row; only the k kept indices are then sorted.
    chosen = np.sort(np.argpartition(scores, tokens - k, axis=-1)[..., tokens - k :], axis=-1)
    return chosen.astype(np.int64, copy=False)  # np.sort returned a fresh C-contiguous array


def batch_and_tokens(cache: KVCacheData) -> tuple[int, int]:
    """``(batch, tokens)`` shared by every layer; raises :class:`ShapeMismatch` otherwise.

    Per-layer head counts and head dims may differ, but every selector returns the same
    number of kept tokens for each layer, so the token count (and batch) must agree.
    """
    if not cache.layers:
        raise ShapeMismatch("the cache has no layers; expected at least one decoder layer")
    first = cache.layers[0].keys.shape
    for i, layer in enumerate(cache.layers):
        shape = layer.keys.shape
        if len(shape) != 4 or layer.values.shape[:3] != shape[:3]:
            raise ShapeMismatch(
                f"layer {i} has keys {shape} and values {layer.values.shape}; expected both "
                "(batch, kv_heads, tokens, head_dim) with the same first three dims"
            )
        if shape[0] != first[0] or shape[2] != first[2]:
            raise ShapeMismatch(
                f"layer {i} has batch {shape[0]} and {shape[2]} tokens, layer 0 has batch {first[0]} "
                f"and {first[2]} tokens; every layer of one cache must hold the same tokens"
            )
    return first[0], first[2]
