"""The prefill worker's choice of pipeline for a request, without processes or a model."""

from __future__ import annotations

import pytest

from tensorwire.control import Controller
from tensorwire.data import SMOLLM2_LIBRARY
from tensorwire.kv.profiles import ProfileLibrary
from tensorwire.serve.workers.prefill import PrefillWorker

KV_BYTES = 18_000_000  # the bf16 cache of an ~800-token SmolLM2 prompt


@pytest.fixture
def worker() -> PrefillWorker:
    return PrefillWorker(None, Controller(ProfileLibrary.load(SMOLLM2_LIBRARY)), [], None)  # no bandwidth estimate yet


def test_a_profile_can_be_forced_before_the_link_is_measured(worker):
    """The first decision is raw with no candidates (nothing measured the link); forcing a profile still works."""
    assert worker._decide({"control": {}}, KV_BYTES).choice == "raw"
    name = "layerwise:late_bits=4/raw"
    decision = worker._decide({"control": {"compression": name}}, KV_BYTES)
    assert decision.choice == name and decision.pipeline == worker.controller.library[name].pipeline
    assert decision.reason.startswith("forced by the request")


def test_a_forced_profile_must_be_known_and_within_the_budget(worker):
    with pytest.raises(ValueError, match="not a profile this request may use"):
        worker._decide({"control": {"compression": "no-such-profile"}}, KV_BYTES)
    lossy = max(worker.controller.library, key=lambda p: p.ppl_increase)
    assert lossy.ppl_increase > 0
    with pytest.raises(ValueError, match="outside its quality budget"):
        worker._decide({"control": {"compression": lossy.name, "max_ppl_increase": lossy.ppl_increase / 2}}, KV_BYTES)
    assert worker._decide({"control": {"compression": "raw", "max_ppl_increase": 0.0}}, KV_BYTES).choice == "raw"
