"""Pareto sets, exact hypervolume, and the Pareto plot.

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

__all__ = ["as_minimization", "hypervolume", "hypervolume_history", "pareto_mask", "plot_pareto"]


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


def plot_pareto(ratio: Any, ppl_increase: Any, codec_bps: Any, pareto: Any, path: str, *, title: str = "",
                max_ppl_increase: float | None = None, labels: Sequence[str] | None = None) -> None:  # fmt: skip
    """Ratio vs perplexity increase of every evaluated pipeline, coloured by codec throughput.

    Pareto points are drawn large with a black edge (and labelled when ``labels`` is
    given); the quality budget is a dashed line.
    """
    from ..errors import require

    require("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    ratio, loss, bps = (np.asarray(a, dtype=np.float64) for a in (ratio, ppl_increase, codec_bps))
    pareto = np.asarray(pareto, dtype=bool)
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    mb = bps / 1e6
    norm = LogNorm(vmin=max(mb.min(), 1e-3), vmax=max(mb.max(), mb.min() * 1.01)) if mb.size else None
    y = np.maximum(loss * 100, 1e-3)  # percent; log axis needs > 0 (lossless points sit at the floor)
    ax.scatter(ratio[~pareto], y[~pareto], c=mb[~pareto], norm=norm, cmap="viridis", s=14, alpha=0.45, linewidths=0)
    sc = ax.scatter(ratio[pareto], y[pareto], c=mb[pareto], norm=norm, cmap="viridis", s=60, edgecolors="black",
                    linewidths=0.8, label="Pareto set (3-D)")  # fmt: skip
    if labels is not None:
        for x_, y_, text in zip(ratio[pareto], y[pareto], np.asarray(labels, dtype=object)[pareto]):
            ax.annotate(text, (x_, y_), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if max_ppl_increase is not None and max_ppl_increase > 0:
        ax.axhline(max_ppl_increase * 100, color="crimson", linestyle="--", linewidth=1, label="quality budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio vs bf16 cache")
    ax.set_ylabel("perplexity increase, % (log; floor 0.001 %)")
    ax.set_title(title or "KV pipelines: ratio vs quality, colour = codec throughput")
    fig.colorbar(sc, ax=ax, label="codec throughput 1/(1/enc + 1/dec), MB/s, 1 thread")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
