"""Bandwidth traces for the simulator: one link speed per request.

* :func:`step_trace`: 1 -> 100 -> 5 Gbps in equal thirds (a link that gets fast, then congested);
* :func:`random_walk_trace`: a reflected random walk in log space between 1 and 50 Gbps;
* :func:`bursty_trace`: a synthetic bursty trace within the 11-48 Gbps range of the trace
  KVServe evaluates on (not that trace itself): a mean-reverting base level with sudden
  drops and bursts lasting tens of requests and a few percent of per-request jitter;
* :meth:`Trace.load`: any measured trace (one Gbps value per line, or a JSON list).

Values are bytes per second (``Trace.gbps`` for display). Generators are seeded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .latency_model import gbps

__all__ = ["TRACE_NAMES", "Trace", "bursty_trace", "make_trace", "random_walk_trace", "step_trace"]

TRACE_NAMES = ("step", "walk", "bursty")


@dataclass(frozen=True)
class Trace:
    """A per-request link speed (bytes/s) with a name and a one-line description."""

    name: str
    bandwidth_bps: np.ndarray = field(repr=False, compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        bw = np.asarray(self.bandwidth_bps, dtype=np.float64)
        if bw.ndim != 1 or bw.size == 0:
            raise ValueError(f"trace {self.name!r}: expected a non-empty 1-D sequence of bandwidths, got shape {bw.shape}")
        if not np.all(np.isfinite(bw)) or np.any(bw <= 0):
            bad = int(np.flatnonzero(~np.isfinite(bw) | (bw <= 0))[0])
            raise ValueError(f"trace {self.name!r}: bandwidth #{bad} is {bw[bad]!r}; expected finite values > 0")
        object.__setattr__(self, "bandwidth_bps", bw)

    def __len__(self) -> int:
        return self.bandwidth_bps.size

    @property
    def gbps(self) -> np.ndarray:
        return self.bandwidth_bps * 8.0 / 1e9

    def resized(self, n: int) -> Trace:
        """The first ``n`` requests, repeating the trace if it is shorter."""
        reps = math.ceil(n / len(self))
        return Trace(self.name, np.tile(self.bandwidth_bps, reps)[:n], self.description)

    @classmethod
    def from_gbps(cls, name: str, values, description: str = "") -> Trace:
        return cls(name, gbps(np.asarray(values, dtype=np.float64)), description)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trace:
        """A measured trace: a JSON list of Gbps values (or ``{"gbps": [...]}``), or text with
        one Gbps value per line (``#`` comments and a CSV's first column are accepted)."""
        path = Path(path)
        text = path.read_text()
        try:
            data = json.loads(text)
            values = data["gbps"] if isinstance(data, dict) else data
        except json.JSONDecodeError:
            values = []
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    try:
                        values.append(float(line.split(",")[0]))
                    except ValueError:
                        if values:  # only a header line may be non-numeric
                            raise ValueError(f"{path}: {line!r} is not a bandwidth in Gbps") from None
        return cls.from_gbps(path.stem, values, f"measured trace from {path.name}")


def step_trace(n: int, levels_gbps: tuple[float, ...] = (1.0, 100.0, 5.0)) -> Trace:
    """Equal-length segments at each level (default 1 -> 100 -> 5 Gbps)."""
    idx = np.minimum(np.arange(n) * len(levels_gbps) // max(n, 1), len(levels_gbps) - 1)
    desc = " -> ".join(f"{g:g}" for g in levels_gbps) + " Gbps in equal steps"
    return Trace.from_gbps("step", np.asarray(levels_gbps, dtype=np.float64)[idx], desc)


def random_walk_trace(n: int, lo_gbps: float = 1.0, hi_gbps: float = 50.0, step: float = 0.08, seed: int = 0) -> Trace:
    """A random walk in log space, reflected at the bounds; ``step``: per-request log sd."""
    rng = np.random.default_rng(seed)
    lo, hi = math.log(lo_gbps), math.log(hi_gbps)
    x = np.empty(n)
    cur = 0.5 * (lo + hi)
    for i, d in enumerate(rng.normal(0.0, step, n)):
        cur += d
        if cur > hi:  # reflect so that the walk spends time near the bounds without sticking
            cur = 2 * hi - cur
        if cur < lo:
            cur = 2 * lo - cur
        x[i] = cur
    return Trace.from_gbps("walk", np.exp(x), f"random walk between {lo_gbps:g} and {hi_gbps:g} Gbps (log step sd {step:g})")


def bursty_trace(
    n: int, lo_gbps: float = 11.0, hi_gbps: float = 48.0, seed: int = 0, event_rate: float = 0.03, mean_event: float = 15.0
) -> Trace:
    """A bursty link between ``lo_gbps`` and ``hi_gbps``.

    A base level mean-reverts (AR(1) in log space) around the geometric mean of the bounds;
    at rate ``event_rate`` per request an event (a congestion drop or a burst of free
    capacity) sets the level to a uniform draw within the bounds for a geometric number of
    requests (mean ``mean_event``); every request adds 3 % lognormal jitter.
    """
    rng = np.random.default_rng(seed)
    lo, hi = math.log(lo_gbps), math.log(hi_gbps)
    centre = 0.5 * (lo + hi)
    base = centre
    out = np.empty(n)
    event_left, event_level = 0, centre
    for i in range(n):
        base = centre + 0.97 * (base - centre) + rng.normal(0.0, 0.05)
        if event_left == 0 and rng.random() < event_rate:
            event_left = int(rng.geometric(1.0 / mean_event))
            event_level = rng.uniform(lo, hi)
        level = event_level if event_left > 0 else base
        event_left = max(event_left - 1, 0)
        out[i] = min(max(level + rng.normal(0.0, 0.03), lo), hi)
    desc = f"synthetic bursty trace between {lo_gbps:g} and {hi_gbps:g} Gbps (KVServe's range)"
    return Trace.from_gbps("bursty", np.exp(out), desc)


def make_trace(name: str, n: int, seed: int = 0) -> Trace:
    """A built-in trace by name (``step``, ``walk``, ``bursty``) or a trace file's path."""
    if name == "step":
        return step_trace(n)
    if name == "walk":
        return random_walk_trace(n, seed=seed)
    if name == "bursty":
        return bursty_trace(n, seed=seed)
    if Path(name).exists():
        return Trace.load(name).resized(n)
    raise ValueError(f"unknown trace {name!r}; expected one of {', '.join(TRACE_NAMES)} or a trace file's path")
