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

``context`` holds the request and decision types serving exchanges with a policy,
``policy`` the interface and the request path every policy shares, ``bandwidth`` the
link-speed estimator, ``units`` the checks and display forms of sizes, times and speeds.
``policies`` holds the baselines (always raw, static profile, KVServe's rule, oracle),
``traces`` and ``simulate`` the trace-driven simulator behind ``tensorwire simulate``,
``report`` its table and plot, ``explain`` the rendering of a decision behind
``tensorwire explain``.
"""

from ..errors import ControlWarning
from ..kv.profiles import RAW
from .bandit import DiscountedThompson, DiscountedUCB, ResidualPrior
from .bandwidth import BandwidthEstimator
from .context import Candidate, Decision, RequestContext
from .controller import Controller
from .latency_model import break_even_bandwidth, gbps, pipelined_latency, raw_latency, serial_latency, to_gbps
from .policy import Policy

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
