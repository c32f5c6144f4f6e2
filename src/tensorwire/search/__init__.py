"""Offline Bayesian profiling of KV pipelines (the KVServe method, offline half).

The search space is the strategy space of :mod:`tensorwire.kv`: every registered stage
that declares a ``search_space`` (:mod:`.space`). Each candidate is measured on a real
model and text for three objectives: compression ratio, quality loss and codec
throughput (:mod:`.objectives`), by a multi-objective Bayesian optimiser (optuna's TPE,
with the quality budget as constraints) that screens candidates cheaply first
(:mod:`.study`). The measured 3-D Pareto set is read out of the study as a profile
library (:mod:`.library`, in the format of :mod:`tensorwire.kv.profiles`) for the online
controller; :mod:`.pareto` holds the Pareto filter and an exact hypervolume,
:mod:`.plots` the plots, and :mod:`.runner` the ``tensorwire profile`` job (settings,
worker processes).

Needs the ``search`` extra (optuna) and, to measure on the real model, the ``kv`` extra.

Example
-------
>>> from tensorwire.kv.quality import EvalSettings
>>> from tensorwire.search import ProfileSettings, run_profile
>>> library = run_profile(ProfileSettings(EvalSettings("wikitext-2-raw-test.txt", needles=20), trials=40,
...                                       workers=2, out="profiles.json", png="pareto.png"))  # doctest: +SKIP

or ``tensorwire profile --text wikitext-2-raw-test.txt --trials 40 --workers 2``.
"""

from __future__ import annotations

from ..errors import CandidateRejected, SearchError, SearchSpaceError
from .library import library_from_study, profile_name
from .objectives import DIRECTIONS, OBJECTIVES, Budget, EvaluatorMeasure, Measurement, codec_throughput, measure_codec
from .pareto import hypervolume, hypervolume_history, pareto_mask
from .plots import plot_pareto, plot_study
from .runner import ProfileSettings, run_profile
from .space import DEFAULT_RULES, SearchSpace, SkipRule, StageSpace, config_key, lossy_key
from .study import ProfileSearch, create_study, make_sampler

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
