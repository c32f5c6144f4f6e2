"""Fetch or recompute: the plan follows the predicted times, and says why."""

from __future__ import annotations

import math

import pytest

from tensorwire.control.latency_model import gbps
from tensorwire.serve.pool import PoolHit
from tensorwire.serve.pool.decide import PrefillSpeed, plan_fetch

BLOCK_RAW = 256 * 23_040  # one 256-token block of SmolLM2's bf16 cache


def hit(blocks: int, size: int) -> PoolHit:
    return PoolHit(256, tuple(f"k{i}" for i in range(blocks)), (size,) * blocks, ("tag",) * blocks)


def test_a_fast_pool_is_fetched_and_a_slow_one_recomputed():
    prefill = PrefillSpeed(4e-3)  # 4 ms per token, as a 2-core CPU prefills a long prompt
    fast = plan_fetch(hit(15, BLOCK_RAW // 4), 4095, bandwidth_bps=gbps(1), decode_bps={"tag": 1e9},
                      block_raw_bytes=BLOCK_RAW, prefill=prefill)  # fmt: skip
    assert fast.blocks == 15 and fast.fetch  # every full block of the 4095 cached tokens
    assert fast.predicted_s[15] < fast.predicted_s[0] / 10 and "fetch 15/15" in fast.reason
    slow = plan_fetch(hit(15, BLOCK_RAW), 4095, bandwidth_bps=gbps(0.001), decode_bps={"tag": 1e9},
                      block_raw_bytes=BLOCK_RAW, prefill=prefill)  # fmt: skip
    assert slow.blocks == 0 and slow.reason.startswith("recompute all")


def test_no_hit_or_no_bandwidth_recomputes():
    prefill = PrefillSpeed()
    assert plan_fetch(hit(0, 1), 100, bandwidth_bps=gbps(1), decode_bps={}, block_raw_bytes=1, prefill=prefill).blocks == 0
    for bad in (0.0, math.nan, math.inf):
        plan = plan_fetch(hit(2, 100), 600, bandwidth_bps=bad, decode_bps={"tag": 1e9}, block_raw_bytes=1, prefill=prefill)
        assert plan.blocks == 0 and "bandwidth" in plan.reason


def test_prefill_speed_is_an_ewma_of_seconds_per_token():
    speed = PrefillSpeed(1e-3, alpha=0.5)
    speed.observe(1000, 4.0)
    assert speed.s_per_token == pytest.approx(4e-3)  # the first sample replaces the guess
    speed.observe(1000, 2.0)
    assert speed.s_per_token == pytest.approx(3e-3)
    speed.observe(0, 1.0)
    speed.observe(10, math.nan)
    assert speed.samples == 2
    with pytest.raises(ValueError):
        PrefillSpeed(0.0)
