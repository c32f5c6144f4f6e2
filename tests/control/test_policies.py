"""Baseline policies: same interface and request-path guarantees as the controller."""

import math

import pytest

from tensorwire.control import RAW, ControlWarning, RequestContext, gbps
from tensorwire.control.policies import AlwaysRaw, KVServeRule, Oracle, StaticProfile


def ctx(**kw):
    return RequestContext(**{"tokens": 2048, "slo_s": 0.5, "max_ppl_increase": 0.05, "max_retrieval_drop": 5.0, **kw})


def test_always_raw(library):
    p = AlwaysRaw(library)
    d = p.choose(ctx())  # needs no bandwidth estimate
    assert d.choice == RAW and not d.fallback and math.isnan(d.candidates[0].predicted)
    d = p.choose(ctx(bandwidth_bps=gbps(1)))
    assert d.choice == RAW and d.candidates[0].predicted == pytest.approx(d.kv_bytes / gbps(1))


def test_static_profile(library):
    p = StaticProfile(library, "balanced")
    assert p.name == "static:balanced"
    assert p.choose(ctx()).choice == "balanced"
    assert p.choose(ctx(bandwidth_bps=gbps(400))).choice == "balanced"  # even where raw is faster
    d = p.choose(ctx(max_ppl_increase=0.001))
    assert d.choice == RAW and "excluded" in d.reason  # the quality budget still holds
    with pytest.raises(KeyError, match="nope"):
        StaticProfile(library, "nope")


def test_oracle_picks_the_true_fastest(library):
    truth = {RAW: 0.3, "fast-lossy": 0.2, "balanced": 0.1, "gentle": 0.15}
    p = Oracle(library, lambda c, arm: truth[arm])
    d = p.choose(ctx(bandwidth_bps=gbps(5)))
    assert d.choice == "balanced" and d.chosen.predicted == pytest.approx(0.1)
    assert [c.name for c in d.candidates] == [RAW, *library.names]
    assert p.choose(ctx(bandwidth_bps=gbps(5), max_ppl_increase=0.001)).choice == "gentle"


def test_kvserve_rule_penalises_then_reconsiders(library):
    p = KVServeRule(library, alpha=0.5, penalty=1.25, cooldown=5)
    first = p.choose(ctx(bandwidth_bps=gbps(3)))
    fav = first.choice
    assert fav != RAW
    p.observe(first, 2.0 * p.model_latency(fav, first.kv_bytes, gbps(3)))  # 2x slower than predicted
    assert p.residual[fav] == pytest.approx(1.5)
    blocked = [p.choose(ctx(bandwidth_bps=gbps(3))) for _ in range(5)]
    assert all(d.choice != fav for d in blocked)
    assert "penalised" in dict(blocked[0].excluded)[fav]
    back = p.choose(ctx(bandwidth_bps=gbps(3)))  # cooldown over: residual reset, chosen again
    assert back.choice == fav and p.residual[fav] == 1.0


@pytest.mark.parametrize("make", [AlwaysRaw, lambda lib: StaticProfile(lib, "gentle"), KVServeRule,
                                  lambda lib: Oracle(lib, lambda c, a: 1.0)])  # fmt: skip
def test_bad_context_falls_back_to_raw(library, make):
    p = make(library)
    with pytest.warns(ControlWarning, match="sending raw"):
        d = p.choose(RequestContext(tokens=-1))
    assert d.choice == RAW and d.fallback
    with pytest.warns(ControlWarning):
        p.observe(d, float("nan"), float("nan"), 0.0)


def test_parameters_are_validated(library):
    with pytest.raises(ValueError):
        KVServeRule(library, penalty=0.9)
