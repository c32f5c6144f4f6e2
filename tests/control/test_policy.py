"""The request path every policy shares (context checks, raw fallback, bandwidth estimate,
observe), exercised through the controller: it never raises and is safe to share."""

import threading
import warnings

import pytest

from tensorwire.control import RAW, Controller, ControlWarning, Decision, RequestContext, gbps
from tensorwire.control.bandit import DiscountedThompson
from tensorwire.kv.profiles import Profile

from .conftest import G, ctx, small_library


def test_first_request_without_bandwidth_is_sent_raw_and_measures_the_link(library):
    c = Controller(library)
    d = c.choose(ctx())
    assert d.choice == RAW and not d.fallback and "no bandwidth estimate" in d.reason
    c.observe(d, observed_latency=0.4, bytes_sent=d.kv_bytes, transfer_time=d.kv_bytes / gbps(2))
    assert c.estimator.estimate == pytest.approx(gbps(2))
    d2 = c.choose(ctx())
    assert d2.bandwidth_source == "estimate" and d2.choice != RAW


def test_profiles_with_missing_stages_are_dropped_with_a_warning():
    ghost = Profile("ghost", {"stages": [{"id": "not-a-stage"}]}, 50.0, 0.0, 0.0, 100 * G, 100 * G, 4)
    with pytest.warns(ControlWarning, match="ghost"):
        c = Controller(small_library([ghost]))
    assert "ghost" not in c.profiles and c.dropped == {"ghost": ("not-a-stage",)}
    d = c.choose(ctx(bandwidth_bps=gbps(1)), explore=False)
    assert d.choice != "ghost" and "not installed" in dict(d.excluded)["ghost"]


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "not a RequestContext"),
        ({"tokens": 10}, "not a RequestContext"),
        (RequestContext(), "neither tokens nor kv_bytes"),
        (RequestContext(tokens=-5), "tokens"),
        (RequestContext(tokens=0), "tokens"),
        (RequestContext(tokens=float("nan")), "tokens"),
        (RequestContext(kv_bytes=-1), "kv_bytes"),
        (RequestContext(tokens=10, bandwidth_bps=float("nan")), "bandwidth_bps"),
        (RequestContext(tokens=10, bandwidth_bps=-3.0), "bandwidth_bps"),
        (RequestContext(tokens=10, bandwidth_bps=0.0), "bandwidth_bps"),
        (RequestContext(tokens=10, slo_s=float("nan")), "slo_s"),
        (RequestContext(tokens=10, slo_s="fast"), "slo_s"),
        (RequestContext(tokens=10, max_ppl_increase=-0.1), "max_ppl_increase"),
        (RequestContext(tokens=10, max_retrieval_drop=float("nan")), "max_retrieval_drop"),
        (RequestContext(tokens=10, workload=["a"]), "workload"),
    ],
)  # fmt: skip
def test_bad_context_falls_back_to_raw_without_raising(library, bad, why):
    c = Controller(library, initial_bandwidth_bps=gbps(10))
    with pytest.warns(ControlWarning, match="sending raw"):
        d = c.choose(bad)
    assert isinstance(d, Decision) and d.choice == RAW and d.fallback
    assert why in d.reason
    c.observe(d, 0.01, 1e6, 1e-3)  # observing a fallback decision is fine too


def test_internal_error_falls_back_to_raw(library):
    class Broken(DiscountedThompson):
        def sample(self, arm):
            raise RuntimeError("sampler exploded")

    c = Controller(library, bandit=lambda i: Broken(), initial_bandwidth_bps=gbps(10))
    with pytest.warns(ControlWarning, match="internal error"):
        d = c.choose(ctx())
    assert d.choice == RAW and d.fallback and "sampler exploded" in d.reason


@pytest.mark.parametrize("nbytes, seconds", [(1e6, float("nan")), (1e6, 0.0), (-1e6, 1e-3), (1e6, -1.0), (float("inf"), 1.0),
                                             ("many", 1.0)])  # fmt: skip
def test_bad_bandwidth_samples_are_ignored_with_a_warning(library, nbytes, seconds):
    c = Controller(library, initial_bandwidth_bps=gbps(10))
    d = c.choose(ctx())
    with pytest.warns(ControlWarning, match="ignored"):
        c.observe(d, 0.05, nbytes, seconds)
    assert c.estimator.estimate == gbps(10) and c.estimator.rejected == 1


@pytest.mark.parametrize("latency", [float("nan"), -0.1, 0.0, None])
def test_bad_observed_latency_is_ignored_with_a_warning(library, latency):
    c = Controller(library, initial_bandwidth_bps=gbps(10))
    d = c.choose(ctx())
    before = c.bandit().state(d.choice)
    with pytest.warns(ControlWarning, match="latency"):
        c.observe(d, latency, 1e6, 1e-3)
    assert c.bandit().state(d.choice) == before
    assert c.estimator.samples == 1  # the bandwidth sample was still good


def test_observe_never_raises_on_garbage(library):
    c = Controller(library)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ControlWarning)
        c.observe("not a decision", 1.0, 1e6, 1e-3)
        c.observe(None, None, None, None)


def test_residual_is_computed_at_the_measured_bandwidth(library):
    """A bandwidth misestimate must not be blamed on the profile."""
    c = Controller(library, initial_bandwidth_bps=gbps(50))  # believes 50 Gbps, the link does 5
    d = c.choose(ctx(), explore=False)
    truth = c.model_latency(d.choice, d.kv_bytes, gbps(5))
    payload = d.kv_bytes / (library[d.choice].ratio if d.choice != RAW else 1.0)
    c.observe(d, truth, payload, payload / gbps(5))
    assert c.bandit().expected(d.choice) == pytest.approx(1.0, abs=1e-9)


def test_concurrent_use_is_safe(library):
    c = Controller(library, initial_bandwidth_bps=gbps(5))
    errors = []

    def worker():
        try:
            for _ in range(50):
                d = c.choose(ctx())
                c.observe(d, 0.05, 1e6, 1e6 / gbps(5))
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and c.decisions == 200 and c.estimator.samples == 200


def test_construction_errors_are_raised_eagerly(library):
    with pytest.raises(TypeError, match="ProfileLibrary"):
        Controller({"profiles": []})
    with pytest.raises(ValueError, match="latency_model"):
        Controller(library, latency_model="quantum")
