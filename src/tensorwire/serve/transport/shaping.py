"""Sender-side link emulation: a token bucket that paces what a connection writes.

:class:`TokenBucket` holds at most ``burst`` bytes of credit, refilled at ``rate`` bytes per
second; a writer takes credit for every chunk before writing it and sleeps off any debt.
The rate may change live: :meth:`TokenBucket.set_rate`, or :meth:`TokenBucket.follow`
a :class:`~tensorwire.control.traces.Trace` (one rate every ``step_s`` seconds). An
optional ``rtt_s`` is slept once before each message (a control message or a whole KV
transfer): there is no netem here to delay packets, so the sender charges the delay.

What it models and what it does not (docs/PROTOCOL.md, "Link emulation"): only the bytes
our writer sends are paced, in the direction they are sent (the peer's replies, TCP ACKs
and other traffic are not); there is no loss, reordering or jitter, and the delay is
per message, not per packet. One bucket shared by several connections is one shared
link (each writer pays its share of the debt, first come first served).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...control.latency_model import gbps, to_gbps
from ...control.traces import Trace

__all__ = ["TokenBucket", "TraceRate", "default_burst", "gbps", "to_gbps"]

MIN_BURST = 64 << 10
BURST_SECONDS = 0.002  # credit for 2 ms at the peak rate: enough to absorb the event loop's timer slack


def default_burst(peak_rate: float) -> int:
    """The default bucket size: 2 ms at the peak rate, at least 64 KiB.

    Smaller makes the event loop's timer slack (about 1 ms) cost rate; larger lets short
    transfers run above the rate (a transfer of ``S`` bytes takes ``(S - burst) / rate``).
    """
    return int(max(MIN_BURST, peak_rate * BURST_SECONDS)) if math.isfinite(peak_rate) else MIN_BURST


@dataclass(frozen=True)
class TraceRate:
    """The rate of a trace at a time: value ``i`` (bytes/s, times ``scale``) during ``[i, i+1) * step_s``.

    After the last value the trace starts over (``loop=True``) or keeps its last value.
    """

    trace: Trace
    step_s: float = 1.0
    scale: float = 1.0
    loop: bool = True

    def __post_init__(self) -> None:
        if not self.step_s > 0 or not self.scale > 0:
            raise ValueError(f"a trace needs step_s > 0 and scale > 0, got step_s={self.step_s}, scale={self.scale}")

    def at(self, elapsed: float) -> float:
        n = len(self.trace)
        i = int(max(elapsed, 0.0) // self.step_s)
        i = i % n if self.loop else min(i, n - 1)
        return float(self.trace.bandwidth_bps[i]) * self.scale

    @property
    def peak(self) -> float:
        return float(self.trace.bandwidth_bps.max()) * self.scale


class TokenBucket:
    """Paces writes to ``rate`` bytes/s with ``burst`` bytes of credit; see the module docstring.

    Parameters
    ----------
    rate
        Bytes per second (``math.inf``: no pacing, only ``rtt_s``). :func:`gbps` converts.
    burst
        Credit in bytes; default :func:`default_burst` of the (peak) rate.
    rtt_s
        Seconds slept before each message.
    clock
        A monotonic clock (seconds), for tests.

    Examples
    --------
    >>> bucket = TokenBucket(gbps(0.1))                    # 100 Mbit/s
    >>> bucket = TokenBucket.from_trace(trace, step_s=0.5, scale=0.01)  # doctest: +SKIP
    """

    name = "token-bucket"

    def __init__(self, rate: float, burst: int | None = None, rtt_s: float = 0.0, *,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        if not rate > 0:
            raise ValueError(f"a token bucket's rate is > 0 bytes/s, got {rate!r}")
        if rtt_s < 0:
            raise ValueError(f"rtt_s is >= 0, got {rtt_s!r}")
        self._clock = clock
        self._rate = float(rate)
        self._trace: TraceRate | None = None
        self._trace_start = 0.0
        self.burst = int(burst) if burst is not None else default_burst(self._rate)
        if self.burst <= 0:
            raise ValueError(f"a token bucket's burst is > 0 bytes, got {burst!r}")
        self.rtt_s = float(rtt_s)
        self._tokens = float(self.burst)
        self._last = clock()

    @classmethod
    def from_trace(cls, trace: Trace, step_s: float = 1.0, *, scale: float = 1.0, loop: bool = True,
                   burst: int | None = None, rtt_s: float = 0.0, **kwargs) -> TokenBucket:  # fmt: skip
        """A bucket that follows ``trace`` from now on (see :meth:`follow`)."""
        schedule = TraceRate(trace, step_s, scale, loop)
        bucket = cls(schedule.at(0.0), burst if burst is not None else default_burst(schedule.peak), rtt_s, **kwargs)
        bucket.follow(trace, step_s, scale=scale, loop=loop)
        return bucket

    # -- rate ------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """The rate now, bytes per second."""
        if self._trace is not None:
            return self._trace.at(self._clock() - self._trace_start)
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate now (and stop following a trace)."""
        if not rate > 0:
            raise ValueError(f"a token bucket's rate is > 0 bytes/s, got {rate!r}")
        self._refill()
        self._trace, self._rate = None, float(rate)

    def follow(self, trace: Trace, step_s: float = 1.0, *, scale: float = 1.0, loop: bool = True) -> None:
        """Follow ``trace`` from now: its value ``i`` (bytes/s, times ``scale``) from ``i * step_s`` s on.

        Control traces run at 1-100 Gbit/s, more than a Python writer paces; ``scale``
        (e.g. 0.01) keeps their shape at a rate loopback can show.
        """
        self._refill()
        self._trace, self._trace_start = TraceRate(trace, step_s, scale, loop), self._clock()

    @property
    def chunk(self) -> int:
        """The most bytes a writer should take at once (a quarter of the bucket, 16 KiB to 1 MiB)."""
        return max(16 << 10, min(self.burst // 4, 1 << 20))

    # -- credit ------------------------------------------------------------------------------
    def _refill(self) -> None:
        now = self._clock()
        rate = self.rate
        if math.isinf(rate):
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * rate)
        self._last = now

    def take(self, nbytes: int) -> float:
        """Take credit for ``nbytes``; returns the seconds to wait before sending them (0: now)."""
        self._refill()
        rate = self.rate
        if math.isinf(rate):
            return 0.0
        self._tokens -= nbytes
        return -self._tokens / rate if self._tokens < 0 else 0.0

    async def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent. The event loop oversleeps a little; the next refill
        gives that time back (up to ``burst``), so the long-run rate stays the target."""
        wait = self.take(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)

    async def message_delay(self) -> None:
        """Sleep ``rtt_s``: called once before each message."""
        if self.rtt_s > 0:
            await asyncio.sleep(self.rtt_s)

    def __repr__(self) -> str:
        following = f", following {self._trace.trace.name!r}" if self._trace is not None else ""
        return f"TokenBucket({to_gbps(self.rate):.4g} Gbit/s, burst={self.burst}, rtt_s={self.rtt_s:g}{following})"
