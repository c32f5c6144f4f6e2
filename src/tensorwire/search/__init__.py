"""Offline Bayesian profiling of KV pipelines (the KVServe method, offline half).

The search space is the strategy space of :mod:`tensorwire.kv`: every registered stage
that declares a ``search_space`` (:mod:`.space`). Each candidate is measured on a real
model and text for three objectives: compression ratio, quality loss and codec
throughput (:mod:`.objectives`), by a multi-objective Bayesian optimiser (optuna's TPE,
with the quality budget as constraints) that screens candidates cheaply first
(:mod:`.study`). The measured 3-D Pareto set is written as a profile library
(:mod:`tensorwire.kv.profiles`) for the online controller; :mod:`.pareto` holds the
Pareto filter, an exact hypervolume and the plot.

Needs the ``search`` extra (optuna) and, to measure on the real model, the ``kv`` extra.

Example
-------
>>> from tensorwire.search import ProfileSettings, run_profile
>>> library = run_profile(ProfileSettings("wikitext-2-raw-test.txt", trials=40, workers=2,
...                                       out="profiles.json", png="pareto.png"))  # doctest: +SKIP

or ``tensorwire profile --text wikitext-2-raw-test.txt --trials 40 --workers 2``.
"""

from __future__ import annotations

from .objectives import DIRECTIONS, OBJECTIVES, Budget, EvaluatorMeasure, Measurement, codec_throughput, measure_codec
from .pareto import hypervolume, hypervolume_history, pareto_mask, plot_pareto
from .space import (
    DEFAULT_RULES,
    CandidateRejected,
    SearchSpace,
    SearchSpaceError,
    SkipRule,
    StageSpace,
    config_key,
    lossy_key,
)
from .study import (
    ProfileSearch,
    ProfileSettings,
    SearchError,
    create_study,
    library_from_study,
    make_sampler,
    plot_study,
    profile_name,
    run_profile,
)

__all__ = [
    "DEFAULT_RULES",
    "DIRECTIONS",
    "OBJECTIVES",
    "Budget",
    "CandidateRejected",
    "EvaluatorMeasure",
    "Measurement",
    "ProfileSearch",
    "ProfileSettings",
    "SearchError",
    "SearchSpace",
    "SearchSpaceError",
    "SkipRule",
    "StageSpace",
    "codec_throughput",
    "config_key",
    "create_study",
    "hypervolume",
    "hypervolume_history",
    "library_from_study",
    "lossy_key",
    "make_sampler",
    "measure_codec",
    "pareto_mask",
    "plot_pareto",
    "plot_study",
    "profile_name",
    "run_profile",
]
