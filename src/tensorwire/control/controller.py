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

The request path never raises: a bad context (missing size, NaN bandwidth, negative
budget, ...) or an internal error gives a raw decision with ``fallback=True`` and the
reason; bad measurements given to ``observe`` are ignored with a :class:`ControlWarning`.

Example
-------
>>> from tensorwire.kv.profiles import ProfileLibrary          # doctest: +SKIP
>>> ctl = Controller(ProfileLibrary.load("profiles.json"))     # doctest: +SKIP
>>> d = ctl.choose(RequestContext(tokens=4096, slo_s=0.2, max_ppl_increase=0.02, bandwidth_bps=gbps(10)))  # doctest: +SKIP
>>> d.choice, d.reason                                         # doctest: +SKIP
>>> ctl.observe(d, observed_latency=0.08, bytes_sent=3.1e6, transfer_time=0.0025)  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import math
import threading
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..kv.profiles import RAW, Profile, ProfileLibrary
from .bandit import ControlWarning, DiscountedThompson, DiscountedUCB, ResidualBandit
from .latency_model import MODELS, break_even_bandwidth, latency, raw_latency, to_gbps

__all__ = [
    "RAW",
    "BandwidthEstimator",
    "BasePolicy",
    "Candidate",
    "ControlWarning",
    "Controller",
    "Decision",
    "Policy",
    "RequestContext",
    "format_bandwidth",
    "format_seconds",
]


def format_seconds(t: float) -> str:
    if not math.isfinite(t):
        return str(t)
    if t >= 1.0:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} us"


def format_bandwidth(bps: float | None) -> str:
    return "unknown" if bps is None else f"{to_gbps(bps):.3g} Gbps"


def _positive(x: Any) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class RequestContext:
    """What the controller knows about one request. Nothing here is validated on
    construction (the request path must not raise); the controller checks it and falls
    back to raw, with the reason, when something is unusable.

    Parameters
    ----------
    tokens : int, optional
        Context length; ``kv_bytes`` follows from the library's model shape.
    kv_bytes : int, optional
        Bytes of the cache to move, when known directly (wins over ``tokens``).
    slo_s : float
        Latency objective for moving the cache, seconds (``inf``: none).
    max_ppl_increase, max_retrieval_drop : float
        Quality budget (relative perplexity increase; retrieval points).
    workload : str
        Workload class; residuals are kept per class when the controller has ``per_class``.
    bandwidth_bps : float, optional
        A known link speed for this request, bytes/s (default: the learned estimate).
    request_id : int, optional
        Carried into the decision, for logs and the simulator.
    """

    tokens: int | None = None
    kv_bytes: int | None = None
    slo_s: float = math.inf
    max_ppl_increase: float = math.inf
    max_retrieval_drop: float = math.inf
    workload: str = "default"
    bandwidth_bps: float | None = None
    request_id: int | None = None


@dataclass(frozen=True)
class Candidate:
    """One option the policy weighed, with everything that went into its prediction."""

    name: str
    ratio: float
    ppl_increase: float
    retrieval_drop: float
    model_latency: float  # the latency model alone, seconds
    residual: float  # the residual applied at this decision (sampled, optimistic or learned)
    expected_residual: float  # the posterior median residual
    predicted: float  # model_latency * residual
    upper: float  # pessimistic latency used for the SLO check
    meets_slo: bool
    break_even_bps: float  # link speed below which this beats raw (inf/0: always/never)
    observations: float = 0.0  # effective observations behind the residual


