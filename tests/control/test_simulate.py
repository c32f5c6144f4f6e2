"""The trace-driven simulator (small runs: behaviour, not speed)."""

import json

import numpy as np
import pytest

from tensorwire.control import RAW, RequestContext, gbps
from tensorwire.control.simulate import Scenario, World, _abandon_after, example_library, run_suite, simulate
from tensorwire.control.traces import make_trace

# ---- the world ------------------------------------------------------------------------


def test_world_ground_truth():
    lib = example_library()
    sc = Scenario(n_requests=400, mismatch_profile="kivi4-zstd", mismatch_at=0.5, calibration_sigma=0.0, noise_sigma=0.0)
    w = World(lib, make_trace("bursty", 400), sc, seed=0)
    assert w.arms[0] == RAW and set(w.arms[1:]) == set(lib.names)
    assert set(np.unique(w.tokens)) <= {1024, 2048, 4096, 8192}
    assert w.kv_bytes[0] == lib.model.kv_bytes(int(w.tokens[0]))
    j = w.index["kivi4-zstd"]
    # no calibration error: before the mismatch the truth is the library's model; after, it is slower
    ctx = RequestContext(request_id=10)
    from tensorwire.control.controller import Controller

    c = Controller(lib)
    assert w.true_latency(ctx, "kivi4-zstd") == pytest.approx(c.model_latency("kivi4-zstd", w.kv_bytes[10], w.bandwidth[10]))
    assert w.expected[300, j] > c.model_latency("kivi4-zstd", w.kv_bytes[300], w.bandwidth[300]) * 1.2
    observed, payload, wire = w.outcome(10, "kivi4-zstd")
    assert observed == pytest.approx(w.expected[10, j]) and payload == pytest.approx(w.kv_bytes[10] / lib["kivi4-zstd"].ratio)
    assert wire == pytest.approx(payload / w.bandwidth[10], rel=0.3)
    # the oracle never picks a profile outside the budget
    allowed = {i for i, ok in enumerate(w.allowed) if ok}
    assert set(np.unique(w.oracle_choice)) <= allowed


def test_world_auto_mismatch_and_errors():
    lib = example_library()
    w = World(lib, make_trace("walk", 300), Scenario(n_requests=300), seed=1)
    assert w.mismatch_profile in lib.names
    assert World(lib, make_trace("walk", 300), Scenario(n_requests=300, mismatch_profile=None)).mismatch_profile is None
    with pytest.raises(ValueError, match="mismatch_profile"):
        World(lib, make_trace("walk", 300), Scenario(n_requests=300, mismatch_profile="nope"))
    with pytest.raises(ValueError, match="n_requests"):
        Scenario(n_requests=0)


def test_abandon_after():
    f = np.zeros(30, bool)
    assert _abandon_after(f) == 0
    f[[0, 1, 2, 5]] = True
    assert _abandon_after(f) == 6
    f[:] = True
    assert _abandon_after(f) is None
    assert _abandon_after(np.zeros(0, bool)) == 0


# ---- whole runs -----------------------------------------------------------------------


def test_simulate_step_trace_behaviour():
    lib = example_library()
    res = simulate(lib, make_trace("step", 600), Scenario(n_requests=600, mismatch_at=0.8), seed=0)
    p = res["policies"]
    assert p["oracle"]["regret_s"] == 0 and p["oracle"]["mean_vs_oracle"] == 1.0
    assert p["controller"]["mean_vs_oracle"] < 1.1
    assert p["controller"]["mean_s"] <= p[res["best_static"]]["mean_s"]
    assert p["controller"]["raw_share_high_bw"] >= 0.9  # the 100 Gbps third goes raw
    assert p["always-raw"]["raw_share_high_bw"] == 1.0 and p["controller"]["fallbacks"] == 0
    assert p["controller"]["abandon_after"] is not None and p["controller"]["abandon_after"] <= 10
    slow = res["mismatch"]["profile"]
    assert p[f"static:{slow}"]["abandon_after"] is None  # a static policy never leaves it
    series = res["series"]
    assert len(series["gbps"]) == 600 and set(series["policies"]) == set(p)


def test_suite():
    lib = example_library()
    result = run_suite(lib, ["step", "bursty"], Scenario(n_requests=250), seeds=(0, 1), library_label="placeholder")
    assert set(result["traces"]) == {"step", "bursty"}
    summary = result["traces"]["step"]["summary"]
    assert summary["controller"]["mean_vs_oracle"]["min"] <= summary["controller"]["mean_vs_oracle"]["median"]
    assert len(summary["_checks"]["le_best_static"]) == 2
    assert "series" in result["traces"]["step"]["runs"][0] and "series" not in result["traces"]["step"]["runs"][1]
    json.dumps(result)  # the benchmark writes it as JSON


def test_policies_see_the_same_world():
    """Common random numbers: two identical policies get identical latencies."""
    from tensorwire.control.controller import Controller
    from tensorwire.control.policies import Oracle

    def twins(library, world, seed):
        return [Controller(library, seed=5, name="a"), Controller(library, seed=5, name="b"), Oracle(library, world.true_latency)]

    res = simulate(example_library(), make_trace("walk", 200), Scenario(n_requests=200), policies=twins)
    a, b = res["series"]["policies"]["a"], res["series"]["policies"]["b"]
    assert a == b


def test_serial_model_runs():
    res = simulate(example_library(), make_trace("walk", 150), Scenario(n_requests=150, latency_model="serial"))
    assert res["policies"]["controller"]["mean_vs_oracle"] < 1.2


def test_known_bandwidth_context_is_used():
    from tensorwire.control.controller import Controller

    d = Controller(example_library()).choose(RequestContext(tokens=1024, bandwidth_bps=gbps(1)), explore=False)
    assert d.bandwidth_source == "context" and d.choice != RAW
