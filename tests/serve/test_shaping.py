"""Link emulation: the token bucket (pure, then over real loopback) and kernel tbf in a namespace.

Achieved rates are measured on the receiver: the bytes of a KV transfer (raw pipeline, so
the link is the bottleneck) over the time from the first byte of its first frame to the
last byte of its last. Tolerance: +-15 % of the target (measured here: within 2 %).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import time

import pytest

from tensorwire.control.traces import Trace
from tensorwire.errors import ShapingUnavailable
from tensorwire.kv.pipeline import Pipeline
from tensorwire.kv.stage import KVCacheData
from tensorwire.serve import EmulatedLink, TokenBucket, gbps
from tensorwire.serve.transport import link as link_module
from tensorwire.serve.transport.netns import Netns, cleanup_stale_namespaces, kernel_shaping_status, tbf_args
from tensorwire.serve.transport.shaping import TraceRate, default_burst, to_gbps
from tensorwire.testing.strategies import kv_cache_data

from .conftest import SECRET, run, tcp_pair

RAW = Pipeline.from_config({"stages": []})
TOLERANCE = 0.15
KERNEL_OK, KERNEL_WHY = kernel_shaping_status()
needs_kernel = pytest.mark.skipif(not KERNEL_OK, reason=f"kernel shaping unavailable: {KERNEL_WHY}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket, without sockets ----------------------------------------------------------
def test_the_bucket_lends_its_burst_then_paces_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=500, clock=clock)
    assert bucket.take(500) == 0.0  # the full bucket
    assert bucket.take(250) == pytest.approx(0.25)  # 250 bytes of debt at 1000 B/s
    clock.now += 0.25
    assert bucket.take(100) == pytest.approx(0.1)
    clock.now += 10.0  # idle: credit refills to the burst, no more
    assert bucket.take(500) == 0.0 and bucket.take(1) == pytest.approx(0.001)


def test_oversleeping_is_given_back():
    """The event loop wakes late; the next refill credits the extra time, so the long-run rate holds."""
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=100, clock=clock)
    bucket.take(100)
    sent, waited = 100, 0.0
    for _ in range(100):
        wait = bucket.take(50)
        clock.now += wait + 0.01  # 10 ms late every time
        waited += wait + 0.01
        sent += 50
    assert sent / waited == pytest.approx(1000.0, rel=0.05)


def test_set_rate_and_follow_a_trace():
    clock = FakeClock()
    trace = Trace("t", [1000.0, 4000.0, 2000.0])
    bucket = TokenBucket(50.0, burst=10, clock=clock)
    bucket.set_rate(200.0)
    assert bucket.rate == 200.0
    bucket.follow(trace, step_s=2.0, scale=0.5)
    assert bucket.rate == 500.0
    clock.now += 2.5
    assert bucket.rate == 2000.0
    clock.now += 2.0
    assert bucket.rate == 1000.0
    clock.now += 2.0
    assert bucket.rate == 500.0  # loops
    bucket.set_rate(7.0)
    clock.now += 100
    assert bucket.rate == 7.0 and "Gbit/s" in repr(bucket)


def test_trace_rates():
    trace = Trace("t", [1.0, 2.0, 3.0])
    assert [TraceRate(trace, 0.5).at(t) for t in (0, 0.49, 0.5, 1.2, 1.5, -1)] == [1.0, 1.0, 2.0, 3.0, 1.0, 1.0]
    assert TraceRate(trace, 0.5, loop=False).at(99.0) == 3.0
    assert TraceRate(trace, 1.0, scale=2.0).peak == 6.0
    with pytest.raises(ValueError):
        TraceRate(trace, 0.0)
    bucket = TokenBucket.from_trace(Trace.from_gbps("g", [0.1, 10.0]), step_s=1.0)
    assert bucket.burst == default_burst(gbps(10.0)) and to_gbps(bucket.rate) == pytest.approx(0.1)


def test_bucket_arguments():
    for bad in (dict(rate=0), dict(rate=-1.0), dict(rate=1.0, burst=0), dict(rate=1.0, rtt_s=-1)):
        with pytest.raises(ValueError):
            TokenBucket(**bad)
    assert default_burst(gbps(0.05)) == 64 << 10 and default_burst(gbps(10)) == int(gbps(10) * 0.002)
    infinite = TokenBucket(math.inf, rtt_s=0.01)
    assert infinite.take(10**12) == 0.0 and infinite.burst == 64 << 10
    assert gbps(1.0) == 125e6 and to_gbps(125e6) == 1.0


def test_tbf_arguments():
    assert tbf_args(gbps(0.1)) == ["tbf", "rate", "100000000bit", "burst", str(128 << 10), "latency", "50ms"]
    assert tbf_args(gbps(10), latency_s=0.02)[4] == str(int(gbps(10) * 0.004))
    with pytest.raises(ValueError):
        tbf_args(0)


# -- achieved rates over real loopback -------------------------------------------------------------
def cache_of(nbytes: float, tokens: int = 128) -> KVCacheData:
    """A raw KV cache of about ``nbytes`` (one layer repeated: cheap to make, same bytes on the wire)."""
    one = kv_cache_data(1, 1, 4, tokens, 64).layers[0]
    return KVCacheData([one] * max(2, round(nbytes / (2 * one.keys.nbytes))), seq_len=tokens)


async def transfer(link: EmulatedLink, cache: KVCacheData):
    """Send ``cache`` over ``link``; returns the receiver's stats."""
    got = asyncio.get_running_loop().create_future()

    async def handler(conn):
        _, stats = await conn.recv_kv()
        got.set_result(stats)

    server = await link.start_server(handler, secret=SECRET)
    try:
        async with await link.connect(server.port, secret=SECRET) as conn:
            await conn.send_kv("r", RAW.encode_stream(cache))
            return await asyncio.wait_for(got, 30.0)
    finally:
        await server.close()


