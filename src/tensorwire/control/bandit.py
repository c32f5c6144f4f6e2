"""Online correction of the latency model: one multiplicative residual per arm.

An *arm* is a profile name (or ``"raw"``). After each transfer the controller feeds the
residual ``r = observed latency / predicted latency`` of the arm it used; the bandit keeps
a posterior over ``log r`` and, at decision time, hands back a residual to multiply the
model's prediction with.

Model (per arm): ``log r ~ Normal(mu, sigma^2)`` with a Normal prior ``mu ~ N(mu0, tau^2)``,
``mu0 = 0`` ("the profile runs as measured, give or take ``tau``") and ``sigma`` estimated from the
arm's own scatter, shrunk towards a prior guess (a Normal model with known-ish variance:
unlike the conjugate Normal-Inverse-Gamma, a mean far from the prior does not inflate the
noise estimate, so a profile that is consistently 2x slow is known to be 2x slow with a
tight posterior). The sufficient statistics are *discounted*: at every decision all arms'
statistics are multiplied by ``discount`` (0.99: about the last 100 observations count).
Two consequences, both wanted:

* an arm that is not chosen slowly forgets what it learned, its posterior widens back to
  the prior, and Thompson sampling re-tries it eventually: a profile that was slow for a
  while gets a second chance;
* an arm that is chosen all the time keeps about ``1 / (1 - discount)`` observations and
  so follows drift.

A sudden change (a profile becoming 2x slower) would take many observations to move a
posterior worth 100 observations, so each arm runs a two-sided CUSUM change detector
(Page 1954) on its standardised prediction errors ``z = (log r - E[mu]) / sd``:
``g+ = max(0, g+ + z - k)``, ``g- = max(0, g- - z - k)`` with ``k = 0.5``. When either
exceeds ``change`` (default 5: for Normal noise about one false alarm per ~450
observations of an unchanged arm; a 3-sigma shift is caught after 2 observations, a 2x
slowdown at once), the arm *restarts* from the observations of the current CUSUM run, with
its prior mean moved to their level (decaying back to "as measured" at the discount
rate): its estimate jumps to the new level at once, a slowed profile is abandoned within
a few decisions, and it is still re-tried once the change has been forgotten.

:class:`DiscountedThompson` samples ``mu`` from its posterior; :class:`DiscountedUCB`
returns an optimistic residual (posterior mean minus ``c`` posterior standard deviations):
deterministic, and a baseline for Thompson sampling. Both are seeded and reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Protocol

import numpy as np

from ..errors import ControlWarning

__all__ = ["ArmState", "DiscountedThompson", "DiscountedUCB", "ResidualBandit", "ResidualPrior"]

# A residual outside [1/20, 20] is a measurement glitch, not the profile: clip before learning.
LOG_CLIP = math.log(20.0)


@lru_cache(maxsize=16)
def _z(quantile: float) -> float:
    return NormalDist().inv_cdf(quantile)


@dataclass(frozen=True)
class ResidualPrior:
    """Prior beliefs about an arm's log-residual.

    Parameters
    ----------
    tau : float
        Prior standard deviation of ``mu = E[log r]``: how far off the library may be on
        this machine (0.1: about 10 %). Also the width a forgotten arm returns to.
    sigma : float
        Prior guess of the per-transfer noise of ``log r`` (0.1: about 10 % jitter).
    nu : float
        Weight of that guess, in observations.
    """

    tau: float = 0.1
    sigma: float = 0.1
    nu: float = 4.0

    def __post_init__(self) -> None:
        if not (self.tau > 0 and self.sigma > 0 and self.nu > 0 and math.isfinite(self.tau + self.sigma + self.nu)):
            raise ValueError(f"ResidualPrior needs finite tau, sigma, nu > 0; got {self}")


@dataclass(frozen=True)
class ArmState:
    """Posterior summary of one arm: effective observation count and log-residual moments."""

    n: float  # discounted number of observations
    mean_log: float  # posterior mean of mu = E[log r]
    std_log: float  # posterior standard deviation of mu
    sigma_log: float  # estimated noise of one observation of log r

    @property
    def residual(self) -> float:
        """The posterior median residual ``exp(E[mu])``."""
        return math.exp(self.mean_log)


class ResidualBandit(Protocol):
    """What the controller needs from a residual learner."""

    def sample(self, arm: str) -> float:
        """The residual to apply at this decision (sampled or optimistic)."""

    def expected(self, arm: str) -> float:
        """The posterior median residual (no exploration)."""

    def upper(self, arm: str, quantile: float) -> float:
        """An upper ``quantile`` of the next observed residual (for SLO checks)."""

    def assess(self, arm: str, quantile: float | None, explore: bool) -> tuple[float, float, float, float]:
        """(residual to apply, median residual, upper-quantile residual, effective observations)."""

    def update(self, arm: str, residual: float) -> bool:
        """Learn one observed residual; returns False (with a warning) if it was unusable."""

    def step(self) -> None:
        """One decision went by: discount every arm."""

    def state(self, arm: str) -> ArmState:
        """Posterior summary of ``arm``."""


class _Stats:
    """Discounted sufficient statistics of one arm (count, sum and sum of squares of log r)
    plus its CUSUM state: both sums, and how many of the recent observations each has run over."""

    __slots__ = ("down", "down_len", "mu0", "n", "recent", "s", "ss", "up", "up_len")

    def __init__(self) -> None:
        self.mu0 = 0.0  # prior mean of log r: 0 ("as measured"), or the level found at a change point
        self.n = 0.0
        self.s = 0.0
        self.ss = 0.0
        self.up = self.down = 0.0
        self.up_len = self.down_len = 0
        self.recent: deque[float] = deque(maxlen=16)

    def add(self, x: float) -> None:
        self.n += 1.0
        self.s += x
        self.ss += x * x


class _Discounted:
    """Shared machinery: per-arm discounted Normal posteriors with change-point restarts."""

    DRIFT = 0.5  # CUSUM reference value k, in standard deviations

    def __init__(self, discount: float = 0.99, prior: ResidualPrior | None = None, change: float = 5.0, seed: int | None = 0):
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount is {discount}; expected 0 < discount <= 1 (1: never forget)")
        if not change > 0:
            raise ValueError(f"change is {change}; expected a CUSUM threshold > 0 (inf: never restart)")
        self.discount = float(discount)
        self.prior = prior or ResidualPrior()
        self.change = float(change)
        self.rng = np.random.default_rng(seed)
        self._arms: dict[str, _Stats] = {}
        self.restarts: dict[str, int] = {}

    def _get(self, arm: str) -> _Stats:
        stats = self._arms.get(arm)
        if stats is None:
            stats = self._arms[arm] = _Stats()
        return stats

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self._arms)

    def _posterior(self, st: _Stats) -> tuple[float, float, float]:
        """(posterior mean of mu, posterior variance of mu, noise variance sigma^2)."""
        p = self.prior
        n = st.n
        scatter = max(st.ss - st.s * st.s / n, 0.0) if n > 1e-12 else 0.0
        sigma2 = (p.nu * p.sigma**2 + scatter) / (p.nu + n)
        precision = 1.0 / p.tau**2 + n / sigma2
        return (st.mu0 / p.tau**2 + st.s / sigma2) / precision, 1.0 / precision, sigma2

    def state(self, arm: str) -> ArmState:
        st = self._get(arm)
        mu, var, sigma2 = self._posterior(st)
        return ArmState(n=st.n, mean_log=mu, std_log=math.sqrt(var), sigma_log=math.sqrt(sigma2))

    def expected(self, arm: str) -> float:
        return math.exp(self._posterior(self._get(arm))[0])

    def upper(self, arm: str, quantile: float) -> float:
        """Upper ``quantile`` of the next observed residual (Normal predictive)."""
        mu, var, sigma2 = self._posterior(self._get(arm))
        return math.exp(min(mu + _z(quantile) * math.sqrt(var + sigma2), LOG_CLIP))

    def assess(self, arm: str, quantile: float | None, explore: bool) -> tuple[float, float, float, float]:
        """What a decision needs, from one posterior evaluation: (residual to apply, posterior
        median residual, upper ``quantile`` residual or the applied one when None, observations)."""
        st = self._get(arm)
        mu, var, sigma2 = self._posterior(st)
        expected = math.exp(mu)
        applied = self.sample(arm) if explore else expected
        upper = applied if quantile is None else math.exp(min(mu + _z(quantile) * math.sqrt(var + sigma2), LOG_CLIP))
        return applied, expected, upper, st.n

    def step(self) -> None:
        g = self.discount
        if g == 1.0:
            return
        for st in self._arms.values():
            st.n *= g
            st.s *= g
            st.ss *= g
            st.mu0 *= g

    def update(self, arm: str, residual: float) -> bool:
        try:
            residual = float(residual)
        except (TypeError, ValueError):
            residual = math.nan
        if not (math.isfinite(residual) and residual > 0.0):
            warnings.warn(f"residual {residual!r} for arm {arm!r} ignored: expected a finite number > 0", ControlWarning, stacklevel=2)
            return False
        x = min(max(math.log(residual), -LOG_CLIP), LOG_CLIP)
        st = self._get(arm)
        if st.n >= 1.0 and math.isfinite(self.change):
            mu, var, sigma2 = self._posterior(st)
            z = (x - mu) / math.sqrt(var + sigma2)
            st.up = max(0.0, st.up + z - self.DRIFT)
            st.down = max(0.0, st.down - z - self.DRIFT)
            st.up_len = st.up_len + 1 if st.up > 0 else 0
            st.down_len = st.down_len + 1 if st.down > 0 else 0
            st.recent.append(x)
            if max(st.up, st.down) > self.change:
                # A change point: what was learned describes another regime. Start over from
                # the observations since the alarming side of the detector started climbing
                # (only this one when it alone crosses the threshold: a jump).
                k = st.up_len if st.up > self.change else st.down_len
                if abs(z) - self.DRIFT > self.change:
                    k = 1
                since = list(st.recent)[-k:]
                # The new regime's prior is centred where the detector found it (not on the
                # library's value, which it contradicts) and decays back like everything else.
                st.mu0 = sum(since) / len(since)
                st.n = st.s = st.ss = st.up = st.down = 0.0
                st.up_len = st.down_len = 0
                st.recent.clear()
                for r in since:
                    st.add(r)
                self.restarts[arm] = self.restarts.get(arm, 0) + 1
                return True
        st.add(x)
        return True


class DiscountedThompson(_Discounted):
    """Thompson sampling of multiplicative latency residuals (see the module docstring).

    Parameters
    ----------
    discount : float
        Forgetting factor applied to every arm at every decision (``step``); ``1 / (1 -
        discount)`` is the effective memory in decisions.
    prior : ResidualPrior
        Where a never-seen (or fully forgotten) arm starts.
    change : float
        CUSUM threshold (in predictive standard deviations) at which an arm restarts from
        its recent observations (``inf``: never).
    seed : int or None
        Seed of the sampler.

    Examples
    --------
    >>> b = DiscountedThompson(seed=0)
    >>> for _ in range(5):
    ...     b.step(); _ = b.update("kivi2", 2.0)       # the profile runs 2x slower than measured
    >>> round(b.expected("kivi2"), 1)
    1.9
    """

    def sample(self, arm: str) -> float:
        mu, var, _ = self._posterior(self._get(arm))
        x = self.rng.normal(mu, math.sqrt(var))
        return math.exp(min(max(x, -LOG_CLIP), LOG_CLIP))


class DiscountedUCB(_Discounted):
    """Optimistic residuals: ``exp(E[mu] - c * sd[mu])`` over the discounted posterior.

    Lower latency is better, so optimism means a *smaller* residual; an arm forgotten by
    discounting regains the prior's width and is re-tried when its optimistic residual
    makes it the fastest candidate.
    """

    def __init__(self, c: float = 1.0, discount: float = 0.99, prior: ResidualPrior | None = None, change: float = 5.0,
                 seed: int | None = 0):  # fmt: skip
        super().__init__(discount, prior, change, seed)
        if not c >= 0:
            raise ValueError(f"c is {c}; expected >= 0")
        self.c = float(c)

    def sample(self, arm: str) -> float:
        st = self.state(arm)
        return math.exp(max(st.mean_log - self.c * st.std_log, -LOG_CLIP))
