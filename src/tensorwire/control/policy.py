"""The interface every policy implements, and the request path they all share.

:class:`Policy` is the interface (``choose(context) -> Decision``, ``observe``) that
serving calls, whether the policy is the controller or a baseline. :class:`BasePolicy`
holds what they share: the checks on a request's context, the latency model, the
bandwidth estimate, building candidates and decisions, the raw fallback, and ``observe``
(a bandwidth sample from the bytes sent and the wire time; the chosen option's residual
``observed / predicted``, at the link speed measured, handed to the subclass's ``_learn``).

The request path never raises: a bad context (missing size, NaN bandwidth, negative
budget, ...) or an internal error gives a raw decision with ``fallback=True`` and the
reason; bad measurements given to ``observe`` are ignored with a :class:`ControlWarning`.
"""

from __future__ import annotations

import abc
import math
import threading
import warnings
from typing import Any, Literal

from ..errors import ControlWarning
from ..kv.profiles import RAW, Profile, ProfileLibrary
from .bandwidth import BandwidthEstimator
from .context import Candidate, Decision, RequestContext
from .latency_model import MODELS, break_even_bandwidth, latency, raw_latency
from .units import is_positive

__all__ = ["BasePolicy", "Policy"]


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
        return float(latency(self.latency_model, kv_bytes, p.ratio_at(kv_bytes), p.encode_rate, p.decode_rate, bandwidth,
                             self._layers(), self.overhead_s))  # fmt: skip

    def break_even(self, arm: str) -> float:
        return math.inf if arm == RAW else self._break_even[arm]

    # ---- request path --------------------------------------------------------------
    def _check(self, ctx: Any) -> tuple[int | None, float | None, str, str | None]:
        """(kv_bytes, bandwidth, bandwidth source, problem or None) for a context."""
        if not isinstance(ctx, RequestContext):
            return None, None, "none", f"the context is a {type(ctx).__name__}, not a RequestContext"
        if ctx.kv_bytes is not None:
            if not is_positive(ctx.kv_bytes):
                return None, None, "none", f"kv_bytes is {ctx.kv_bytes!r}; expected a number > 0"
            kv = int(ctx.kv_bytes)
        elif ctx.tokens is not None:
            if not is_positive(ctx.tokens):
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
            if not is_positive(ctx.bandwidth_bps):
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
            ratio=p.ratio_at(kv) if p else 1.0,
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
                if not is_positive(observed_latency):
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
