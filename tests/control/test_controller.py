"""The controller: choices, SLO/quality semantics and learning."""

import json
import math

import numpy as np
import pytest

from tensorwire.control import RAW, Controller, gbps

from .conftest import TOKENS, ctx


def test_compresses_on_a_slow_link_and_sends_raw_on_a_fast_one(library):
    c = Controller(library)
    slow = c.choose(ctx(bandwidth_bps=gbps(2)), explore=False)
    assert slow.choice != RAW and not slow.fallback
    assert slow.chosen.predicted < slow.candidate(RAW).predicted
    fast = c.choose(ctx(bandwidth_bps=gbps(100)), explore=False)
    assert fast.choice == RAW and "fastest" in fast.reason
    # raw wins exactly above every profile's break-even bandwidth
    top = max(cand.break_even_bps for cand in fast.candidates if cand.name != RAW)
    assert c.choose(ctx(bandwidth_bps=top * 1.05), explore=False).choice == RAW
    assert c.choose(ctx(bandwidth_bps=top * 0.95), explore=False).choice != RAW


def test_decision_lists_every_candidate_with_its_prediction(library):
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(10)), explore=False)
    assert [c.name for c in d.candidates] == [RAW, *library.names]
    for cand in d.candidates:
        assert cand.predicted == pytest.approx(cand.model_latency * cand.residual)
        assert cand.upper >= cand.predicted
    assert d.kv_bytes == library.model.kv_bytes(TOKENS) and d.bandwidth_source == "context"
    assert d.pipeline == library[d.choice].pipeline
    assert d.choice in d.reason
    json.dumps(d.to_dict())  # logs and `tensorwire explain --json` need plain JSON


def test_quality_budget_filters_profiles(library):
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(2), max_ppl_increase=0.01), explore=False)
    assert "fast-lossy" not in [c.name for c in d.candidates]
    assert dict(d.excluded)["fast-lossy"].startswith("ppl")
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(2), max_retrieval_drop=0.2), explore=False)
    assert [c.name for c in d.candidates] == [RAW, "gentle"]
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(2), max_ppl_increase=0.0), explore=False)
    assert d.choice == RAW and "no profile within the quality budget" in d.reason


def test_slo_prefers_a_certain_option_over_an_uncertain_faster_one(library):
    c = Controller(library)
    # Teach the controller that "balanced" is very noisy (log-residual sd 0.6): its p90 is large.
    rng = np.random.default_rng(0)
    for _ in range(30):
        c.bandit().update("balanced", math.exp(rng.normal(0.0, 0.6)))
    free = c.choose(ctx(bandwidth_bps=gbps(8), slo_s=math.inf), explore=False)
    assert free.choice == "balanced"  # fastest prediction when there is no SLO
    assert free.candidate("balanced").upper > 0.05 > free.candidate("fast-lossy").upper
    tight = c.choose(ctx(bandwidth_bps=gbps(8), slo_s=0.05), explore=False)
    assert tight.choice == "fast-lossy" and tight.chosen.meets_slo
    assert not tight.candidate("balanced").meets_slo
    assert "meet the 50 ms SLO (p90)" in tight.reason
    # with point predictions (slo_quantile=None) the SLO no longer rules "balanced" out
    point = Controller(library, slo_quantile=None)
    point._bandits = c._bandits
    assert point.choose(ctx(bandwidth_bps=gbps(8), slo_s=0.05), explore=False).choice == "balanced"


def test_when_nothing_meets_the_slo_the_fastest_is_chosen(library):
    d = Controller(library).choose(ctx(bandwidth_bps=gbps(1), slo_s=1e-6), explore=False)
    assert not any(c.meets_slo for c in d.candidates)
    assert d.choice == min(d.candidates, key=lambda c: c.predicted).name
    assert "no candidate meets" in d.reason


def test_learns_that_a_profile_became_slow_and_moves_off_it(library):
    """The controller's own loop: a profile that turns 2x slow is dropped within a few decisions."""
    c = Controller(library, seed=1, initial_bandwidth_bps=gbps(3))
    rng = np.random.default_rng(0)
    slow_factor = {name: 1.0 for name in (RAW, *library.names)}

    def run(n):
        picks = []
        for _ in range(n):
            d = c.choose(ctx(bandwidth_bps=gbps(3)))
            true = c.model_latency(d.choice, d.kv_bytes, gbps(3)) * slow_factor[d.choice] * math.exp(rng.normal(0, 0.05))
            c.observe(d, true, None, None)
            picks.append(d.choice)
        return picks

    before = run(100)
    favourite = max(set(before), key=before.count)
    assert favourite != RAW and before[-20:].count(favourite) >= 15
    slow_factor[favourite] = 2.0
    after = run(60)
    first_clean = next(i for i in range(len(after)) if favourite not in after[i : i + 10])
    assert first_clean <= 10, after[:20]


def test_explore_false_changes_nothing(library):
    c = Controller(library, initial_bandwidth_bps=gbps(10))
    c.choose(ctx())
    snapshot = (c.decisions, c.bandit().state("balanced"))
    for _ in range(5):
        c.choose(ctx(), explore=False)
    assert (c.decisions, c.bandit().state("balanced")) == snapshot


def test_per_class_residuals(library):
    c = Controller(library, per_class=True, initial_bandwidth_bps=gbps(3))
    d = c.choose(ctx(workload="code"), explore=False)
    for _ in range(5):
        c.observe(d, 3 * c.model_latency(d.choice, d.kv_bytes, gbps(3)))
    assert c.bandit("code").expected(d.choice) > 2.0
    assert c.bandit("chat").expected(d.choice) == 1.0
    shared = Controller(library, initial_bandwidth_bps=gbps(3))
    assert shared.bandit("code") is shared.bandit("chat")


def test_same_seed_same_decisions(library):
    def run(seed):
        c = Controller(library, seed=seed, initial_bandwidth_bps=gbps(8))
        out = []
        for i in range(40):
            d = c.choose(ctx(tokens=1024 * (1 + i % 4)))
            c.observe(d, c.model_latency(d.choice, d.kv_bytes, gbps(8)) * 1.1, None, None)
            out.append(d.choice)
        return out

    assert run(3) == run(3)


def test_ucb_variant(library):
    c = Controller(library, bandit="ucb", initial_bandwidth_bps=gbps(2))
    assert c.name == "controller-ucb"
    assert c.choose(ctx()).choice != RAW


def test_construction_errors_are_raised_eagerly(library):
    with pytest.raises(ValueError, match="slo_quantile"):
        Controller(library, slo_quantile=1.5)
    with pytest.raises(ValueError, match="bandit"):
        Controller(library, bandit="greedy")
