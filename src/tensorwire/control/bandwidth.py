"""The link speed learned from observed transfers (bytes/s), for requests that do not
state one."""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any, Literal

from ..errors import ControlWarning
from .units import is_positive

__all__ = ["BandwidthEstimator"]


class BandwidthEstimator:
    """Link speed learned from observed transfers (bytes/s).

    ``method="ewma"``: exponentially weighted moving average with weight ``alpha`` on the
    newest sample. ``method="harmonic"``: harmonic mean of the last ``window`` samples
    (time-weighted, so a slow transfer pulls it down more than a fast one pulls it up: a
    conservative choice for SLOs). NaN, infinite, zero or negative samples are rejected
    with a :class:`ControlWarning` and ignored.
    """

    def __init__(self, method: Literal["ewma", "harmonic"] = "ewma", alpha: float = 0.5, window: int = 5, initial: float | None = None):
        if method not in ("ewma", "harmonic"):
            raise ValueError(f"method is {method!r}; expected 'ewma' or 'harmonic'")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha is {alpha}; expected 0 < alpha <= 1")
        if int(window) < 1:
            raise ValueError(f"window is {window}; expected >= 1")
        if initial is not None and not is_positive(initial):
            raise ValueError(f"initial bandwidth is {initial!r}; expected a finite number > 0 (bytes/s) or None")
        self.method = method
        self.alpha = float(alpha)
        self._recent: deque[float] = deque(maxlen=int(window))
        self._ewma: float | None = None
        self.initial = initial
        self.samples = 0
        self.rejected = 0

    def add(self, bytes_per_second: Any) -> bool:
        """Learn one sample; returns False (and warns) when it was rejected."""
        if not is_positive(bytes_per_second):
            self.rejected += 1
            warnings.warn(f"bandwidth sample {bytes_per_second!r} ignored: expected a finite number > 0 (bytes/s)",
                          ControlWarning, stacklevel=2)  # fmt: skip
            return False
        x = float(bytes_per_second)
        self.samples += 1
        self._recent.append(x)
        self._ewma = x if self._ewma is None else self.alpha * x + (1.0 - self.alpha) * self._ewma
        return True

    def add_transfer(self, nbytes: Any, seconds: Any) -> bool:
        """Learn from one transfer of ``nbytes`` bytes that spent ``seconds`` on the wire."""
        if not (is_positive(nbytes) and is_positive(seconds)):
            self.rejected += 1
            warnings.warn(f"transfer sample ({nbytes!r} bytes in {seconds!r} s) ignored: expected finite numbers > 0",
                          ControlWarning, stacklevel=2)  # fmt: skip
            return False
        return self.add(float(nbytes) / float(seconds))

    @property
    def estimate(self) -> float | None:
        """The current estimate (bytes/s), ``initial`` before any sample, or None."""
        if self.samples == 0:
            return self.initial
        if self.method == "ewma":
            return self._ewma
        return len(self._recent) / sum(1.0 / x for x in self._recent)
