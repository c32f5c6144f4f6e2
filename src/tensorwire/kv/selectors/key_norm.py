"""Key-norm eviction: keep the tokens whose keys have the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430). In trained decoders, a low key norm goes with high attention
(the attention-sink tokens have the smallest keys), so the norm is a free proxy for
importance that needs neither queries nor attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import KVCacheData, Selector
from .topk import batch_and_tokens, budget, top_k, valid_fraction

__all__ = ["KeyNorm"]


@dataclass(frozen=True)
class KeyNorm(Selector):
    """Keep, per (layer, batch, KV head), the ``kept(tokens)`` tokens of lowest key L2 norm.

    The norm is taken on the keys the selector sees; rotations (RoPE, the ``hadamard``
    transform) preserve it, so the choice does not depend on whether they ran first.

    Parameters
    ----------
    keep_fraction : float
        Fraction of tokens kept, in ``(0, 1]``; see :meth:`kept`.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorwire.kv.stage import KVCacheData, KVLayer
    >>> keys = np.array([3.0, 1.0, 2.0, 0.5], dtype=np.float32).reshape(1, 1, 4, 1)
    >>> layer = KVLayer(keys, keys, np.arange(4).reshape(1, 1, 4))
    >>> KeyNorm(keep_fraction=0.5).select(KVCacheData([layer], seq_len=4))[0].tolist()
    [[[1, 3]]]
    """

    keep_fraction: float

    id = "key_norm"
    search_space: ClassVar[dict[str, tuple]] = {"keep_fraction": (0.25, 0.5, 0.7, 0.9)}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(valid_fraction(self.keep_fraction), f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")

    def kept(self, tokens: int) -> int:
        """``max(1, min(tokens, round(keep_fraction * tokens)))`` (0 for an empty cache)."""
        return budget(self.keep_fraction, tokens)

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        """Per layer, the lowest-norm token indices, ascending, shape ``(batch, kv_heads, kept)``."""
        _, tokens = batch_and_tokens(cache)
        k = self.kept(tokens)
        out = []
        for layer in cache.layers:
            keys = np.asarray(layer.keys, dtype=np.float32)
            # The squared norm ranks like the norm and saves a sqrt per token.
            sq_norm = np.einsum("bhtd,bhtd->bht", keys, keys)
            out.append(top_k(-sq_norm, k))
        return out
