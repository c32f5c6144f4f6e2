"""Online control: which KV pipeline (or raw) to use for each request.

The controller combines the profile library (``tensorwire.kv.profiles``: measured ratio,
quality loss and throughput per pipeline), a latency model (``latency_model``: pure
functions), per-profile residuals learned online (``bandit``: discounted Thompson
sampling with change detection) and the request's context (bandwidth, size, SLO,
quality budget) to pick the option with the lowest predicted latency.

>>> from tensorwire.control import Controller, RequestContext, gbps   # doctest: +SKIP
>>> ctl = Controller(ProfileLibrary.load("profiles.json"))             # doctest: +SKIP
>>> decision = ctl.choose(RequestContext(tokens=4096, slo_s=0.1, max_ppl_increase=0.02))  # doctest: +SKIP
>>> ctl.observe(decision, observed_latency, bytes_sent, transfer_time)  # doctest: +SKIP

``policies`` holds the baselines (always raw, static profile, KVServe's rule, oracle),
``traces`` and ``simulate`` the trace-driven simulator behind ``tensorwire simulate``,
``explain`` the table behind ``tensorwire explain``.
"""

from .bandit import ControlWarning, DiscountedThompson, DiscountedUCB, ResidualPrior
from .controller import RAW, BandwidthEstimator, Candidate, Controller, Decision, Policy, RequestContext
from .latency_model import break_even_bandwidth, gbps, pipelined_latency, raw_latency, serial_latency, to_gbps

__all__ = [
    "RAW",
    "BandwidthEstimator",
    "Candidate",
    "ControlWarning",
    "Controller",
    "Decision",
    "DiscountedThompson",
    "DiscountedUCB",
    "Policy",
    "RequestContext",
    "ResidualPrior",
    "break_even_bandwidth",
    "gbps",
    "pipelined_latency",
    "raw_latency",
    "serial_latency",
    "to_gbps",
]
