"""Fault descriptions: validation, the environment round trip, the benchmark's random draw."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tensorwire.diagnose.faults import KINDS, Fault, sample_faults
from tensorwire.errors import TensorwireError


def test_env_round_trip():
    fault = Fault("slow_link", 1, 9, seconds=0.03, peer=2)
    assert Fault.from_env(fault.to_env()) == fault


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "meteor", "rank": 0, "step": 1}, "unknown fault kind"),
    ({"kind": "slow_link", "rank": 1, "step": 1}, "needs a peer"),
    ({"kind": "slow_link", "rank": 1, "step": 1, "peer": 1}, "needs a peer"),
    ({"kind": "desync", "rank": 1, "step": 1, "mode": "colour"}, "desync mode"),
])
def test_bad_fault_is_named(kwargs, match):
    with pytest.raises(TensorwireError, match=match):
        Fault(**kwargs)


@pytest.mark.parametrize("text", ["{not json", '{"kind": "hang"}', "[1, 2]"])
def test_bad_environment_is_named(text):
    with pytest.raises(TensorwireError, match="TENSORWIRE_FAULT"):
        Fault.from_env(text)


def test_sample_covers_every_kind_within_bounds():
    faults = sample_faults(100, 4, (10, 25), 0.1, random.Random(0))
    counts = Counter(f.kind for f in faults)
    assert set(counts) == set(KINDS) and min(counts.values()) == 20
    for f in faults:
        assert 0 <= f.rank < 4 and 10 <= f.step <= 25
        if f.kind == "straggler":
            assert 0.02 <= f.seconds <= 0.1  # 20 % to 100 % of the step
        if f.kind == "slow_link":
            assert f.peer == (f.rank + 1) % 4
    assert sample_faults(100, 4, (10, 25), 0.1, random.Random(0)) == faults
