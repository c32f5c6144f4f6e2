"""Reading a study: the feasible Pareto set as a profile library, named profiles."""

from __future__ import annotations

import numpy as np
import pytest

from tensorwire.errors import SearchError
from tensorwire.kv.profiles import ModelShape, ProfileLibrary
from tensorwire.search.library import library_from_study, profile_name, summary
from tensorwire.search.objectives import DIRECTIONS, Budget, Measurement
from tensorwire.search.pareto import pareto_mask
from tensorwire.search.space import SearchSpace
from tensorwire.search.study import ProfileSearch
from tests.search.conftest import SMALL, analytic

SHAPE = ModelShape("SmolLM2-135M-Instruct", 30, 3, 64)


def test_library_is_the_feasible_pareto_set(tmp_path, analytic_search):
    search, budget = analytic_search, analytic_search.budget
    library = search.library(SHAPE, machine={"cpu_model": "test"})
    assert isinstance(library, ProfileLibrary) and len(library) >= 2
    for p in library:
        assert p.ratio > 1 and p.meets(budget.max_ppl_increase, budget.max_retrieval_drop)
        assert p.name == profile_name(p.pipeline) and p.extra["trial"] >= 0 and "codec_bps" in p.extra
    points = np.array([[p.ratio, p.ppl_increase, 1 / (1 / p.encode_bps + 1 / p.decode_bps)] for p in library])
    assert pareto_mask(points, DIRECTIONS).all()
    # Every fully measured feasible trial is dominated by (or equal to) a profile.
    for t in search.full_trials(feasible=True):
        m = Measurement.from_dict(t.user_attrs["full"])
        if m.ratio > 1:
            assert any(p.ratio >= m.ratio and p.ppl_increase <= m.ppl_increase and
                       1 / (1 / p.encode_bps + 1 / p.decode_bps) >= m.codec_bps * (1 - 1e-12) for p in library)  # fmt: skip
    path = tmp_path / "profiles.json"
    library.save(path)
    assert ProfileLibrary.load(path) == library and library.machine["source"].startswith("tensorwire.search")
    report = summary(search.study, budget, library)
    assert f"{len(library)} profiles on the feasible Pareto set" in report and all(p.name in report for p in library)


def test_profile_names_show_non_default_parameters():
    assert profile_name({"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 2, "group_size": 32, "residual": 128},
                                    {"id": "zstd", "level": 3}]}) == "kivi:k_bits=4/zstd"  # fmt: skip


def test_an_empty_study_has_no_library():
    search = ProfileSearch(SearchSpace.from_registry(SMALL), analytic, budget=Budget(max_ppl_increase=-0.5))
    search.optimize(3)
    with pytest.raises(SearchError, match="no fully measured pipeline within the budget"):
        library_from_study(search.study, SHAPE, search.budget)
