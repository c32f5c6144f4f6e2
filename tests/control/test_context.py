"""Request, candidate and decision types: no validation on construction, plain-JSON decisions."""

import dataclasses
import json
import math

import pytest

from tensorwire.control import RAW, Candidate, Decision, RequestContext
from tensorwire.kv.profiles import Profile


def candidate(name: str, predicted: float) -> Candidate:
    return Candidate(name, 4.0, 0.01, 0.5, predicted, 1.0, 1.0, predicted, predicted, True, 1e9)


def test_context_is_not_validated_on_construction():
    ctx = RequestContext(tokens=-5, bandwidth_bps=float("nan"))  # the policy checks it, and falls back
    assert ctx.slo_s == math.inf and ctx.workload == "default" and ctx.request_id is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.tokens = 10


def test_decision_accessors_and_json():
    profile = Profile("kivi", {"stages": [{"id": "kivi"}]}, 4.0, 0.01, 0.5, 1e9, 2e9, 2)
    d = Decision("kivi", "controller", "why", 1000, 1e9, "context", 0.1, "default",
                 candidates=(candidate(RAW, 2e-6), candidate("kivi", 1e-6)), excluded=(("lossy", "ppl"),),
                 profile=profile)  # fmt: skip
    assert not d.is_raw and d.chosen is d.candidate("kivi") and d.predicted == 1e-6
    assert d.pipeline == profile.pipeline and d.candidate("absent") is None
    out = json.loads(json.dumps(d.to_dict()))
    assert "profile" not in out and out["pipeline"] == profile.pipeline and out["excluded"] == [["lossy", "ppl"]]


def test_raw_decision_without_candidates():
    d = Decision(RAW, "controller", "raw (fallback): bad", None, None, "none", math.inf, "default", fallback=True)
    assert d.is_raw and d.pipeline is None and d.chosen is None and math.isnan(d.predicted)