@dataclass(frozen=True)
class Decision:
    """The outcome of ``choose``: pass it back to ``observe`` after the transfer."""

    choice: str
    policy: str
    reason: str
    kv_bytes: int | None
    bandwidth_bps: float | None
    bandwidth_source: str  # "context", "estimate", "initial" or "none"
    slo_s: float
    workload: str
    candidates: tuple[Candidate, ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()  # (profile name, why it was not a candidate)
    fallback: bool = False  # True when bad input or an internal error forced raw
    request_id: int | None = None
    profile: Profile | None = field(default=None, compare=False, repr=False)

    @property
    def is_raw(self) -> bool:
        return self.choice == RAW

    @property
    def pipeline(self) -> dict[str, Any] | None:
        """The chosen pipeline config, or None for raw."""
        return None if self.profile is None else self.profile.pipeline

    def candidate(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    @property
    def chosen(self) -> Candidate | None:
        return self.candidate(self.choice)

    @property
    def predicted(self) -> float:
        c = self.chosen
        return c.predicted if c is not None else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("profile")
        out["pipeline"] = self.pipeline
        out["excluded"] = [list(e) for e in self.excluded]
        return out


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
        if initial is not None and not _positive(initial):
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
        if not _positive(bytes_per_second):
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
        if not (_positive(nbytes) and _positive(seconds)):
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


class Policy(abc.ABC):
    """The interface every policy (controller or baseline) implements; neither method raises
    on bad input."""

    name: str = "policy"

    @abc.abstractmethod
    def choose(self, context: RequestContext) -> Decision:
        """Decide for one request."""

    @abc.abstractmethod
    def observe(self, decision: Decision, observed_latency: float, bytes_sent: float | None = None,
                transfer_time: float | None = None) -> None:  # fmt: skip
        """Learn from the outcome of ``decision``."""


class BasePolicy(Policy):
    """Shared request-path machinery: context checks, latency model, bandwidth estimate,
    candidate building, the raw fallback and the exception guard.

    Subclasses implement ``_decide(context, kv_bytes, bandwidth, source, explore)`` and, to
    learn, ``_learn(decision, residual)``. A policy whose choice does not depend on the link
    sets ``needs_bandwidth = False`` and may get ``bandwidth=None`` (its predictions are NaN).
    """

    needs_bandwidth = True

    def __init__(
        self,
        library: ProfileLibrary,
        *,
        latency_model: Literal["serial", "pipelined"] = "pipelined",
        overhead_s: float = 0.0,
        estimator: BandwidthEstimator | None = None,
        initial_bandwidth_bps: float | None = None,
        deep_install_check: bool = False,
    ):
        if not isinstance(library, ProfileLibrary):
            raise TypeError(f"library is a {type(library).__name__}; expected a ProfileLibrary (ProfileLibrary.load(path))")
        if latency_model not in MODELS:
            raise ValueError(f"latency_model is {latency_model!r}; expected one of {MODELS}")
        if not (math.isfinite(overhead_s) and overhead_s >= 0):
            raise ValueError(f"overhead_s is {overhead_s!r}; expected a finite number >= 0")
        self.library = library
        self.latency_model = latency_model
        self.overhead_s = float(overhead_s)
        self.estimator = estimator or BandwidthEstimator(initial=initial_bandwidth_bps)
        self.n_layers = library.model.n_layers
        missing = library.check_installed(deep=deep_install_check)
        for name, ids in missing.items():
            warnings.warn(f"profile {name!r} dropped: its stage(s) {', '.join(ids)} are not installed here",
                          ControlWarning, stacklevel=3)  # fmt: skip
        self.dropped = dict(missing)
        self.profiles: dict[str, Profile] = {p.name: p for p in library if p.name not in missing}
        self._break_even = {
            p.name: break_even_bandwidth(p.ratio, p.encode_rate, p.decode_rate, n_layers=self._layers())
            for p in self.profiles.values()
        }
        self._lock = threading.RLock()
        self.decisions = 0

    # ---- model ---------------------------------------------------------------------
    def _layers(self) -> int:
        return self.n_layers if self.latency_model == "pipelined" else 1

    def model_latency(self, arm: str, kv_bytes: float, bandwidth: float) -> float:
        """The latency model's prediction for ``arm`` (a profile name or ``"raw"``), no residual."""
        if arm == RAW:
            return float(raw_latency(kv_bytes, bandwidth, self.overhead_s))
        p = self.profiles[arm]
        return float(latency(self.latency_model, kv_bytes, p.ratio, p.encode_rate, p.decode_rate, bandwidth,
                             self._layers(), self.overhead_s))  # fmt: skip

    def break_even(self, arm: str) -> float:
        return math.inf if arm == RAW else self._break_even[arm]

    # ---- request path --------------------------------------------------------------
    def _check(self, ctx: Any) -> tuple[int | None, float | None, str, str | None]:
        """(kv_bytes, bandwidth, bandwidth source, problem or None) for a context."""
        if not isinstance(ctx, RequestContext):
            return None, None, "none", f"the context is a {type(ctx).__name__}, not a RequestContext"
        if ctx.kv_bytes is not None:
            if not _positive(ctx.kv_bytes):
                return None, None, "none", f"kv_bytes is {ctx.kv_bytes!r}; expected a number > 0"
            kv = int(ctx.kv_bytes)
        elif ctx.tokens is not None:
            if not _positive(ctx.tokens):
                return None, None, "none", f"tokens is {ctx.tokens!r}; expected a number > 0"
            kv = self.library.model.kv_bytes(int(ctx.tokens))
        else:
            return None, None, "none", "the context gives neither tokens nor kv_bytes"
        if not isinstance(ctx.workload, str):
            return kv, None, "none", f"workload is {ctx.workload!r}; expected a string"
        for name in ("slo_s", "max_ppl_increase", "max_retrieval_drop"):
            value = getattr(ctx, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                return kv, None, "none", f"{name} is {value!r}; expected a number >= 0 (inf: no limit)"
        if ctx.bandwidth_bps is not None:
            if not _positive(ctx.bandwidth_bps):
                return kv, None, "none", f"bandwidth_bps is {ctx.bandwidth_bps!r}; expected a finite number > 0"
            return kv, float(ctx.bandwidth_bps), "context", None
        estimate = self.estimator.estimate
        if estimate is None:
            return kv, None, "none", None
        return kv, estimate, "estimate" if self.estimator.samples else "initial", None

    def _raw_decision(self, ctx: Any, kv: int | None, bw: float | None, source: str, reason: str,
                      fallback: bool) -> Decision:  # fmt: skip
        ok = isinstance(ctx, RequestContext)
        slo = ctx.slo_s if ok and isinstance(ctx.slo_s, (int, float)) else math.inf
        candidates: tuple[Candidate, ...] = ()
        if kv is not None and bw is not None:
            t = float(raw_latency(kv, bw, self.overhead_s))
            candidates = (Candidate(RAW, 1.0, 0.0, 0.0, t, 1.0, 1.0, t, t, bool(t <= slo), math.inf),)
        return Decision(
            choice=RAW,
            policy=self.name,
            reason=reason,
            kv_bytes=kv,
            bandwidth_bps=bw,
            bandwidth_source=source,
            slo_s=slo,
            workload=ctx.workload if ok and isinstance(ctx.workload, str) else "default",
            candidates=candidates,
            fallback=fallback,
            request_id=ctx.request_id if ok else None,
        )

    def choose(self, context: RequestContext, *, explore: bool = True) -> Decision:
        """Pick a profile or raw for this request. Never raises (see the module docstring).

        ``explore=False`` uses what was learned without exploring and changes no state
        (what ``tensorwire explain`` shows).
        """
        with self._lock:
            if explore:
                self.decisions += 1
            try:
                kv, bw, source, problem = self._check(context)
                if problem is not None:
                    warnings.warn(f"{self.name}: {problem}; sending raw", ControlWarning, stacklevel=2)
                    return self._raw_decision(context, kv, bw, source, f"raw (fallback): {problem}", True)
                if bw is None and self.needs_bandwidth:
                    return self._raw_decision(context, kv, None, "none",
                                              "raw: no bandwidth estimate yet; the raw transfer measures the link", False)  # fmt: skip
                return self._decide(context, kv, bw, source, explore)
            except Exception as exc:  # noqa: BLE001 - the request path must not fail
                warnings.warn(f"{self.name}: internal error {type(exc).__name__}: {exc}; sending raw", ControlWarning, stacklevel=2)
                return self._raw_decision(context, None, None, "none",
                                          f"raw (fallback): internal error {type(exc).__name__}: {exc}", True)  # fmt: skip

    def _decide(self, ctx: RequestContext, kv: int, bw: float, source: str, explore: bool) -> Decision:  # pragma: no cover
        raise NotImplementedError

    def _budget(self, ctx: RequestContext) -> tuple[list[Profile], list[tuple[str, str]]]:
        allowed, excluded = [], []
        for p in self.profiles.values():
            if p.ppl_increase > ctx.max_ppl_increase:
                excluded.append((p.name, f"ppl +{p.ppl_increase:.3%} > budget {ctx.max_ppl_increase:.3%}"))
            elif p.retrieval_drop > ctx.max_retrieval_drop:
                excluded.append((p.name, f"retrieval -{p.retrieval_drop:.3g} pts > budget {ctx.max_retrieval_drop:.3g}"))
            else:
                allowed.append(p)
        for name, ids in self.dropped.items():
            excluded.append((name, f"stage(s) not installed: {', '.join(ids)}"))
        return allowed, excluded

    def _decision(self, ctx: RequestContext, kv: int, bw: float, source: str, candidates: list[Candidate],
                  excluded: list[tuple[str, str]], choice: str, reason: str) -> Decision:  # fmt: skip
        return Decision(
            choice=choice,
            policy=self.name,
            reason=reason,
            kv_bytes=kv,
            bandwidth_bps=bw,
            bandwidth_source=source,
            slo_s=float(ctx.slo_s),
            workload=ctx.workload,
            candidates=tuple(candidates),  # raw first, then the profiles in library order
            excluded=tuple(excluded),
            request_id=ctx.request_id,
            profile=self.profiles.get(choice),
        )

    def _row(self, arm: str, kv: int, bw: float, residual: float, expected: float, upper_residual: float,
             slo: float, observations: float = 0.0) -> Candidate:  # fmt: skip
        t = self.model_latency(arm, kv, bw) if bw is not None else math.nan
        p = self.profiles.get(arm)
        upper = t * upper_residual
        return Candidate(
            name=arm,
            ratio=p.ratio if p else 1.0,
            ppl_increase=p.ppl_increase if p else 0.0,
            retrieval_drop=p.retrieval_drop if p else 0.0,
            model_latency=t,
            residual=residual,
            expected_residual=expected,
            predicted=t * residual,
            upper=upper,
            meets_slo=bool(upper <= slo),
            break_even_bps=self.break_even(arm),
            observations=observations,
        )

    # ---- learning ------------------------------------------------------------------
    def observe(self, decision: Decision, observed_latency: float, bytes_sent: float | None = None,
                transfer_time: float | None = None) -> None:  # fmt: skip
        """Learn from one finished transfer. Never raises; bad numbers are ignored with a warning.

        Parameters
        ----------
        decision : Decision
            What ``choose`` returned for this request.
        observed_latency : float
            Seconds from the start of encoding to the decoded cache (the same span the
            latency model predicts).
        bytes_sent : float, optional
            Payload bytes on the wire.
        transfer_time : float, optional
            Seconds the payload spent on the wire; ``bytes_sent / transfer_time`` is a
            bandwidth sample.
        """
        with self._lock:
            try:
                measured = None
                sampled = bytes_sent is not None or transfer_time is not None
                if sampled and self.estimator.add_transfer(bytes_sent, transfer_time):
                    measured = float(bytes_sent) / float(transfer_time)  # type: ignore[arg-type]
                if not isinstance(decision, Decision) or decision.kv_bytes is None:
                    return
                bw = measured or decision.bandwidth_bps
                if bw is None or (decision.choice != RAW and decision.choice not in self.profiles):
                    return
                if not _positive(observed_latency):
                    warnings.warn(f"{self.name}: observed latency {observed_latency!r} ignored: expected a finite number > 0",
                                  ControlWarning, stacklevel=2)  # fmt: skip
                    return
                predicted = self.model_latency(decision.choice, decision.kv_bytes, bw)
                self._learn(decision, float(observed_latency) / predicted)
            except Exception as exc:  # noqa: BLE001 - the request path must not fail
                warnings.warn(f"{self.name}: observe failed ({type(exc).__name__}: {exc}); sample ignored",
                              ControlWarning, stacklevel=2)  # fmt: skip

    def _learn(self, decision: Decision, residual: float) -> None:
        """Learn the chosen arm's residual (default: nothing; static policies do not learn)."""


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
