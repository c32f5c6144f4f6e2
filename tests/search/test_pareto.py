"""Pareto filter and exact hypervolume on hand-made points."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tensorwire.search.pareto import as_minimization, hypervolume, hypervolume_history, pareto_mask


def test_pareto_mask_by_hand():
    points = [[1, 5], [2, 2], [5, 1], [3, 3], [2, 2], [6, 6], [1, 6]]
    # [3,3] is dominated by [2,2]; the second [2,2] repeats the first; [6,6] and [1,6] are dominated.
    assert pareto_mask(points).tolist() == [True, True, True, False, False, False, False]
    assert pareto_mask([[np.nan, 0.0], [1.0, 1.0]]).tolist() == [False, True]
    assert pareto_mask(np.zeros((0, 3))).tolist() == []


def test_pareto_mask_with_directions():
    # (ratio max, loss min, speed max)
    points = [[4.0, 0.02, 100.0], [4.0, 0.01, 100.0], [8.0, 0.05, 10.0], [2.0, 0.0, 1000.0], [3.0, 0.03, 50.0]]
    assert pareto_mask(points, ["maximize", "minimize", "maximize"]).tolist() == [False, True, True, True, False]
    assert as_minimization([[1.0, 2.0]], ["maximize", "minimize"]).tolist() == [[-1.0, 2.0]]
    with pytest.raises(ValueError, match="direction"):
        as_minimization([[1.0]], ["max"])
    with pytest.raises(ValueError, match="2 directions for 1 objectives"):
        as_minimization([[1.0]], ["minimize", "minimize"])


def test_hypervolume_by_hand():
    assert hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]) == 3.0
    assert hypervolume([[0.0, 0.0, 0.0]], [1.0, 1.0, 1.0]) == 1.0
    # Two boxes: 1 x 0.5 x 0.5 and 0.5 x 1 x 1, overlapping in 0.5 x 0.5 x 0.5.
    assert hypervolume([[0.0, 0.5, 0.5], [0.5, 0.0, 0.0]], [1.0, 1.0, 1.0]) == 0.625
    # A dominated point and a point beyond the reference add nothing.
    assert hypervolume([[0.0, 0.5, 0.5], [0.5, 0.0, 0.0], [0.6, 0.6, 0.6], [0.1, 2.0, 0.1]], [1.0, 1.0, 1.0]) == 0.625
    assert hypervolume([[1.0, 0.0, 0.0]], [1.0, 1.0, 1.0]) == 0.0  # on the reference: no volume
    assert hypervolume(np.zeros((0, 3)), [1.0, 1.0, 1.0]) == 0.0
    # Maximised objectives: reference (ratio 1, loss 0.1, speed 1); point (ratio 3, loss 0.05, speed 2).
    assert hypervolume([[3.0, 0.05, 2.0]], [1.0, 0.1, 1.0], ["maximize", "minimize", "maximize"]) == pytest.approx(0.1)
    assert hypervolume([[0.5], [0.25]], [1.0]) == 0.75


@settings(max_examples=40, deadline=None)
@given(points=arrays(np.float64, st.tuples(st.integers(1, 25), st.integers(2, 4)), elements=st.floats(0, 1)))
def test_hypervolume_matches_optuna(points):
    compute = pytest.importorskip("optuna._hypervolume").compute_hypervolume
    ref = np.full(points.shape[1], 1.25)
    assert hypervolume(points, ref) == pytest.approx(compute(points, ref), rel=1e-12, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(points=arrays(np.float64, st.tuples(st.integers(1, 40), st.just(3)), elements=st.floats(0, 1)),
       data=st.data())  # fmt: skip
def test_hypervolume_history(points, data):
    feasible = np.asarray(data.draw(st.lists(st.booleans(), min_size=len(points), max_size=len(points))))
    history = hypervolume_history(points, [1.0, 1.0, 1.0], feasible=feasible)
    assert np.all(np.diff(history) >= 0)
    assert history[-1] == pytest.approx(hypervolume(points[feasible], [1.0, 1.0, 1.0]) if feasible.any() else 0.0)
    for k in (0, len(points) // 2):
        first = points[: k + 1][feasible[: k + 1]]
        assert history[k] == pytest.approx(hypervolume(first, [1.0, 1.0, 1.0]) if len(first) else 0.0)