def achieved(stats) -> float:
    first = min(a for a, _ in stats.wire_intervals)
    last = max(b for _, b in stats.wire_intervals)
    return stats.wire_bytes / (last - first)


def window_rate(stats, start: float, lo: float, hi: float) -> float:
    """Bytes/s of the frames that ended within ``[start + lo, start + hi)``."""
    nbytes = sum(
        n for (_, end), n in zip(stats.wire_intervals, stats.frame_bytes) if start + lo <= end < start + hi
    )
    return nbytes / (hi - lo)


@pytest.mark.parametrize("mbit", [50, 100, 200])
def test_the_token_bucket_achieves_its_rate(mbit):
    rate = gbps(mbit / 1000)

    async def body():
        with EmulatedLink(rate, shaper="token-bucket") as link:
            stats = await transfer(link, cache_of(rate * 0.4))  # 0.4 s at the target
        assert stats.shaper == "token-bucket"
        assert achieved(stats) == pytest.approx(rate, rel=TOLERANCE), f"{achieved(stats) * 8 / 1e6:.1f} Mbit/s"

    run(body())


def test_the_token_bucket_follows_a_trace_live():
    trace = Trace.from_gbps("steps", [0.04, 0.16])  # 40 then 160 Mbit/s, 0.4 s each

    async def body():
        bucket = TokenBucket.from_trace(trace, step_s=0.4, loop=False, clock=time.perf_counter)
        start = time.perf_counter()
        async with tcp_pair(shaper=bucket) as (client, server):
            cache = cache_of(gbps(0.04) * 0.4 + gbps(0.16) * 0.5, tokens=32)  # 64 KiB layers
            _, (_, stats) = await asyncio.gather(client.send_kv("r", RAW.encode_stream(cache)), server.recv_kv())
        slow, fast = window_rate(stats, start, 0.05, 0.35), window_rate(stats, start, 0.5, 0.8)
        assert slow == pytest.approx(gbps(0.04), rel=0.2), f"{slow * 8 / 1e6:.1f} Mbit/s in the 40 Mbit/s step"
        assert fast == pytest.approx(gbps(0.16), rel=0.2), f"{fast * 8 / 1e6:.1f} Mbit/s in the 160 Mbit/s step"

    run(body())


