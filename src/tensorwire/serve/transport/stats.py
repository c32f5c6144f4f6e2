"""What one KV transfer cost: bytes on the wire, encode / wire / decode time, and their overlap.

Times are intervals of :func:`time.perf_counter` (one clock for the event loop and the
worker threads). ``wire`` intervals are when the connection moved the transfer's frames:
on the sender from the first write of a frame until the transport took its last byte,
on the receiver from the first byte of a frame until its last. ``overlap_s`` is how
long encoding (sender) or decoding (receiver) ran while frames were on the wire: the
time layer-by-layer pipelining saved over encoding, sending and decoding in series.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TransferStats", "union_length", "intersection_length"]

Interval = tuple[float, float]


def _merged(intervals: list[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def union_length(intervals: list[Interval]) -> float:
    """Seconds covered by at least one interval."""
    return sum(b - a for a, b in _merged(intervals))


def intersection_length(xs: list[Interval], ys: list[Interval]) -> float:
    """Seconds covered both by an interval of ``xs`` and by one of ``ys``."""
    a, b = _merged(xs), _merged(ys)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


@dataclass
class TransferStats:
    """One KV transfer seen from one side (``direction``: ``"send"`` or ``"recv"``).

    ``payload_bytes`` counts the KV payload (header JSON, bitmap, layer tables and bodies),
    ``wire_bytes`` every byte of the transfer's frames, headers included. ``shaper`` is
    the link emulation that ran: ``"tbf"``, ``"token-bucket"`` or ``"none"``.
    ``peer_encode_s`` is the sender's encode time, as its KV_END reported it.
    ``wire_intervals`` and ``frame_bytes`` are per frame, in order (a time series of the link).
    """

    request_id: str
    direction: str
    shaper: str = "none"
    n_layers: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    total_s: float = 0.0
    encode_s: float = 0.0
    wire_s: float = 0.0
    decode_s: float = 0.0
    overlap_s: float = 0.0
    peer_encode_s: float | None = None
    encode_intervals: list[Interval] = field(default_factory=list, repr=False)
    wire_intervals: list[Interval] = field(default_factory=list, repr=False)
    frame_bytes: list[int] = field(default_factory=list, repr=False)  # each frame's size, as wire_intervals
    decode_intervals: list[Interval] = field(default_factory=list, repr=False)

    def finish(self, started: float, ended: float) -> TransferStats:
        """Fill in the totals from the recorded intervals."""
        self.total_s = ended - started
        self.encode_s = float(sum(b - a for a, b in self.encode_intervals))
        self.decode_s = float(sum(b - a for a, b in self.decode_intervals))
        self.wire_s = union_length(self.wire_intervals)
        self.overlap_s = intersection_length(self.encode_intervals + self.decode_intervals, self.wire_intervals)
        return self

    @property
    def wire_gbit_s(self) -> float:
        """The rate while frames moved: wire bytes over wire seconds, Gbit/s."""
        return self.wire_bytes * 8 / self.wire_s / 1e9 if self.wire_s > 0 else 0.0

    @property
    def goodput_gbit_s(self) -> float:
        """Wire bytes over the whole transfer's time, Gbit/s."""
        return self.wire_bytes * 8 / self.total_s / 1e9 if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (without the intervals), e.g. for a benchmark's result file."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_intervals") and k != "frame_bytes"}
        out["wire_gbit_s"], out["goodput_gbit_s"] = self.wire_gbit_s, self.goodput_gbit_s
        return out
