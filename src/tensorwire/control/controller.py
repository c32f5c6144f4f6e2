"""The online, service-aware controller: which pipeline (or raw) for this request.

Per request the controller

1. works out the cache size (``kv_bytes`` from the context length and the library's model
   shape) and the link speed (the context's, or an estimate learned from past transfers);
2. keeps the profiles within the request's quality budget, plus raw (always a candidate);
3. predicts each candidate's latency with the latency model times a residual sampled from
   the bandit (what it learned about how the profile really runs here);
4. chooses the candidate with the lowest predicted latency among those whose pessimistic
   latency (an upper quantile of the residual, default 90 %) meets the SLO, or, when
   none does, the lowest predicted latency overall;
5. returns a :class:`Decision` holding every candidate, its prediction and a reason.

After the transfer, :meth:`Controller.observe` learns the link speed from the bytes sent
and the wire time, and the chosen arm's residual ``observed / predicted``, re-predicted
at the link speed actually measured, so that a bandwidth misestimate is not blamed on
the profile.

Steps 1 and 2, the raw fallback and ``observe`` are the request path every policy shares
(:class:`~tensorwire.control.policy.BasePolicy`): it never raises, a bad context or an
internal error gives a raw decision with ``fallback=True`` and the reason.

Example
-------
>>> from tensorwire.kv.profiles import ProfileLibrary          # doctest: +SKIP
>>> ctl = Controller(ProfileLibrary.load("profiles.json"))     # doctest: +SKIP
>>> d = ctl.choose(RequestContext(tokens=4096, slo_s=0.2, max_ppl_increase=0.02, bandwidth_bps=gbps(10)))  # doctest: +SKIP
>>> d.choice, d.reason                                         # doctest: +SKIP
>>> ctl.observe(d, observed_latency=0.08, bytes_sent=3.1e6, transfer_time=0.0025)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from ..kv.profiles import RAW, ProfileLibrary
from .bandit import DiscountedThompson, DiscountedUCB, ResidualBandit
from .bandwidth import BandwidthEstimator
from .context import Candidate, Decision, RequestContext
from .policy import BasePolicy
from .units import format_bandwidth, format_seconds

__all__ = ["Controller"]


class Controller(BasePolicy):
    """The service-aware controller: latency model x learned residuals (see the module docstring).

    Parameters
    ----------
    library : ProfileLibrary
        Profiles to choose from; those whose stages are not installed are dropped with a
        :class:`ControlWarning` (listed in ``dropped`` and in every decision's ``excluded``).
    bandit : "thompson", "ucb" or a callable returning a ResidualBandit
        How residuals are learned (``seed`` seeds the built-in ones).
    latency_model : "pipelined" or "serial"
        See :mod:`tensorwire.control.latency_model`.
    overhead_s : float
        Fixed per-request time added to every candidate (raw included).
    estimator : BandwidthEstimator, optional
        Default: EWMA with alpha 0.5; ``initial_bandwidth_bps`` is its value before the first
        sample (None: the first request is sent raw, which measures the link).
    per_class : bool
        Keep residuals per workload class instead of one set for all requests.
    slo_quantile : float or None
        A candidate meets the SLO when this upper quantile of its latency does (None: when
        its sampled prediction does).
    discount, change : float
        Passed to the built-in bandits.
    """

    name = "controller"

    def __init__(
        self,
        library: ProfileLibrary,
        *,
        bandit: Literal["thompson", "ucb"] | Callable[[int], ResidualBandit] = "thompson",
        latency_model: Literal["serial", "pipelined"] = "pipelined",
        overhead_s: float = 0.0,
        estimator: BandwidthEstimator | None = None,
        initial_bandwidth_bps: float | None = None,
        per_class: bool = False,
        slo_quantile: float | None = 0.9,
        discount: float = 0.99,
        change: float = 5.0,
        seed: int | None = 0,
        deep_install_check: bool = False,
        name: str | None = None,
    ):
        super().__init__(library, latency_model=latency_model, overhead_s=overhead_s, estimator=estimator,
                         initial_bandwidth_bps=initial_bandwidth_bps, deep_install_check=deep_install_check)  # fmt: skip
        if slo_quantile is not None and not 0.5 <= slo_quantile < 1.0:
            raise ValueError(f"slo_quantile is {slo_quantile}; expected 0.5 <= q < 1 or None")
        if bandit == "thompson":
            self._make_bandit: Callable[[int], ResidualBandit] = (
                lambda i: DiscountedThompson(discount=discount, change=change, seed=None if seed is None else seed + i))
        elif bandit == "ucb":
            self._make_bandit = lambda i: DiscountedUCB(discount=discount, change=change, seed=seed)
        elif callable(bandit):
            self._make_bandit = bandit
        else:
            raise ValueError(f"bandit is {bandit!r}; expected 'thompson', 'ucb' or a callable(index) -> bandit")
        if name:
            self.name = name
        elif bandit == "ucb":
            self.name = "controller-ucb"
        self.per_class = per_class
        self.slo_quantile = slo_quantile
        self._bandits: dict[str, ResidualBandit] = {}

    def bandit(self, workload: str = "default") -> ResidualBandit:
        """The residual learner for a workload class (one shared learner unless ``per_class``)."""
        key = workload if self.per_class else "*"
        b = self._bandits.get(key)
        if b is None:
            b = self._bandits[key] = self._make_bandit(len(self._bandits))
        return b

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:
        bandit = self.bandit(ctx.workload)
        if explore:
            bandit.step()
        allowed, excluded = self._budget(ctx)
        slo = float(ctx.slo_s)
        rows = []
        for arm in (RAW, *(p.name for p in allowed)):
            residual, expected, upper, n = bandit.assess(arm, self.slo_quantile, explore)
            rows.append(self._row(arm, kv, bw, residual, expected, upper, slo, n))
        feasible = [c for c in rows if c.meets_slo]
        best = min(feasible or rows, key=lambda c: c.predicted)
        return self._decision(ctx, kv, bw, source, rows, excluded, best.name, self._reason(best, rows, feasible, slo, bw, kv))

    def _reason(self, best: Candidate, rows: list[Candidate], feasible: list[Candidate], slo: float, bw: float, kv: int) -> str:
        where = f"{kv / 1e6:.3g} MB at {format_bandwidth(bw)}"
        slo_text = f"the {format_seconds(slo)} SLO" + (f" (p{self.slo_quantile * 100:.0f})" if self.slo_quantile else "")
        others = sorted((c for c in rows if c.name != best.name), key=lambda c: c.predicted)
        runner = f"; next: {others[0].name} {format_seconds(others[0].predicted)}" if others else ""
        residual = f" (model {format_seconds(best.model_latency)} x residual {best.residual:.2f})" if best.residual != 1.0 else ""
        profiles = [c for c in rows if c.name != RAW]
        if not profiles:
            missed = f" (misses {slo_text})" if not feasible and math.isfinite(slo) else ""
            return f"raw: no profile within the quality budget; {format_seconds(best.predicted)} for {where}{missed}"
        if not feasible and math.isfinite(slo):
            return (f"{best.name}: no candidate meets {slo_text}; lowest predicted latency "
                    f"{format_seconds(best.predicted)}{residual} for {where}{runner}")  # fmt: skip
        if best.name == RAW:
            top = min(profiles, key=lambda c: c.predicted)
            return (f"raw: sending uncompressed is fastest for {where} ({format_seconds(best.predicted)}); best profile "
                    f"{top.name} would take {format_seconds(top.predicted)} (beats raw below "
                    f"{format_bandwidth(top.break_even_bps) if math.isfinite(top.break_even_bps) else 'any speed'})")  # fmt: skip
        meets = f" of {len(feasible)} that meet {slo_text}" if math.isfinite(slo) else ""
        return (f"{best.name}: lowest predicted latency {format_seconds(best.predicted)}{residual}{meets} for {where}"
                f"{runner}; raw would take {format_seconds(rows[0].predicted)}")  # fmt: skip

    def _learn(self, decision: Decision, residual: float) -> None:
        self.bandit(decision.workload).update(decision.choice, residual)
