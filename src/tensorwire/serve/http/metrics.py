"""The front end's Prometheus metrics (``GET /metrics``), one registry per app.

========================================== =========== ===============================================
name                                       type        labels / meaning
========================================== =========== ===============================================
``tensorwire_http_requests_total``         counter     ``endpoint``, ``status`` (HTTP status code)
``tensorwire_http_requests_in_flight``     gauge       generation requests being served now
``tensorwire_ttft_seconds``                histogram   request received -> first token
``tensorwire_jct_seconds``                 histogram   request received -> last token (job completion)
``tensorwire_tpot_seconds``                histogram   time per output token after the first
``tensorwire_prompt_tokens_total``         counter     prompt tokens of served requests
``tensorwire_generated_tokens_total``      counter     completion tokens sent
``tensorwire_kv_bytes_raw_total``          counter     KV bytes the caches would take uncompressed
``tensorwire_kv_bytes_sent_total``         counter     KV bytes actually sent
``tensorwire_decisions_total``             counter     ``profile``, ``reason`` (see :func:`reason_class`)
``tensorwire_fallbacks_total``             counter     decisions where bad input or an error forced raw
``tensorwire_backend_errors_total``        counter     ``endpoint``: backend exceptions (500 or mid-stream)
========================================== =========== ===============================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "REASON_CLASSES", "Metrics", "reason_class"]

REASON_CLASSES = (
    "none",  # no controller decided (plain local generation)
    "fallback",  # bad context or internal error: raw
    "forced",  # the request named raw or a profile (a static policy decided)
    "no_bandwidth",  # no link estimate yet: raw measures it
    "quality_budget",  # no profile within the quality budget: raw
    "slo_unmet",  # no candidate meets the SLO: lowest predicted latency
    "raw_fastest",  # raw predicted fastest
    "lowest_latency",  # a profile predicted fastest
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def reason_class(decision: Mapping[str, Any] | None) -> str:
    """The class of a decision's reason (one of :data:`REASON_CLASSES`), read from the
    decision's fields (``fallback``, ``policy``, ``bandwidth_source``, ``candidates``), not
    from its text."""
    if not decision:
        return "none"
    if decision.get("fallback"):
        return "fallback"
    policy = str(decision.get("policy", ""))
    if policy.startswith("static:") or policy == "always-raw":
        return "forced"
    raw = decision.get("choice") == "raw"
    if raw and decision.get("bandwidth_source") == "none":
        return "no_bandwidth"
    candidates = decision.get("candidates") or ()
    if raw and not any(c.get("name") != "raw" for c in candidates):
        return "quality_budget"
    slo = decision.get("slo_s")
    if isinstance(slo, (int, float)) and math.isfinite(slo) and candidates and not any(c.get("meets_slo") for c in candidates):
        return "slo_unmet"
    return "raw_fastest" if raw else "lowest_latency"


class Metrics:
    """The app's metrics, in a registry of their own (several apps may live in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tensorwire_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.in_flight = Gauge("tensorwire_http_requests_in_flight", "Generation requests being served", registry=r)
        self.ttft = Histogram("tensorwire_ttft_seconds", "Time to first token (request received -> first token)",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.jct = Histogram("tensorwire_jct_seconds", "Job completion time (request received -> last token)",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("tensorwire_tpot_seconds", "Time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("tensorwire_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generated_tokens = Counter("tensorwire_generated_tokens", "Completion tokens sent", registry=r)
        self.kv_bytes_raw = Counter("tensorwire_kv_bytes_raw", "KV bytes the caches would take uncompressed", registry=r)
        self.kv_bytes_sent = Counter("tensorwire_kv_bytes_sent", "KV bytes sent on the wire", registry=r)
        self.decisions = Counter("tensorwire_decisions", "Controller decisions by chosen profile and reason class",
                                 ["profile", "reason"], registry=r)  # fmt: skip
        self.fallbacks = Counter("tensorwire_fallbacks", "Decisions where bad input or an internal error forced raw",
                                 registry=r)  # fmt: skip
        self.pool_decisions = Counter("tensorwire_pool_decisions", "KV pool outcomes: fetch, recompute (a stored "
                                      "prefix not worth fetching) or miss", ["decision"], registry=r)  # fmt: skip
        self.pool_hit_tokens = Counter("tensorwire_pool_hit_tokens", "Prompt tokens found stored in the KV pool", registry=r)
        self.pool_fetched_tokens = Counter("tensorwire_pool_fetched_tokens", "Prompt tokens fetched from the KV pool",
                                           registry=r)  # fmt: skip
        self.pool_fetched_bytes = Counter("tensorwire_pool_fetched_bytes", "Bytes fetched from the KV pool", registry=r)
        self.pool_prompt_tokens = Counter("tensorwire_pool_prompt_tokens", "Prompt tokens of requests that looked in the "
                                          "pool (hit rate: hit_tokens / this)", registry=r)  # fmt: skip
        self.backend_errors = Counter("tensorwire_backend_errors", "Backend exceptions (500 or an error event mid-stream)",
                                      ["endpoint"], registry=r)  # fmt: skip

    def kv(self, profile: str | None, decision: Mapping[str, Any] | None, raw: int, sent: int) -> None:
        """Count one request's KV outcome."""
        self.kv_bytes_raw.inc(max(0, int(raw)))
        self.kv_bytes_sent.inc(max(0, int(sent)))
        if decision:
            self.decisions.labels(profile=str(decision.get("choice", profile or "none")), reason=reason_class(decision)).inc()
            if decision.get("fallback"):
                self.fallbacks.inc()

    def pool(self, info: Mapping[str, Any], prompt_tokens: int) -> None:
        """Count one request's KV pool outcome (the ``pool`` object of its Prefilled event)."""
        self.pool_decisions.labels(decision=str(info.get("decision", "miss"))).inc()
        self.pool_prompt_tokens.inc(max(0, int(prompt_tokens)))
        for counter, key in ((self.pool_hit_tokens, "hit_tokens"), (self.pool_fetched_tokens, "fetched_tokens"),
                             (self.pool_fetched_bytes, "fetched_bytes")):  # fmt: skip
            value = info.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                counter.inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
