"""How long it takes to move a KV cache: pure functions of sizes, throughputs and bandwidth.

Units: bytes, seconds and bytes per second everywhere; :func:`gbps` and :func:`to_gbps`
convert link speeds quoted in gigabits per second (10^9 bits/s). Every function also
accepts numpy arrays (broadcasting), which the simulator uses.

Two models of one compressed transfer of ``kv_bytes`` bytes (the uncompressed cache) with
compression ratio ``r``, encode and decode throughputs ``e`` and ``d`` (bytes of the
uncompressed cache per second) over a link of ``B`` bytes per second:

* **serial**: encode everything, send, decode everything::

      t = kv/e + kv/(r B) + kv/d (+ overhead)

* **pipelined**: the cache is ``L`` layers; layer ``i`` is sent while layer ``i+1`` is
  encoded and layer ``i-1`` decoded. With per-layer stage times ``a = kv/(L e)``,
  ``x = kv/(L r B)``, ``c = kv/(L d)`` this is a 3-machine flow shop of ``L`` identical
  jobs, whose makespan is exactly::

      t = a + x + c + (L - 1) max(a, x, c) (+ overhead)

  i.e. ``L`` times the slowest stage plus one layer of fill/drain through the other two.
  ``L = 1`` gives the serial model.

Sending raw is ``kv/B (+ overhead)`` in both models (nothing to encode or decode).

The break-even bandwidth of a profile is the link speed below which it beats raw:
closed forms for both models are in :func:`break_even_bandwidth`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "MODELS",
    "break_even_bandwidth",
    "gbps",
    "kv_cache_bytes",
    "latency",
    "pipelined_latency",
    "raw_latency",
    "serial_latency",
    "to_gbps",
]

Number = float | np.ndarray
Model = Literal["serial", "pipelined"]
MODELS = ("serial", "pipelined")


def gbps(x: Number) -> Number:
    """Gigabits per second -> bytes per second (``gbps(8) == 1e9``)."""
    return x * 1e9 / 8.0


def to_gbps(bytes_per_second: Number) -> Number:
    """Bytes per second -> gigabits per second."""
    return bytes_per_second * 8.0 / 1e9


def kv_cache_bytes(tokens: int, n_layers: int, kv_heads: int, head_dim: int, itemsize: int = 2, batch: int = 1) -> int:
    """Bytes of a KV cache: ``2 (K and V) x layers x kv_heads x head_dim x tokens x itemsize x batch``.

    >>> kv_cache_bytes(1024, n_layers=30, kv_heads=3, head_dim=64)   # SmolLM2-135M, bf16
    23592960
    """
    return 2 * n_layers * kv_heads * head_dim * tokens * itemsize * batch


def raw_latency(kv_bytes: Number, bandwidth: Number, overhead: float = 0.0) -> Number:
    """Seconds to send ``kv_bytes`` uncompressed over ``bandwidth`` bytes/s.

    >>> raw_latency(1e9, gbps(8))
    1.0
    """
    return kv_bytes / bandwidth + overhead


def serial_latency(
    kv_bytes: Number, ratio: Number, encode_bps: Number, decode_bps: Number, bandwidth: Number, overhead: float = 0.0
) -> Number:
    """Seconds to encode everything, send ``kv_bytes / ratio`` bytes, then decode everything.

    >>> serial_latency(1e9, ratio=4.0, encode_bps=2e9, decode_bps=4e9, bandwidth=1e9)
    1.0
    """
    return kv_bytes / encode_bps + kv_bytes / (ratio * bandwidth) + kv_bytes / decode_bps + overhead


def pipelined_latency(
    kv_bytes: Number,
    ratio: Number,
    encode_bps: Number,
    decode_bps: Number,
    bandwidth: Number,
    n_layers: int,
    overhead: float = 0.0,
) -> Number:
    """Seconds for a layer-pipelined transfer: encode, send and decode overlap per layer.

    ``L`` equal layers through three stages (a flow shop of identical jobs): the makespan
    is the sum of one layer's three stage times plus ``L - 1`` times the slowest one.

    >>> pipelined_latency(1e9, 4.0, 2e9, 4e9, 1e9, n_layers=1)   # one layer: serial
    1.0
    >>> round(pipelined_latency(1e9, 4.0, 2e9, 4e9, 1e9, n_layers=10), 6)   # encode-bound
    0.55
    """
    if n_layers < 1:
        raise ValueError(f"n_layers is {n_layers}; expected >= 1")
    per_layer = kv_bytes / n_layers
    a = per_layer / encode_bps
    x = per_layer / (ratio * bandwidth)
    c = per_layer / decode_bps
    if isinstance(a, np.ndarray) or isinstance(x, np.ndarray) or isinstance(c, np.ndarray):
        slowest = np.maximum(np.maximum(a, x), c)
    else:  # plain floats: the controller's hot path, and a float result
        slowest = max(a, x, c)
    return a + x + c + (n_layers - 1) * slowest + overhead


def latency(
    model: Model,
    kv_bytes: Number,
    ratio: Number,
    encode_bps: Number,
    decode_bps: Number,
    bandwidth: Number,
    n_layers: int = 1,
    overhead: float = 0.0,
) -> Number:
    """Dispatch to :func:`serial_latency` or :func:`pipelined_latency` by name."""
    if model == "serial":
        return serial_latency(kv_bytes, ratio, encode_bps, decode_bps, bandwidth, overhead)
    if model == "pipelined":
        return pipelined_latency(kv_bytes, ratio, encode_bps, decode_bps, bandwidth, n_layers, overhead)
    raise ValueError(f"latency model {model!r}; expected one of {MODELS}")


def break_even_bandwidth(
    ratio: float,
    encode_bps: float,
    decode_bps: float,
    *,
    n_layers: int = 1,
    overhead: float = 0.0,
    kv_bytes: float | None = None,
) -> float:
    """The bandwidth (bytes/s) below which the profile is faster than sending raw.

    ``overhead`` is the profile's extra fixed time per request over raw (e.g. pipeline
    setup); with ``overhead > 0`` the answer depends on the size, so ``kv_bytes`` is
    required. Returns ``inf`` when the profile always wins (infinitely fast codec and
    ``ratio > 1``) and ``0.0`` when it never does (``ratio <= 1``).

    Derivation (write ``y = 1/B`` and per-byte costs ``s = 1/e + 1/d``, ``m = max(1/e, 1/d)``;
    all latencies are linear in ``y``, raw's with the larger slope ``kv``, so they cross
    once at ``y*`` and the profile wins for every ``y > y*``):

    * serial: ``kv s + kv y / r + o = kv y``  =>  ``y* = (s + o/kv) / (1 - 1/r)``.
    * pipelined, ``L`` layers of ``k = kv/L`` bytes: the profile costs
      ``k (s + y/r) + (L-1) k max(m, y/r) + o``. If compute is the bottleneck
      (``y*/r <= m``): ``y* = (s + (L-1) m + o/k) / (L - 1/r)``. If the link is
      (``y*/r >= m``): ``y* = (s + o/k) / (L (1 - 1/r))``. Exactly one case is consistent
      (the crossing is unique); ``L = 1`` reduces to the serial form.

    >>> round(break_even_bandwidth(4.0, 2e9, 4e9) / 1e9, 6)       # serial, bytes/s
    1.0
    """
    if ratio <= 1.0:
        return 0.0
    if overhead and kv_bytes is None:
        raise ValueError("break_even_bandwidth with an overhead depends on the size: pass kv_bytes")
    if n_layers < 1:
        raise ValueError(f"n_layers is {n_layers}; expected >= 1")
    s = 1.0 / encode_bps + 1.0 / decode_bps
    m = max(1.0 / encode_bps, 1.0 / decode_bps)
    o_per_byte = overhead / kv_bytes if overhead else 0.0  # overhead / kv
    L = n_layers
    if L == 1:
        y = (s + o_per_byte) / (1.0 - 1.0 / ratio)
    else:
        o_layer = o_per_byte * L  # overhead / k with k = kv / L
        y_compute = (s + (L - 1) * m + o_layer) / (L - 1.0 / ratio)
        y_link = (s + o_layer) / (L * (1.0 - 1.0 / ratio))
        # The consistent case; at the boundary both agree. Tolerate rounding.
        y = y_compute if y_compute / ratio <= m * (1 + 1e-12) else y_link
    return math.inf if y <= 0.0 else 1.0 / y
