"""Reason classes of real decisions (tensorwire.serve.http.metrics)."""

from __future__ import annotations

import math
import warnings

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.control import Controller, RequestContext, gbps
from tensorwire.control.policies import AlwaysRaw, StaticProfile
from tensorwire.demo import KV_LIBRARY
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.serve.http.metrics import REASON_CLASSES, Metrics, reason_class


@pytest.fixture(scope="module")
def library():
    return ProfileLibrary.load(KV_LIBRARY)


def test_reason_classes_of_real_decisions(library):
    # some measured profiles improve perplexity slightly (a negative increase): leave them out,
    # so that a tiny budget excludes every profile
    ctl = Controller(library.without([p.name for p in library if p.ppl_increase <= 1e-6]))
    big = 100_000
    cases = {
        "no_bandwidth": RequestContext(tokens=big),
        "quality_budget": RequestContext(tokens=big, max_ppl_increase=1e-6, bandwidth_bps=gbps(1)),
        "slo_unmet": RequestContext(tokens=big, slo_s=1e-6, bandwidth_bps=gbps(1)),
        "raw_fastest": RequestContext(tokens=big, bandwidth_bps=gbps(10_000)),
        "lowest_latency": RequestContext(tokens=big, bandwidth_bps=gbps(0.1)),
    }
    for expected, ctx in cases.items():
        decision = ctl.choose(ctx, explore=False).to_dict()
        assert reason_class(decision) == expected, decision["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fallback = ctl.choose(RequestContext(tokens=-1)).to_dict()
    assert reason_class(fallback) == "fallback"
    ctx = RequestContext(tokens=big)
    assert reason_class(AlwaysRaw(library).choose(ctx).to_dict()) == "forced"
    assert reason_class(StaticProfile(library, library.names[0]).choose(ctx).to_dict()) == "forced"
    assert reason_class(None) == "none"
    assert set(cases) | {"fallback", "forced", "none"} == set(REASON_CLASSES)


def test_metrics_render_and_parse(library):
    m = Metrics()
    decision = Controller(library).choose(RequestContext(tokens=1000, bandwidth_bps=gbps(1))).to_dict()
    m.kv(decision["choice"], decision, 1000, 400)
    m.ttft.observe(0.1)
    names = {f.name for f in text_string_to_metric_families(m.render().decode())}
    assert {"tensorwire_decisions", "tensorwire_kv_bytes_raw", "tensorwire_ttft_seconds"} <= names
    assert not math.isnan(m.kv_bytes_sent._value.get())