def test_rtt_is_added_once_per_message():
    async def body():
        async with tcp_pair(shaper=TokenBucket(math.inf, rtt_s=0.1)) as (client, server):
            started = time.monotonic()
            for i in range(3):
                await client.send_message({"type": "m", "i": i})
                await server.recv_message()
            assert 0.3 <= time.monotonic() - started < 1.5

    run(body())


def test_without_kernel_shaping_the_link_falls_back_to_the_token_bucket(monkeypatch):
    monkeypatch.setattr(link_module, "kernel_shaping_status", lambda: (False, "not root here (a test)"))
    with EmulatedLink(gbps(0.1)) as link:
        assert link.shaper == "token-bucket" and link.fallback_reason == "not root here (a test)"
        assert link.rate == gbps(0.1) and link.options()["shaper"] is link.bucket
        link.set_rate(gbps(0.2))
        assert link.rate == gbps(0.2)
    with pytest.raises(ShapingUnavailable, match="not root here"):
        EmulatedLink(gbps(0.1), shaper="tbf").open()

    async def body():
        with EmulatedLink(shaper="none") as link:
            stats = await transfer(link, cache_of(1 << 20))
        assert stats.shaper == "none"

    run(body())
    with pytest.raises(ValueError):
        EmulatedLink(shaper="netem")
    with pytest.raises(ValueError):
        EmulatedLink(shaper="token-bucket")


# -- kernel shaping: a namespace with tbf on its loopback -------------------------------------------
def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


@needs_kernel
@pytest.mark.parametrize("mbit", [100, 500])
def test_tbf_achieves_its_rate(mbit):
    rate = gbps(mbit / 1000)

    async def body():
        with EmulatedLink(rate, shaper="tbf") as link:
            name = link.netns.name
            assert name in namespaces() and "tbf" in link.netns.qdisc()
            stats = await transfer(link, cache_of(rate * 0.4))
        assert name not in namespaces()
        assert stats.shaper == "tbf"
        assert achieved(stats) == pytest.approx(rate, rel=TOLERANCE), f"{achieved(stats) * 8 / 1e6:.1f} Mbit/s"

    run(body())


@needs_kernel
def test_tbf_follows_a_trace_live():
    trace = Trace.from_gbps("steps", [0.05, 0.2])

    async def body():
        with EmulatedLink(trace=trace, step_s=0.4, shaper="tbf") as link:
            start = time.perf_counter()
            stats = await transfer(link, cache_of(gbps(0.05) * 0.4 + gbps(0.2) * 0.5, tokens=32))
            assert link.netns.rate_changes >= 1
        slow, fast = window_rate(stats, start, 0.1, 0.35), window_rate(stats, start, 0.5, 0.8)
        assert slow == pytest.approx(gbps(0.05), rel=0.2), f"{slow * 8 / 1e6:.1f} Mbit/s in the 50 Mbit/s step"
        assert fast == pytest.approx(gbps(0.2), rel=0.2), f"{fast * 8 / 1e6:.1f} Mbit/s in the 200 Mbit/s step"

    run(body())


@needs_kernel
def test_a_namespace_is_isolated_runs_commands_and_is_torn_down():
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    try:
        with Netns() as ns:
            links = ns.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
            assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
            sleeper = ns.popen(["sleep", "30"])
            inside = ns.socket()
            with pytest.raises(ConnectionRefusedError):  # the root namespace's 127.0.0.1 is not reachable
                inside.connect(outside.getsockname())
            inside.close()
            name = ns.name
        assert sleeper.poll() is not None and name not in namespaces()
        ns.close()  # idempotent
    finally:
        outside.close()


@needs_kernel
def test_namespaces_left_by_a_killed_run_are_cleaned_up():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"tw-{dead.pid}-abcdef"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Netns() as mine:
            # prefixes keep the test to its own namespaces: other runs on this machine are left alone
            assert cleanup_stale_namespaces(prefix=f"tw-{os.getpid()}-") == [] and mine.name in namespaces()
            assert cleanup_stale_namespaces(prefix=f"tw-{dead.pid}-") == [stale]
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
