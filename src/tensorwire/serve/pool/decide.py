"""Fetch or recompute: how much of a stored prefix a request should take from the pool.

For a hit of ``n`` blocks the prefill worker may fetch the first ``k`` (``0 <= k <= n``)
and prefill the rest of the prompt. Fetching ``k`` blocks costs one round trip, their
stored bytes over the pool's bandwidth, and decoding them (each block's bf16-equivalent
bytes over its pipeline's decode throughput); prefilling costs the measured seconds per
prompt token times the tokens left. The decision takes the ``k`` with the lowest predicted
time (``0``: recompute everything, as without a pool) and says why.

The prefill speed is learned online (:class:`PrefillSpeed`): an EWMA of the seconds per
token of the worker's own prefills, which includes whatever else the machine is doing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ...control.units import format_bandwidth, format_seconds
from .store import PoolHit

__all__ = ["FetchPlan", "PrefillSpeed", "plan_fetch"]


class PrefillSpeed:
    """Seconds per prompt token of this worker's prefills (EWMA; ``initial`` until the first one)."""

    def __init__(self, initial_s_per_token: float = 2e-3, alpha: float = 0.3):
        if not initial_s_per_token > 0 or not 0 < alpha <= 1:
            raise ValueError(f"need initial_s_per_token > 0 and 0 < alpha <= 1, got {initial_s_per_token}, {alpha}")
        self.s_per_token = float(initial_s_per_token)
        self.alpha = float(alpha)
        self.samples = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        sample = seconds / tokens
        self.s_per_token = sample if self.samples == 0 else self.alpha * sample + (1 - self.alpha) * self.s_per_token
        self.samples += 1

    def seconds(self, tokens: int) -> float:
        return tokens * self.s_per_token


@dataclass(frozen=True)
class FetchPlan:
    """Fetch the first ``blocks`` blocks of the hit, prefill the rest; ``predicted_s`` per option."""

    blocks: int
    predicted_s: tuple[float, ...]  # option k: fetch k blocks, prefill the rest
    reason: str

    @property
    def fetch(self) -> bool:
        return self.blocks > 0


def plan_fetch(hit: PoolHit, prompt_tokens: int, *, bandwidth_bps: float, decode_bps: Mapping[str, float],
               block_raw_bytes: int, prefill: PrefillSpeed, rtt_s: float = 0.0) -> FetchPlan:  # fmt: skip
    """The cheapest ``k`` for ``hit`` (see the module docstring).

    ``decode_bps`` maps a block's pipeline tag to its decode throughput (bytes of the bf16
    cache per second); ``block_raw_bytes`` is one block's bf16 size; ``prompt_tokens`` the
    tokens to be cached (the prompt but its last token).
    """
    if not hit.blocks:
        return FetchPlan(0, (prefill.seconds(prompt_tokens),), "no stored prefix")
    if not (math.isfinite(bandwidth_bps) and bandwidth_bps > 0):
        return FetchPlan(0, (prefill.seconds(prompt_tokens),), f"no usable pool bandwidth ({bandwidth_bps!r}): recompute")
    options = [prefill.seconds(prompt_tokens)]
    fetch_s = rtt_s
    for k in range(1, hit.blocks + 1):
        fetch_s += hit.sizes[k - 1] / bandwidth_bps + block_raw_bytes / decode_bps.get(hit.pipelines[k - 1], math.inf)
        options.append(fetch_s + prefill.seconds(max(0, prompt_tokens - k * hit.block_tokens)))
    best = min(range(len(options)), key=options.__getitem__)
    what = "recompute all" if best == 0 else f"fetch {best}/{hit.blocks} blocks ({sum(hit.sizes[:best]) / 1e6:.1f} MB)"
    reason = (f"{what}: {format_seconds(options[best])} predicted vs {format_seconds(options[0])} to recompute "
              f"{prompt_tokens} tokens at {prefill.s_per_token * 1e3:.2f} ms/token, pool at {format_bandwidth(bandwidth_bps)}")  # fmt: skip
    return FetchPlan(best, tuple(options), reason)

