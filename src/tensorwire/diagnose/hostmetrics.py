"""Host metrics a rank reports beside its collectives, read from /proc (Linux; zeros elsewhere)."""

from __future__ import annotations

import os

__all__ = ["host_sample"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _steal_seconds() -> float:
    """Host-wide CPU time stolen by the hypervisor: a slow rank on a noisy VM shows it here."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        return int(fields[8]) / _TICK if fields[0] == b"cpu" and len(fields) > 8 else 0.0
    except OSError:
        return 0.0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _net_bytes() -> tuple[int, int]:
    """Received and sent bytes over every interface of this network namespace."""
    rx = tx = 0
    try:
        with open("/proc/net/dev", "rb") as f:
            for line in f.readlines()[2:]:
                fields = line.split(b":", 1)[1].split()
                rx += int(fields[0])
                tx += int(fields[8])
    except (OSError, IndexError, ValueError):
        pass
    return rx, tx


def host_sample() -> dict:
    """CPU seconds of this process, host steal seconds, RSS and network counters."""
    t = os.times()
    rx, tx = _net_bytes()
    return {"cpu": round(t.user + t.system, 3), "steal": _steal_seconds(), "rss": _rss_bytes(), "rx": rx, "tx": tx}
