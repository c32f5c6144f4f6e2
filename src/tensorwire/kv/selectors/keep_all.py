"""Keep every token: the selector of a pipeline that only quantizes and encodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stage import KVCacheData, Selector
from .topk import batch_and_tokens

__all__ = ["KeepAll"]


@dataclass(frozen=True)
class KeepAll(Selector):
    """Keep all tokens of every layer and head (no eviction).

    Examples
    --------
    >>> KeepAll().kept(300)
    300
    """

    id = "keep_all"

    def kept(self, tokens: int) -> int:
        """All of them: ``tokens``."""
        return max(0, tokens)

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        """``arange(tokens)`` for every (layer, batch, KV head), shape ``(batch, kv_heads, tokens)``."""
        _, tokens = batch_and_tokens(cache)
        everything = np.arange(tokens, dtype=np.int64)
        return [np.ascontiguousarray(np.broadcast_to(everything, layer.keys.shape[:3])) for layer in cache.layers]
