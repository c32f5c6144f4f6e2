"""The prefill worker's choice of pipeline for a request, without processes or a model."""

from __future__ import annotations

import pytest

from tensorwire.control import Controller
from tensorwire.control.policies import KVServeRule
from tensorwire.data import SMOLLM2_LIBRARY
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.serve.workers.prefill import PrefillWorker

KV_BYTES = 18_000_000  # the bf16 cache of an ~800-token SmolLM2 prompt


@pytest.fixture
def worker() -> PrefillWorker:
    library = ProfileLibrary.load(SMOLLM2_LIBRARY)  # no bandwidth estimate yet
    return PrefillWorker(None, Controller(library), [], None, alternatives={"kvserve-rule": KVServeRule(library)})


def decide(worker: PrefillWorker, control: dict):
    request = {"control": control}
    return worker._decide(worker._policy(request), request, KV_BYTES)


def test_a_profile_can_be_forced_before_the_link_is_measured(worker):
    """The first decision is raw with no candidates (nothing measured the link); forcing a profile still works."""
    assert decide(worker, {}).choice == "raw"
    name = "layerwise:late_bits=4/raw"
    decision = decide(worker, {"compression": name})
    assert decision.choice == name and decision.pipeline == worker.controller.library[name].pipeline
    assert decision.reason.startswith("forced by the request")


def test_a_forced_profile_must_be_known_and_within_the_budget(worker):
    with pytest.raises(ValueError, match="not a profile this request may use"):
        decide(worker, {"compression": "no-such-profile"})
    lossy = max(worker.controller.library, key=lambda p: p.ppl_increase)
    assert lossy.ppl_increase > 0
    with pytest.raises(ValueError, match="outside its quality budget"):
        decide(worker, {"compression": lossy.name, "max_ppl_increase": lossy.ppl_increase / 2})
    assert decide(worker, {"compression": "raw", "max_ppl_increase": 0.0}).choice == "raw"


def test_a_request_may_name_another_policy_of_the_worker(worker):
    assert decide(worker, {}).policy == "controller"
    assert decide(worker, {"policy": "kvserve-rule"}).policy == "kvserve-rule"
    with pytest.raises(ValueError, match="not one this worker holds: controller, kvserve-rule"):
        decide(worker, {"policy": "oracle"})
