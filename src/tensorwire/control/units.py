"""Quantities as the controller handles them: bytes, seconds and bytes per second.

:func:`is_positive` is the check every size, speed and time coming from outside (a
request's context, a measured transfer) must pass; :func:`format_seconds` and
:func:`format_bandwidth` are their display forms in decision reasons and tables.
Conversions to and from Gbit/s are :func:`~tensorwire.control.latency_model.gbps` and
:func:`~tensorwire.control.latency_model.to_gbps`.
"""

from __future__ import annotations

import math
from typing import Any

from .latency_model import to_gbps

__all__ = ["format_bandwidth", "format_seconds", "is_positive"]


def is_positive(x: Any) -> bool:
    """Whether ``x`` is a finite number > 0 (a bool is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def format_seconds(t: float) -> str:
    """A duration with three significant digits in s, ms or us (``inf`` and ``nan`` as such).

    >>> format_seconds(0.0123), format_seconds(2.5), format_seconds(4e-6)
    ('12.3 ms', '2.5 s', '4 us')
    """
    if not math.isfinite(t):
        return str(t)
    if t >= 1.0:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def format_bandwidth(bps: float | None) -> str:
    """A link speed (bytes/s) in Gbit/s, or ``"unknown"`` for None.

    >>> format_bandwidth(1.25e9), format_bandwidth(None)
    ('10 Gbps', 'unknown')
    """
    return "unknown" if bps is None else f"{to_gbps(bps):.3g} Gbps"
