"""The prefill worker's use of the pool: find and fetch a stored prefix, store new blocks.

Per request, :meth:`PoolSession.prefix` looks the prompt up (one round trip), decides how
many stored blocks to fetch rather than recompute (:func:`~.decide.plan_fetch`, from the
pool bandwidth it measured, each block's size and decode speed and the worker's prefill
speed), fetches them and returns their cache, or None. After prefill, :meth:`store` puts
the prompt's new full blocks in the pool, off the request path (the caller runs it in a
thread after the KV cache has left), encoded with the profile a controller over the
pool's pipelines picks for the pool's bandwidth and the request's quality budget (raw is a
candidate). Every step degrades to "no pool": a Redis that is down, slow or full costs the
prefill it would have saved, never the request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from ...control import Controller, RequestContext
from ...control.bandwidth import BandwidthEstimator
from ...kv.pipeline import Pipeline
from ...kv.profiles import ProfileLibrary
from ...kv.stage import KVCacheData
from .decide import FetchPlan, PrefillSpeed, plan_fetch
from .store import KVPool, PoolHit, pipeline_tag

__all__ = ["FETCH_MODES", "PoolSession", "pool_library"]

FETCH_MODES = ("auto", "always", "never")


def pool_library(library: ProfileLibrary) -> ProfileLibrary:
    """The profiles a pool may store with: those without a token selector."""
    selecting = {p.name for p in library if Pipeline.from_config(p.pipeline).selector is not None}
    return library.without(selecting)


class PoolSession:
    """A prefill worker's pool (see the module docstring).

    Parameters
    ----------
    pool : KVPool
        Built with ``pipelines`` = raw plus every profile of ``library``.
    library : ProfileLibrary
        The pool's profiles (:func:`pool_library`), calibrated on this machine.
    raw_pipeline, raw_decode_bps
        The raw (bf16) pipeline and its measured decode throughput.
    initial_bandwidth_bps : float
        The pool link's speed until fetches have measured it.
    other_decode_bps : mapping, optional
        Decode throughput of the pool's other pipelines (not raw, not in ``library``), by
        pipeline tag.
    """

    def __init__(self, pool: KVPool, library: ProfileLibrary, *, raw_pipeline: Mapping[str, Any], raw_decode_bps: float,
                 initial_bandwidth_bps: float, bytes_per_token: int, rtt_s: float = 0.0,
                 other_decode_bps: Mapping[str, float] | None = None):  # fmt: skip
        self.pool = pool
        self.controller = Controller(library, initial_bandwidth_bps=initial_bandwidth_bps)
        self.bandwidth = BandwidthEstimator(initial=initial_bandwidth_bps)
        self.prefill_speed = PrefillSpeed()
        self.bytes_per_token = int(bytes_per_token)
        self.rtt_s = float(rtt_s)
        self.decode_bps = {pipeline_tag(raw_pipeline): float(raw_decode_bps), **dict(other_decode_bps or {}),
                           **{pipeline_tag(p.pipeline): p.decode_rate for p in library}}  # fmt: skip

    @property
    def block_raw_bytes(self) -> int:
        return self.pool.block_tokens * self.bytes_per_token

    def prefix(self, prompt: list[int], tenant: str, fetch: str = "auto") -> tuple[KVCacheData | None, dict[str, Any]]:
        """The cache of the longest stored prefix worth fetching (or None), and what happened.

        ``fetch``: ``"auto"`` (the plan decides), ``"always"`` (every stored block; for
        benchmarks) or ``"never"`` (the pool is not read).
        """
        if fetch not in FETCH_MODES:
            raise ValueError(f"pool fetch is one of {FETCH_MODES}, got {fetch!r}")
        if fetch == "never":
            return None, {"hit_tokens": 0, "decision": "off", "reason": "the request does not read the pool"}
        cached = prompt[:-1]
        began = time.perf_counter()
        hit = self.pool.lookup(cached, tenant)
        plan = self.plan(hit, len(cached))
        if fetch == "always" and hit.blocks:
            plan = FetchPlan(hit.blocks, plan.predicted_s, f"fetch all {hit.blocks} blocks: forced by the request")
        info: dict[str, Any] = {"hit_tokens": hit.tokens, "decision": self.count(plan, hit), "reason": plan.reason}
        if not plan.fetch:
            return None, info
        fetched_at = time.perf_counter()
        data, kept = self.pool.fetch(hit.truncated(plan.blocks))
        fetch_s = time.perf_counter() - fetched_at
        if kept.blocks:
            self.bandwidth.add_transfer(kept.nbytes, fetch_s)
        info.update(fetched_tokens=kept.tokens, fetched_bytes=kept.nbytes, fetch_s=fetch_s,
                    pool_s=time.perf_counter() - began)  # fmt: skip
        return data, info

    def plan(self, hit: PoolHit, tokens: int) -> FetchPlan:
        """How many of ``hit``'s blocks to fetch for a prompt of ``tokens`` tokens to cache, from
        what this session measured (pool bandwidth, prefill speed) and the decode speeds."""
        return plan_fetch(hit, tokens, bandwidth_bps=self.bandwidth.estimate or math.inf, decode_bps=self.decode_bps,
                          block_raw_bytes=self.block_raw_bytes, prefill=self.prefill_speed, rtt_s=self.rtt_s)  # fmt: skip

    def count(self, plan: FetchPlan, hit: PoolHit) -> str:
        """The plan's decision (``fetch``, ``recompute``, ``miss``), counted in the pool's stats."""
        decision = "fetch" if plan.fetch else ("recompute" if hit.blocks else "miss")
        self.pool.stats.decisions[decision] = self.pool.stats.decisions.get(decision, 0) + 1
        return decision

    def check_store_profile(self, profile: str) -> None:
        """Raise ValueError unless ``profile`` is ``"auto"``, ``"none"`` or one of the pool's pipelines."""
        if profile not in ("auto", "none", *self.pool.pipelines):
            raise ValueError(f"pool store {profile!r} is not auto, none or one of the pool's: {', '.join(self.pool.pipelines)}")

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_speed.observe(tokens, seconds)

    def store(self, prompt: list[int], data: KVCacheData, tenant: str, *, from_tokens: int, profile: str = "auto",
              max_ppl_increase: float = math.inf, max_retrieval_drop: float = math.inf) -> int:  # fmt: skip
        """Store the full blocks of ``data`` after the first ``from_tokens`` (already stored); returns bytes written.

        ``profile``: ``"auto"`` (the pool's controller picks), ``"raw"`` or a pool profile
        (forced), ``"none"`` (store nothing)."""
        self.check_store_profile(profile)
        if profile == "none":
            return 0
        first = from_tokens // self.pool.block_tokens
        blocks = data.seq_len // self.pool.block_tokens - first
        if blocks <= 0 or any(layer.keys.shape[2] != data.seq_len for layer in data.layers):
            return 0  # nothing new, or a cache that is not whole (a pool block keeps every token)
        if profile == "auto":
            profile = self.controller.choose(RequestContext(kv_bytes=blocks * self.block_raw_bytes,
                                                            max_ppl_increase=max_ppl_increase,
                                                            max_retrieval_drop=max_retrieval_drop,
                                                            bandwidth_bps=self.bandwidth.estimate)).choice  # fmt: skip
        return self.pool.store(prompt[:-1], data, tenant, profile, start_block=first)

    def __repr__(self) -> str:
        return f"<PoolSession {self.pool.block_tokens}-token blocks, {len(self.decode_bps)} pipelines>"

