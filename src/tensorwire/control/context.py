"""What crosses between the controller and the serving path: a request's context, the
candidates weighed for it, and the decision.

:class:`RequestContext` is what serving knows about one request (size, link speed, SLO,
quality budget); a policy's ``choose`` turns it into a :class:`Decision` (the choice, a
reason, and one :class:`Candidate` per option with its prediction), which serving acts on
and hands back to ``observe`` after the transfer. These are plain frozen dataclasses with
no dependency on how the decision was made.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..kv.profiles import RAW, Profile

__all__ = ["Candidate", "Decision", "RequestContext"]


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
