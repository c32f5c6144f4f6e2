"""Plots of a profile search (matplotlib, the ``search`` extra, imported only when drawing).

:func:`plot_pareto` draws plain arrays (ratio, perplexity increase, codec throughput,
Pareto membership); :func:`plot_study` draws a study's fully measured trials with it.
Both write a PNG with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import SearchError, require
from .library import full_trials, pareto_trials
from .objectives import Budget, Measurement

__all__ = ["plot_pareto", "plot_study"]


def plot_pareto(ratio: Any, ppl_increase: Any, codec_bps: Any, pareto: Any, path: str, *, title: str = "",
                max_ppl_increase: float | None = None, labels: Sequence[str] | None = None) -> None:  # fmt: skip
    """Ratio vs perplexity increase of every evaluated pipeline, coloured by codec throughput.

    Pareto points are drawn large with a black edge (and labelled when ``labels`` is
    given); the quality budget is a dashed line.
    """
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


def plot_study(study, path: str, budget: Budget, title: str = "") -> None:
    """Pareto plot (ratio vs ppl increase, colour = codec throughput) of the full-fidelity trials."""
    trials = full_trials(study)
    if not trials:
        raise SearchError(f"study {study.study_name!r} has no fully measured trial to plot")
    ms = [Measurement.from_dict(t.user_attrs["full"]) for t in trials]
    front = {t.number for t in pareto_trials(study, budget)}
    plot_pareto([m.ratio for m in ms], [m.ppl_increase for m in ms], [m.codec_bps for m in ms],
                [t.number in front for t in trials], path, max_ppl_increase=budget.max_ppl_increase,
                title=title or f"{study.study_name}: {len(trials)} pipelines measured, {len(front)} on the Pareto set")  # fmt: skip
