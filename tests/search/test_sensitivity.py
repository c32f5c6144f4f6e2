"""Mixed precision by measured sensitivity: the scan's bookkeeping and the allocation."""

from __future__ import annotations

import pytest

from tensorwire.kv import Pipeline
from tensorwire.search.sensitivity import Sensitivity, allocate, mixed_config, narrowing_costs, scan


def fake_measure(sensitive: dict[tuple[str, int], float]):
    """A stand-in for the evaluator: each narrowed part adds its own cost per bit removed below 8."""

    def measure(config):
        stage = config["stages"][0]
        return 0.001 + sum(sensitive.get((part, layer), 0.0) * (8 - width)
                           for part in ("k", "v") for layer, width in enumerate(stage[f"{part}_bits"]))  # fmt: skip

    return measure


def test_scan_measures_each_part_alone_against_the_base():
    sensitive = {("k", 0): 0.01, ("v", 1): 0.0001}
    s = scan(fake_measure(sensitive), n_layers=2, bits=(2, 4))
    assert s.base_increase == pytest.approx(0.001)
    assert s.increase["k"][0] == pytest.approx([0.06, 0.04]) and s.increase["v"][1] == pytest.approx([0.0006, 0.0004])
    assert s.increase["k"][1] == pytest.approx([0.0, 0.0])
    assert Sensitivity.from_dict(s.to_dict()).increase == s.increase


def test_allocation_narrows_the_cheap_parts_first_and_keeps_the_budget():
    s = Sensitivity(bits=(2, 3, 4), base_bits=8, base_increase=0.0,
                    increase={"k": [[0.05, 0.011, 0.001], [0.003, 0.0, 0.002]],
                              "v": [[0.004, 0.002, 0.0], [-0.001, 0.0, 0.0]]})  # fmt: skip
    costs = narrowing_costs(s)
    assert costs["k"][0] == pytest.approx([0.049, 0.01, 0.0])  # over the part at 4 bits
    assert costs["k"][1] == pytest.approx([0.001, 0.0, 0.0])  # noise (3 bits "better" than 4) buys nothing back
    assert costs["v"][1] == [0.0, 0.0, 0.0]
    k, v, predicted = allocate(s, budget=0.0)
    assert (k, v) == ([4, 3], [4, 2]) and predicted == 0.0  # only the free narrowings
    k, v, predicted = allocate(s, budget=0.004)
    # cheapest per bit first: k1 3->2 (0.001), v0 4->3 (0.002); v0 3->2 (+0.002) would pass the budget
    assert (k, v) == ([4, 2], [3, 2]) and predicted == pytest.approx(0.003)
    k, v, predicted = allocate(s, budget=1.0)
    assert (k, v) == ([2, 2], [2, 2]) and predicted == pytest.approx(0.049 + 0.001 + 0.004)


def test_mixed_config_builds():
    pipeline = Pipeline.from_config(mixed_config([4, 3], [2, 2]))
    assert pipeline.quantizer.id == "mixed" and pipeline.array_encoder.id == "ans"
