"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). Models put a large share of attention on the first few tokens whatever
their content ("attention sinks"); keeping those and the most recent tokens keeps the
attention distribution close to the full one at no scoring cost. The choice depends only on
token order, so every layer and head keeps the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import KVCacheData, Selector, is_int
from .topk import batch_and_tokens, budget, valid_fraction

__all__ = ["StreamingLLM"]


@dataclass(frozen=True)
class StreamingLLM(Selector):
    """Keep the first ``sinks`` tokens and the most recent ones, ``kept(tokens)`` in all.

    Parameters
    ----------
    keep_fraction : float
        Fraction of tokens kept, in ``(0, 1]``; see :meth:`kept`.
    sinks : int
        Number of leading tokens always kept (4 in the paper). When the budget is smaller
        than ``sinks``, only the first ``budget`` tokens are kept: the sinks come first.

    Examples
    --------
    >>> s = StreamingLLM(keep_fraction=0.5, sinks=2)
    >>> s.kept(10), s.indices(10).tolist()
    (5, [0, 1, 7, 8, 9])
    """

    keep_fraction: float
    sinks: int = 4

    id = "streaming_llm"
    search_space: ClassVar[dict[str, tuple]] = {"keep_fraction": (0.25, 0.5, 0.7, 0.9)}  # offline search candidates

    def __post_init__(self) -> None:
        self.check(valid_fraction(self.keep_fraction), f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        self.check(
            is_int(self.sinks, 0),
            f"sinks must be an int >= 0, got {self.sinks!r}",
        )

    def kept(self, tokens: int) -> int:
        """``max(1, min(tokens, round(keep_fraction * tokens)))`` (0 for an empty cache)."""
        return budget(self.keep_fraction, tokens)

    def indices(self, tokens: int) -> np.ndarray:
        """The kept token indices (ascending, int64) for a cache of ``tokens`` tokens."""
        k = self.kept(tokens)
        n_sinks = min(self.sinks, k)
        recent = k - n_sinks
        # k <= tokens, so the recent block [tokens - recent, tokens) starts at or after the
        # sinks [0, n_sinks): the two never overlap and the result is strictly increasing.
        return np.concatenate([np.arange(n_sinks), np.arange(tokens - recent, tokens)]).astype(np.int64)

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        """The same :meth:`indices` for every (layer, batch, KV head)."""
        _, tokens = batch_and_tokens(cache)
        chosen = self.indices(tokens)
        return [
            np.ascontiguousarray(np.broadcast_to(chosen, layer.keys.shape[:2] + (chosen.size,)))
            for layer in cache.layers
        ]
