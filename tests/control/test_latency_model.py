"""The latency model: closed forms, the flow-shop identity, break-even bandwidth vs a numeric root."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.control.latency_model import (
    break_even_bandwidth,
    gbps,
    kv_cache_bytes,
    latency,
    pipelined_latency,
    raw_latency,
    serial_latency,
    to_gbps,
)

G = 1e9
ratios = st.floats(1.01, 20.0)
rates = st.floats(0.2 * G, 50 * G)
bandwidths = st.floats(0.05 * G, 50 * G)  # bytes/s: 0.4 .. 400 Gbps
sizes = st.floats(1e5, 5e9)
layers = st.integers(1, 128)


def test_units():
    assert gbps(8) == 1e9 and to_gbps(1e9) == 8
    assert to_gbps(gbps(11.5)) == pytest.approx(11.5)
    assert kv_cache_bytes(1024, 30, 3, 64) == 23_592_960  # SmolLM2-135M, bf16
    assert kv_cache_bytes(1, 32, 8, 128, itemsize=2, batch=2) == 2 * 32 * 8 * 128 * 2 * 2


def test_serial_and_raw_by_hand():
    # 1 GB cache, ratio 4, encode 2 GB/s, decode 4 GB/s, link 1 GB/s: 0.5 + 0.25 + 0.25 s
    assert serial_latency(1e9, 4.0, 2e9, 4e9, 1e9) == pytest.approx(1.0)
    assert serial_latency(1e9, 4.0, 2e9, 4e9, 1e9, overhead=0.01) == pytest.approx(1.01)
    assert raw_latency(1e9, 1e9, overhead=0.002) == pytest.approx(1.002)


def test_pipelined_by_hand():
    # 10 layers of 0.1 GB: encode 50 ms, send 25 ms, decode 25 ms per layer -> encode-bound
    assert pipelined_latency(1e9, 4.0, 2e9, 4e9, 1e9, n_layers=10) == pytest.approx(0.05 + 0.025 + 0.025 + 9 * 0.05)
    # link-bound: ratio 2 at 0.5 GB/s -> 100 ms per layer on the wire
    assert pipelined_latency(1e9, 2.0, 4e9, 4e9, 0.5e9, n_layers=10) == pytest.approx(0.025 + 0.1 + 0.025 + 9 * 0.1)
    with pytest.raises(ValueError, match="n_layers"):
        pipelined_latency(1e9, 2.0, 4e9, 4e9, 0.5e9, n_layers=0)


@given(kv=sizes, r=ratios, e=rates, d=rates, b=bandwidths, L=layers)
def test_pipelined_properties(kv, r, e, d, b, L):
    serial = serial_latency(kv, r, e, d, b)
    piped = pipelined_latency(kv, r, e, d, b, L)
    slowest_total = max(kv / e, kv / (r * b), kv / d)
    assert pipelined_latency(kv, r, e, d, b, 1) == pytest.approx(serial)  # one layer: nothing overlaps
    assert slowest_total * (1 - 1e-12) <= piped <= serial * (1 + 1e-12)  # overlap helps, never beats the bottleneck
    assert pipelined_latency(kv, r, e, d, b * 2, L) <= piped * (1 + 1e-12)  # a faster link never hurts


def test_array_inputs_broadcast():
    bw = np.array([1e9, 2e9, 4e9])
    out = pipelined_latency(1e9, 4.0, 2e9, 4e9, bw, n_layers=10)
    assert out.shape == (3,)
    assert out[0] == pytest.approx(pipelined_latency(1e9, 4.0, 2e9, 4e9, 1e9, n_layers=10))
    assert latency("serial", 1e9, 4.0, 2e9, 4e9, bw).shape == (3,)
    assert isinstance(pipelined_latency(1e9, 4.0, 2e9, 4e9, 1e9, n_layers=10), float)
    with pytest.raises(ValueError, match="latency model"):
        latency("magic", 1e9, 4.0, 2e9, 4e9, 1e9)


def _numeric_break_even(r, e, d, L, overhead=0.0, kv=1e9) -> float:
    """Bisection on log-bandwidth of (profile - raw); the profile wins below the root."""

    def gain(b):  # > 0 when raw is slower
        return raw_latency(kv, b) - pipelined_latency(kv, r, e, d, b, L, overhead)

    lo, hi = 1e-3, 1e15
    if gain(hi) > 0:
        return math.inf
    if gain(lo) <= 0:
        return 0.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain(mid) > 0 else (lo, mid)
    return lo


@given(r=ratios, e=rates, d=rates, L=layers)
def test_break_even_matches_numeric_root(r, e, d, L):
    closed = break_even_bandwidth(r, e, d, n_layers=L)
    assert closed == pytest.approx(_numeric_break_even(r, e, d, L), rel=1e-6)
    # and it really is the crossing: the profile wins just below, raw just above
    assert pipelined_latency(1e9, r, e, d, closed * 0.99, L) < raw_latency(1e9, closed * 0.99)
    assert pipelined_latency(1e9, r, e, d, closed * 1.01, L) > raw_latency(1e9, closed * 1.01)


@given(r=ratios, e=rates, d=rates, L=layers, overhead=st.floats(1e-5, 0.05), kv=st.floats(1e7, 5e9))
def test_break_even_with_overhead(r, e, d, L, overhead, kv):
    closed = break_even_bandwidth(r, e, d, n_layers=L, overhead=overhead, kv_bytes=kv)
    assert closed == pytest.approx(_numeric_break_even(r, e, d, L, overhead, kv), rel=1e-6)
    assert closed < break_even_bandwidth(r, e, d, n_layers=L)  # an overhead only makes raw more attractive


def test_break_even_serial_closed_form():
    # (1 - 1/r) / (1/e + 1/d) = 0.75 / (0.5 + 0.25) ns = 1 GB/s
    assert break_even_bandwidth(4.0, 2e9, 4e9) == pytest.approx(1e9)


def test_break_even_limits():
    assert break_even_bandwidth(1.0, 2e9, 2e9) == 0.0  # no compression: never wins
    assert break_even_bandwidth(0.8, 2e9, 2e9) == 0.0  # expands the data
    assert break_even_bandwidth(4.0, math.inf, math.inf) == math.inf  # free codec: always wins
    assert break_even_bandwidth(4.0, math.inf, math.inf, n_layers=30) == math.inf
    with pytest.raises(ValueError, match="kv_bytes"):
        break_even_bandwidth(4.0, 2e9, 2e9, overhead=0.01)
    with pytest.raises(ValueError, match="n_layers"):
        break_even_bandwidth(4.0, 2e9, 2e9, n_layers=0)


def test_pipelining_raises_the_break_even():
    serial = break_even_bandwidth(4.0, 3e9, 5e9)
    piped = break_even_bandwidth(4.0, 3e9, 5e9, n_layers=30)
    assert piped > 1.5 * serial  # overlap hides most of the codec time
