"""SnapKV: keep the tokens the last prompt tokens attend to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). The attention that the last ``window`` prompt tokens (the *observation
window*) pay to the earlier tokens predicts well which tokens generation will attend to.
The scores are pooled over neighbouring tokens so that whole phrases are kept rather than
isolated tokens, and the observation window itself is always kept.

The queries come from the prefill (:class:`~tensorwire.kv.stage.Observations`), so no
second forward pass is needed: ``tensorwire.kv.hf.prefill(..., observe_window=W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import KVCacheData, ObservationError, Selector, is_int
from .topk import batch_and_tokens, budget, top_k, valid_fraction

__all__ = ["SnapKV", "window_scores"]

_HOW_TO = "prefill with observation capture: tensorwire.kv.hf.prefill(..., observe_window=W)"


def window_scores(keys: np.ndarray, queries: np.ndarray, prefix: int, kernel: int) -> np.ndarray:
    """SnapKV importance of the first ``prefix`` tokens of one layer.

    Parameters
    ----------
    keys : ndarray, shape (batch, kv_heads, tokens, head_dim)
        The layer's keys (after RoPE, as the queries).
    queries : ndarray, shape (batch, q_heads, w, head_dim)
        The queries of the last ``w <= tokens`` tokens; query head ``h`` reads KV head
        ``h // (q_heads // kv_heads)``.
    prefix : int
        How many leading tokens to score (``tokens - window``: the window is kept anyway).
    kernel : int
        Odd width of the zero-padded average pooling over neighbouring tokens.

    Returns
    -------
    ndarray, shape (batch, kv_heads, prefix), float32
        Softmax attention of each window query over every token it may see (causal inside
        the window), restricted to the prefix, averaged over the window queries and over
        the query heads that share a KV head, then average-pooled along the tokens.
    """
    batch, kv_heads, tokens, head_dim = keys.shape
    q_heads, w = queries.shape[1], queries.shape[2]
    if queries.shape[::3] != (batch, head_dim) or q_heads % kv_heads or not 1 <= w <= tokens - prefix:
        raise ObservationError(
            f"queries {queries.shape} do not fit keys {keys.shape} with prefix {prefix}; expected "
            "(batch, a multiple of kv_heads, 1..tokens - prefix, head_dim)"
        )
    group = q_heads // kv_heads
    # Query heads of one KV head are contiguous, so one reshape groups them with their keys
    # and a single batched matmul scores every (query head, window query) at once.
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(batch, kv_heads, group * w, head_dim)
    logits = np.matmul(q, np.swapaxes(keys.astype(np.float32, copy=False), -1, -2))
    logits *= np.float32(1.0 / math.sqrt(head_dim))
    # Window query j sits at token tokens - w + j and sees tokens <= its own.
    future = np.tile(np.triu(np.ones((w, w), dtype=bool), k=1), (group, 1))
    logits[..., tokens - w :][..., future] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    # Below -87 float32 exp is subnormal (slow on x86) and negligible next to the row's
    # maximum exp(0) = 1: clamp there, then zero the masked future again.
    np.maximum(logits, np.float32(-87.0), out=logits)
    np.exp(logits, out=logits)
    logits[..., tokens - w :][..., future] = 0.0
    # Normalise over the whole visible row (as attention does) before keeping the prefix,
    # so a query that mostly attends inside the window adds little to the prefix scores.
    attn = logits[..., :prefix] / logits.sum(axis=-1, keepdims=True)
    scores = attn.mean(axis=-2)
    if kernel > 1 and prefix > 0:
        half = kernel // 2
        padded = np.pad(scores, [(0, 0), (0, 0), (half, half)])
        scores = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1).sum(axis=-1) / np.float32(kernel)
    return scores.astype(np.float32, copy=False)


@dataclass(frozen=True)
class SnapKV(Selector):
    """Keep the observation window plus the earlier tokens it attends to most.

    Per (layer, batch, KV head): the last ``window`` tokens are kept; the rest of the
    budget goes to the earlier tokens with the highest :func:`window_scores`. Each head
    keeps its own tokens.

    Parameters
    ----------
    keep_fraction : float
        Fraction of tokens kept, in ``(0, 1]``; see :meth:`kept`.
    window : int
        Observation window: how many of the last queries score the tokens, and how many
        last tokens are always kept (32 as in the paper). When the prefill observed fewer
        queries, the ones there are score the tokens; the kept window stays ``window``.
    kernel : int
        Odd width of the average pooling over neighbouring tokens' scores (5 as in kvpress;
        1 disables pooling).

    Examples
    --------
    >>> s = SnapKV(keep_fraction=0.25)
    >>> s.kept(300), s.kept(100), s.kept(20)
    (75, 32, 20)
    """

    keep_fraction: float
    window: int = 32
    kernel: int = 5

    id = "snapkv"
    # Offline search candidates; windows up to the evaluator's OBSERVE_WINDOW (64) are captured at prefill.
    search_space: ClassVar[dict[str, tuple]] = {"keep_fraction": (0.25, 0.5, 0.7, 0.9), "window": (32, 64)}
    needs_observations: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.check(valid_fraction(self.keep_fraction), f"keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        self.check(is_int(self.window, 1), f"window must be an int >= 1, got {self.window!r}")
        self.check(
            is_int(self.kernel, 1) and self.kernel % 2 == 1,
            f"kernel must be an odd int >= 1 (the pooling is centred), got {self.kernel!r}",
        )

    def kept(self, tokens: int) -> int:
        """``max(budget, min(window, tokens))`` with ``budget = max(1, min(tokens, round(keep_fraction * tokens)))``.

        The observation window is always kept, so a cache of at most ``window`` tokens is
        kept whole and a small fraction of a short cache keeps ``window`` tokens.
        """
        return max(budget(self.keep_fraction, tokens), min(self.window, max(tokens, 0)))

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        """Per layer, ascending kept indices of shape ``(batch, kv_heads, kept)``.

        Raises
        ------
        ObservationError
            The cache carries no observations, or they do not match its layers' shapes.
        """
        batch, tokens = batch_and_tokens(cache)
        queries = self._checked_queries(cache, batch)
        k = self.kept(tokens)
        protected = min(self.window, tokens)
        prefix = tokens - protected
        out = []
        for layer, q in zip(cache.layers, queries):
            shape = layer.keys.shape
            if k == tokens:  # nothing to evict: skip the scoring
                out.append(np.ascontiguousarray(np.broadcast_to(np.arange(tokens, dtype=np.int64), shape[:3])))
                continue
            w = min(q.shape[2], self.window, tokens)
            scores = np.full(shape[:3], np.inf, dtype=np.float32)  # the window always wins
            scores[..., :prefix] = window_scores(layer.keys, q[:, :, q.shape[2] - w :], prefix, self.kernel)
            out.append(top_k(scores, k))
        return out

    def _checked_queries(self, cache: KVCacheData, batch: int) -> list[np.ndarray]:
        obs = cache.observations
        if obs is None or not obs.queries:
            raise ObservationError(
                f"stage 'snapkv' scores tokens with the prefill's last queries, but the cache has no "
                f"observations; {_HOW_TO} with W >= 1 (W = window = {self.window} recommended)"
            )
        if len(obs.queries) != cache.n_layers:
            raise ObservationError(
                f"the observations hold queries for {len(obs.queries)} layers, the cache has {cache.n_layers}; "
                f"{_HOW_TO} on the same model as the cache"
            )
        for i, (q, layer) in enumerate(zip(obs.queries, cache.layers)):
            _, kv_heads, _, head_dim = layer.keys.shape
            shape = getattr(q, "shape", None)
            ok = (
                shape is not None
                and len(shape) == 4
                and shape[0] == batch
                and shape[1] >= kv_heads
                and shape[1] % kv_heads == 0
                and shape[2] >= 1
                and shape[3] == head_dim
            )
            if not ok:
                raise ObservationError(
                    f"layer {i}: observed queries have shape {shape}, expected (batch={batch}, q_heads (a multiple "
                    f"of kv_heads={kv_heads}), window >= 1, head_dim={head_dim}); {_HOW_TO} on the same model and "
                    "batch as the cache"
                )
        return obs.queries
