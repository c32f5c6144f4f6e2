"""Baseline policies with the controller's interface (``choose(context) -> Decision``, ``observe``).

* :class:`AlwaysRaw`: never compress.
* :class:`StaticProfile`: always the same profile (raw when it is outside the request's
  quality budget), one per profile for "best static profile in hindsight".
* :class:`KVServeRule`: the rule-based adaptation of KVServe: the latency model times an
  EWMA of each profile's observed residual; a profile whose EWMA exceeds ``penalty`` is
  excluded for ``cooldown`` decisions, then reconsidered with its residual reset to 1.
* :class:`Oracle`: knows the true expected latency of every option (from the simulator)
  and picks the lowest; the reference for regret.

All share :class:`~tensorwire.control.policy.BasePolicy`'s request path: the same
context checks, the same raw fallback on bad input, the same bandwidth estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..kv.profiles import RAW, ProfileLibrary
from .context import Candidate, Decision, RequestContext
from .policy import BasePolicy
from .units import format_bandwidth, format_seconds

__all__ = ["AlwaysRaw", "KVServeRule", "Oracle", "StaticProfile"]


class AlwaysRaw(BasePolicy):
    """Send every cache uncompressed."""

    name = "always-raw"
    needs_bandwidth = False

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:
        row = self._row(RAW, kv, bw, 1.0, 1.0, 1.0, float(ctx.slo_s))
        return self._decision(ctx, kv, bw, source, [row], [], RAW, "raw: this policy never compresses")


class StaticProfile(BasePolicy):
    """Always the profile ``profile_name`` (raw when the request's quality budget excludes it)."""

    needs_bandwidth = False

    def __init__(self, library: ProfileLibrary, profile_name: str, **kwargs):
        super().__init__(library, **kwargs)
        if profile_name not in self.profiles:
            why = "its stages are not installed" if profile_name in self.dropped else f"the library holds {', '.join(library.names)}"
            raise KeyError(f"no usable profile {profile_name!r}: {why}")
        self.profile_name = profile_name
        self.name = f"static:{profile_name}"

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:
        allowed, excluded = self._budget(ctx)
        slo = float(ctx.slo_s)
        raw = self._row(RAW, kv, bw, 1.0, 1.0, 1.0, slo)
        if not any(p.name == self.profile_name for p in allowed):
            why = dict(excluded).get(self.profile_name, "outside the budget")
            return self._decision(ctx, kv, bw, source, [raw], excluded, RAW, f"raw: {self.profile_name} is excluded ({why})")
        row = self._row(self.profile_name, kv, bw, 1.0, 1.0, 1.0, slo)
        return self._decision(ctx, kv, bw, source, [raw, row], excluded, self.profile_name,
                              f"{self.profile_name}: static policy (model: {format_seconds(row.predicted)})")  # fmt: skip


class KVServeRule(BasePolicy):
    """Latency model x EWMA residual per arm, with a cooldown for penalised profiles.

    Parameters
    ----------
    alpha : float
        EWMA weight of the newest residual.
    penalty : float
        A profile whose EWMA residual exceeds this is penalised (excluded).
    cooldown : int
        Decisions a penalised profile stays excluded; afterwards its residual is reset to
        1 (trust the profile again) and it competes normally.
    """

    name = "kvserve-rule"

    def __init__(self, library: ProfileLibrary, *, alpha: float = 0.3, penalty: float = 1.25, cooldown: int = 50, **kwargs):
        super().__init__(library, **kwargs)
        if not 0 < alpha <= 1 or not penalty > 1 or int(cooldown) < 0:
            raise ValueError(f"need 0 < alpha <= 1, penalty > 1, cooldown >= 0; got {alpha}, {penalty}, {cooldown}")
        self.alpha, self.penalty, self.cooldown = float(alpha), float(penalty), int(cooldown)
        self.residual: dict[str, float] = {}
        self.penalised_until: dict[str, int] = {}

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:
        allowed, excluded = self._budget(ctx)
        slo = float(ctx.slo_s)
        rows: list[Candidate] = []
        for arm in (RAW, *(p.name for p in allowed)):
            until = self.penalised_until.get(arm)
            if until is not None:
                if self.decisions <= until:
                    excluded.append((arm, f"penalised (residual EWMA > {self.penalty}); cooldown until decision {until}"))
                    continue
                if explore:  # cooldown over: trust the measured profile again
                    del self.penalised_until[arm]
                    self.residual[arm] = 1.0
            r = self.residual.get(arm, 1.0)
            rows.append(self._row(arm, kv, bw, r, r, r, slo))
        feasible = [c for c in rows if c.meets_slo]
        best = min(feasible or rows, key=lambda c: c.predicted)
        verdict = "meets the SLO" if best.meets_slo or not math.isfinite(slo) else "no candidate meets the SLO"
        reason = (f"{best.name}: lowest predicted latency {format_seconds(best.predicted)} (EWMA residual "
                  f"{best.residual:.2f}) at {format_bandwidth(bw)}; {verdict}")  # fmt: skip
        return self._decision(ctx, kv, bw, source, rows, excluded, best.name, reason)

    def _learn(self, decision: Decision, residual: float) -> None:
        arm = decision.choice
        r = self.alpha * residual + (1.0 - self.alpha) * self.residual.get(arm, 1.0)
        self.residual[arm] = r
        if arm != RAW and r > self.penalty:
            self.penalised_until[arm] = self.decisions + self.cooldown


class Oracle(BasePolicy):
    """Chooses with the true expected latencies (only a simulator knows them).

    ``true_latency(context, arm)`` returns the expected latency of ``arm`` (a profile name
    or ``"raw"``) for this request, in seconds. Give the oracle contexts that carry the
    true ``bandwidth_bps`` so that its model column (shown by ``explain``) is exact too.
    """

    name = "oracle"

    def __init__(self, library: ProfileLibrary, true_latency: Callable[[RequestContext, str], float], **kwargs):
        super().__init__(library, **kwargs)
        self.true_latency = true_latency

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:
        allowed, excluded = self._budget(ctx)
        slo = float(ctx.slo_s)
        rows = []
        for arm in (RAW, *(p.name for p in allowed)):
            # The "residual" of the oracle is exact: true / model, so predicted == true.
            r = float(self.true_latency(ctx, arm)) / self.model_latency(arm, kv, bw)
            rows.append(self._row(arm, kv, bw, r, r, r, slo))
        best = min(rows, key=lambda c: c.predicted)
        return self._decision(ctx, kv, bw, source, rows, excluded, best.name,
                              f"{best.name}: lowest true latency {format_seconds(best.predicted)}")  # fmt: skip
