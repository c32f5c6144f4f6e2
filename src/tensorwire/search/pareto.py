"""Pareto sets and exact hypervolume (the Pareto plot is in :mod:`.plots`).

Everything here works on plain arrays of objective values, one row per point. By default
every objective is minimised; pass ``directions`` (``"minimize"``/``"maximize"`` per
column, as optuna spells them) to mix.

Hypervolume is computed exactly by slicing along the last objective (HSO, While et al.
2006): sort the points by it, and sum, over the slabs between consecutive values, the
slab's depth times the hypervolume of the points below it in one dimension fewer; two
dimensions are a sorted sweep. ``O(n^(d-1) log n)``: for the three objectives of the
profile search and a few thousand points this takes milliseconds after the Pareto filter.

Example
-------
>>> hypervolume([[1.0, 2.0], [2.0, 1.0]], reference=[3.0, 3.0])
3.0
>>> pareto_mask([[1, 2], [2, 1], [2, 2]]).tolist()
[True, True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["as_minimization", "hypervolume", "hypervolume_history", "pareto_mask"]


def as_minimization(points: Any, directions: Sequence[str] | None = None) -> np.ndarray:
    """``points`` as a float64 ``(n, d)`` array with maximised columns negated."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim == 1:
        array = array.reshape(-1, 1) if directions is not None and len(directions) == 1 else array.reshape(1, -1)
    if array.ndim != 2:
        raise ValueError(f"points must be an (n, d) array, got shape {array.shape}")
    if directions is None:
        return array.copy()
    if len(directions) != array.shape[1]:
        raise ValueError(f"{len(directions)} directions for {array.shape[1]} objectives")
    signs = []
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise ValueError(f"a direction is 'minimize' or 'maximize', got {d!r}")
        signs.append(-1.0 if d == "maximize" else 1.0)
    return array * np.asarray(signs)


def pareto_mask(points: Any, directions: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the non-dominated rows (of identical rows, only the first is kept).

    Row ``a`` dominates ``b`` when ``a <= b`` in every (minimised) objective and ``a < b``
    in at least one. NaN rows are never in the set.
    """
    p = as_minimization(points, directions)
    n = p.shape[0]
    keep = ~np.isnan(p).any(axis=1)
    order = np.lexsort(p.T[::-1])  # lexicographic: a dominating row sorts before the rows it dominates
    for rank, i in enumerate(order):
        if not keep[i]:
            continue
        later = order[rank + 1 :]
        later = later[keep[later]]
        if later.size == 0:
            continue
        dominated = np.all(p[i] <= p[later], axis=1)  # ties included: a later identical row is dropped
        keep[later[dominated]] = False
    return keep if n else np.zeros(0, dtype=bool)


def hypervolume(points: Any, reference: Sequence[float], directions: Sequence[str] | None = None) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``reference``.

    ``reference`` is given in the same directions as ``points`` (e.g. a minimum ratio for
    a maximised ratio). Points that do not strictly beat the reference in every objective
    add nothing.
    """
    p = as_minimization(points, directions)
    ref = as_minimization(np.asarray(reference, dtype=np.float64).reshape(1, -1), directions)[0]
    if p.size == 0:
        return 0.0
    if p.shape[1] != ref.size:
        raise ValueError(f"points have {p.shape[1]} objectives, the reference has {ref.size}")
    p = p[np.all(p < ref, axis=1)]
    if p.shape[0] == 0:
        return 0.0
    p = p[pareto_mask(p)]
    return float(_hv(p, ref))


def _hv(p: np.ndarray, ref: np.ndarray) -> float:
    n, d = p.shape
    if n == 0:
        return 0.0
    if d == 1:
        return float(ref[0] - p[:, 0].min())
    if d == 2:
        p = p[np.argsort(p[:, 0], kind="stable")]
        ys = np.minimum.accumulate(p[:, 1])
        widths = np.diff(np.append(p[:, 0], ref[0]))
        return float(np.sum(widths * (ref[1] - ys)))
    p = p[np.argsort(p[:, -1], kind="stable")]
    depths = np.diff(np.append(p[:, -1], ref[-1]))
    total = 0.0
    for i in range(n):
        if depths[i] > 0:
            below = p[: i + 1, :-1]
            total += depths[i] * _hv(below[pareto_mask(below)], ref[:-1])
    return total


def hypervolume_history(points: Any, reference: Sequence[float], directions: Sequence[str] | None = None,
                        feasible: Any = None) -> np.ndarray:  # fmt: skip
    """Hypervolume of the first ``k`` points, for ``k = 1..n`` (infeasible points add nothing)."""
    p = as_minimization(points, directions)
    ok = np.ones(p.shape[0], dtype=bool) if feasible is None else np.asarray(feasible, dtype=bool)
    ref = as_minimization(np.asarray(reference, dtype=np.float64).reshape(1, -1), directions)[0]
    out = np.zeros(p.shape[0])
    front = np.zeros((0, p.shape[1]))
    value = 0.0
    for k in range(p.shape[0]):
        point = p[k]
        # Recompute only when the point enlarges the dominated region.
        if ok[k] and np.all(point < ref) and not np.any(np.all(front <= point, axis=1)):
            front = np.vstack([front, point])
            front = front[pareto_mask(front)]
            value = max(value, float(_hv(front, ref)))  # rounding must not make it shrink
        out[k] = value
    return out
