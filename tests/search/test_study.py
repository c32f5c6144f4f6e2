"""The study driver, with the analytic objective of conftest.py (driver mechanics only)."""

from __future__ import annotations

import multiprocessing
import sqlite3

import optuna
import pytest

from tensorwire.errors import SearchError
from tensorwire.kv.pipeline import Pipeline
from tensorwire.kv.stage import ShapeMismatch
from tensorwire.search.objectives import Budget, Measurement
from tensorwire.search.space import SearchSpace, config_key
from tensorwire.search.study import ProfileSearch, create_study
from tests.search.conftest import SMALL, analytic

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Counting:
    """``analytic``, counting calls per fidelity."""

    def __init__(self, fn=analytic):
        self.fn = fn
        self.calls: list[tuple[str, str]] = []

    def __call__(self, pipeline, fidelity):
        self.calls.append((config_key(pipeline), fidelity))
        return self.fn(pipeline, fidelity)


@pytest.mark.parametrize("repeats", ["prune", "answer"])
def test_repeats_cost_no_evaluation(repeats):
    space = SearchSpace.from_registry(SMALL)  # 3 selectors x 6 quantizers x 2 chains = 36 configs
    measure = Counting()
    search = ProfileSearch(space, measure, sampler="random", seed=0, budget=Budget(1.0, 100.0), repeats=repeats)
    search.optimize(80)
    trials = search.study.trials
    again = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert again, "80 draws from 36 configs must repeat some"
    measured = {key for key, _ in measure.calls}
    assert len(measured) == len({t.user_attrs["key"] for t in trials})  # each config measured once
    assert len(measure.calls) == search.evaluations == sum(t.user_attrs["evaluations"] for t in trials)
    for t in again:
        first = trials[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["key"] == first.user_attrs["key"] and "duplicate_of" not in first.user_attrs
        if repeats == "prune":
            assert t.state == optuna.trial.TrialState.PRUNED and t.values is None
        else:
            assert t.values == first.values and t.constraints == first.constraints
    assert {t.user_attrs["worker"] for t in trials} == {search.worker}
    assert len(search.full_trials()) == len(measured)  # repeats never count as measurements


def test_skipped_and_invalid_candidates_are_pruned_without_evaluation():
    space = SearchSpace.from_registry({"headwise": {"high_bits": (2,), "low_bits": (2, 3)}, "raw": {}, "enec": None})
    measure = Counting()
    search = ProfileSearch(space, measure, sampler="random", seed=1, cheap_first=False)
    search.optimize(25)
    pruned = [t for t in search.study.trials if "rejected" in t.user_attrs]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in pruned)
    reasons = {t.user_attrs["rejected"].split(":")[0] + ":" + t.user_attrs["rejected"].split(":")[1] for t in pruned}
    assert reasons == {"skipped: enec-fast-on-codes", "invalid: stage 'headwise'"}
    assert all(Pipeline.from_config(key_config(k)).quantizer.low_bits == 2 for k, _ in measure.calls)
    assert all("enec" != Pipeline.from_config(key_config(k)).array_encoder.id or
               Pipeline.from_config(key_config(k)).array_encoder.level == "max" for k, _ in measure.calls)  # fmt: skip


def key_config(key: str) -> dict:
    import json

    return json.loads(key)


def test_measure_failures_prune_the_trial():
    def failing(pipeline, fidelity):
        raise ShapeMismatch("stage 'hadamard': head_dim 80 is not a power of two")

    search = ProfileSearch(SearchSpace.from_registry(SMALL), failing, sampler="random", seed=0)
    search.optimize(3)
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in search.study.trials)
    assert search.study.trials[0].user_attrs["rejected"].startswith("failed: ShapeMismatch")


def test_the_cheap_pass_stops_candidates_over_budget():
    measure = Counting()
    budget = Budget(max_ppl_increase=0.005, max_retrieval_drop=2.0)
    search = ProfileSearch(SearchSpace.from_registry(SMALL), measure, sampler="random", seed=3, budget=budget, slack=2.0)
    search.optimize(30)
    for t in search.study.trials:
        if "duplicate_of" in t.user_attrs:
            continue
        cheap = Measurement.from_dict(t.user_attrs["cheap"])
        if cheap.ppl_increase > 2.0 * budget.max_ppl_increase:
            assert t.user_attrs["fidelity"] == "cheap" and "over budget" in t.user_attrs["stopped"]
            assert "full" not in t.user_attrs and t.user_attrs["evaluations"] == 1
            assert t.values == pytest.approx(cheap.values())
            assert t.constraints["ppl_increase"] > 0
        else:
            assert t.user_attrs["fidelity"] in ("full", "cheap")


def test_the_cheap_pass_stops_a_dominated_candidate():
    space = SearchSpace.from_registry({"kivi": {"k_bits": (4, 8), "v_bits": (8,)}, "raw": {}})
    best = Measurement(ratio=10.0, ppl_increase=0.0, retrieval_drop=0.0, encode_bps=1e10, decode_bps=1e10,
                       key_error=0.0, value_error=0.0)  # fmt: skip

    def measure(pipeline, fidelity):  # kivi 8/8 is made better than kivi 4/8 in every objective
        return best if pipeline.quantizer.k_bits == 8 else analytic(pipeline, fidelity)

    search = ProfileSearch(space, measure, sampler="random", seed=0, slack=2.0)
    search.study.enqueue_trial({"kivi.k_bits": 8})
    search.study.enqueue_trial({"kivi.k_bits": 4})
    search.optimize(2)
    first, second = search.study.trials
    assert first.user_attrs["fidelity"] == "full"
    assert second.user_attrs["fidelity"] == "cheap" and second.user_attrs["evaluations"] == 1
    assert second.user_attrs["stopped"] == "dominated at the cheap fidelity by trial 0, even with slack 2"


def test_a_study_of_another_shape_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(storage=url, study_name="s", directions=["minimize", "minimize"])
    with pytest.raises(SearchError, match="Use another --study-name"):
        create_study(url, "s")


def test_bad_settings():
    with pytest.raises(SearchError, match="slack"):
        ProfileSearch(SearchSpace.from_registry(SMALL), analytic, slack=0.5)
    with pytest.raises(SearchError, match="sampler"):
        ProfileSearch(SearchSpace.from_registry(SMALL), analytic, sampler="cmaes")
    with pytest.raises(SearchError, match="repeats"):
        ProfileSearch(SearchSpace.from_registry(SMALL), analytic, repeats="ignore")


def _worker(url: str, seed: int, total: int) -> None:
    search = ProfileSearch(SearchSpace.from_registry(SMALL), analytic, storage=url, study_name="shared",
                           sampler="tpe", seed=seed, n_startup_trials=4, worker=f"worker-{seed}")  # fmt: skip
    search.optimize(until_total=total)


def test_two_processes_search_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_study(url, "shared")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(url, seed, 16)) for seed in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    study = create_study(url, "shared")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 16 <= len(finished) <= 17  # each worker stops at 16; one trial may be in flight when the other gets there
    workers = {t.user_attrs["worker"] for t in finished}
    assert workers == {"worker-0", "worker-1"}
    # A repeat, in either worker, points at the trial that measured the config.
    by_number = {t.number: t for t in finished}
    for t in finished:
        if "duplicate_of" in t.user_attrs:
            first = by_number[t.user_attrs["duplicate_of"]]
            assert first.user_attrs["key"] == t.user_attrs["key"] and first.state == optuna.trial.TrialState.COMPLETE
    with sqlite3.connect(tmp_path / "study.db") as db:
        assert db.execute("select count(*) from studies").fetchone()[0] == 1
