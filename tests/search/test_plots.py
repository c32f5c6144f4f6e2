"""The Pareto plot, from arrays and from a study."""

from __future__ import annotations

import numpy as np
import pytest

from tensorwire.errors import SearchError
from tensorwire.search.objectives import Budget
from tensorwire.search.pareto import pareto_mask
from tensorwire.search.plots import plot_pareto, plot_study
from tensorwire.search.study import create_study


def test_plot_pareto_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    ratio = rng.uniform(1, 10, 30)
    loss = rng.uniform(0, 0.05, 30)
    bps = rng.uniform(1e7, 1e9, 30)
    mask = pareto_mask(np.c_[ratio, loss, bps], ["maximize", "minimize", "maximize"])
    path = tmp_path / "pareto.png"
    plot_pareto(ratio, loss, bps, mask, str(path), max_ppl_increase=0.03, labels=[f"p{i}" for i in range(30)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_study_writes_a_png(tmp_path, analytic_search):
    plot_study(analytic_search.study, str(tmp_path / "pareto.png"), analytic_search.budget)
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_a_study_without_full_trials_has_no_plot(tmp_path):
    with pytest.raises(SearchError, match="no fully measured trial to plot"):
        plot_study(create_study(), str(tmp_path / "pareto.png"), Budget())
