"""An emulated link between servers and clients: kernel tbf where allowed, else the token bucket.

::

    with EmulatedLink(gbps(1)) as link:                  # or trace=..., step_s=..., scale=...
        server = await link.start_server(handler, secret=secret)
        conn = await link.connect(server.port, secret=secret)
        ...                                             # link.shaper: "tbf" or "token-bucket"

With ``tbf`` the server's and the client's sockets live in one network namespace whose
loopback is shaped (:class:`~.netns.Netns`): every byte both ways shares the link. With
the token bucket both ends of every connection made through the link share one
:class:`~.shaping.TokenBucket`: only what tensorwire writes is paced. ``rtt_s`` is slept by
the sender once per message in both cases (netem, which would delay packets, is missing).
"""

from __future__ import annotations

import math
from typing import Any

from ...control.traces import Trace
from ...errors import ShapingUnavailable
from .netns import Netns, kernel_shaping_status
from .shaping import TokenBucket, TraceRate
from .tcp import connect, start_server

__all__ = ["EmulatedLink", "SHAPERS"]

SHAPERS = ("auto", "tbf", "token-bucket", "none")


class EmulatedLink:
    """A link of ``rate`` bytes/s (or following ``trace``); see the module docstring.

    Parameters
    ----------
    rate
        Bytes per second (:func:`~.shaping.gbps` converts); ignored with ``trace``.
    trace, step_s, scale
        Follow a bandwidth trace live: value ``i`` times ``scale`` from ``i * step_s`` s on.
    burst
        The bucket in bytes (default: each shaper's own).
    rtt_s
        Seconds the sender sleeps before each message.
    shaper
        ``"auto"`` (tbf if allowed, else the token bucket), ``"tbf"`` (raise
        :class:`ShapingUnavailable` if not allowed), ``"token-bucket"`` or ``"none"``.
    """

    def __init__(self, rate: float | None = None, *, trace: Trace | None = None, step_s: float = 1.0,
                 scale: float = 1.0, burst: int | None = None, rtt_s: float = 0.0, shaper: str = "auto",
                 latency_s: float = 0.05):  # fmt: skip
        if shaper not in SHAPERS:
            raise ValueError(f"shaper is one of {SHAPERS}, got {shaper!r}")
        if shaper != "none" and rate is None and trace is None:
            raise ValueError("an emulated link needs a rate (bytes/s) or a trace")
        self._rate, self._trace, self._step_s, self._scale = rate, trace, step_s, scale
        self._burst, self.rtt_s, self._latency_s, self._want = burst, rtt_s, latency_s, shaper
        self.shaper = "none"
        self.fallback_reason = ""
        self.netns: Netns | None = None
        self.bucket: TokenBucket | None = None

    def open(self) -> EmulatedLink:
        if self._want == "none":
            self.bucket = TokenBucket(math.inf, rtt_s=self.rtt_s) if self.rtt_s else None
            return self
        if self._want in ("auto", "tbf"):
            ok, why = kernel_shaping_status()
            if ok:
                self._open_tbf()
                return self
            if self._want == "tbf":
                raise ShapingUnavailable(why)
            self.fallback_reason = why
        if self._trace is not None:
            self.bucket = TokenBucket.from_trace(self._trace, self._step_s, scale=self._scale, burst=self._burst,
                                                 rtt_s=self.rtt_s)  # fmt: skip
        else:
            self.bucket = TokenBucket(self._rate, self._burst, self.rtt_s)
        self.shaper = "token-bucket"
        return self

    def _open_tbf(self) -> None:
        self.netns = Netns().create()
        try:
            if self._trace is not None:
                self.netns.latency_s = self._latency_s
                self.netns.follow(self._trace, self._step_s, scale=self._scale)
            else:
                self.netns.shape(self._rate, self._burst, self._latency_s)
        except BaseException:
            self.netns.close()
            self.netns = None
            raise
        self.bucket = TokenBucket(math.inf, rtt_s=self.rtt_s) if self.rtt_s else None
        self.shaper = "tbf"

    def close(self) -> None:
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    def __enter__(self) -> EmulatedLink:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the link's rate ---------------------------------------------------------------------
    @property
    def rate(self) -> float | None:
        """The target rate now, bytes/s (None when unshaped)."""
        if self.shaper == "tbf":
            if self._trace is not None and self.netns is not None and self.netns.rate is not None:
                return self.netns.rate
            return self._rate
        if self.shaper == "token-bucket" and self.bucket is not None:
            return self.bucket.rate
        return None

    def set_rate(self, rate: float) -> None:
        """Change the rate live (and stop following a trace)."""
        if self.shaper == "tbf" and self.netns is not None:
            self.netns.stop_following()
            self.netns.set_rate(rate)
            self._rate, self._trace = rate, None
        elif self.bucket is not None and self.shaper == "token-bucket":
            self.bucket.set_rate(rate)

    def schedule(self) -> TraceRate | None:
        return TraceRate(self._trace, self._step_s, self._scale) if self._trace is not None else None

    # -- servers and clients on the link --------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The :class:`~.connection.ConnectionOptions` fields of a connection on this link."""
        out: dict[str, Any] = {}
        if self.bucket is not None:
            out["shaper"] = self.bucket
        if self.shaper == "tbf":
            out["link"] = "tbf"
        return out

    async def start_server(self, handler, **kwargs: Any):
        """:func:`~.tcp.start_server` on the link (inside the namespace with tbf)."""
        if self.netns is not None:
            kwargs["sock"] = self.netns.listen_socket(kwargs.pop("host", "127.0.0.1"), kwargs.pop("port", 0))
        return await start_server(handler, **{**self.options(), **kwargs})

    async def connect(self, port: int, host: str = "127.0.0.1", **kwargs: Any):
        """:func:`~.tcp.connect` over the link (from a socket inside the namespace with tbf)."""
        if self.netns is not None:
            kwargs["sock"] = self.netns.socket()
        return await connect(host, port, **{**self.options(), **kwargs})

    def __repr__(self) -> str:
        rate = f"{self.rate * 8 / 1e9:.4g} Gbit/s" if self.rate else "unshaped"
        return f"<EmulatedLink {self.shaper} {rate} rtt={self.rtt_s:g}s>"
