"""The study driver: multi-objective Bayesian search over the strategy space, with optuna.

One trial = one candidate pipeline drawn from the :class:`~.space.SearchSpace`:

1. **Build** it (``Pipeline.from_config``). A candidate that a skip rule names, or whose
   stages reject their parameters (``StageConfigError``), is pruned at once: it costs a
   trial, not an evaluation.
2. **Seen before?** A config that a finished trial of the study (any worker) already
   measured is not measured again (``user_attrs["duplicate_of"]``): the trial is pruned,
   which steers TPE away from it (or, with ``repeats="answer"``, completed with the
   earlier values).
3. **Cheap pass** (``cheap_first``): one window, no retrieval cases. The trial stops
   there (``user_attrs["stopped"]``, the cheap values returned) when the perplexity
   increase is over ``slack x`` the budget, or when an already fully measured feasible
   trial dominates it even after the cheap values are made ``slack`` times more
   optimistic (quality loss / slack, throughput x slack, ratio x 1.02).
4. **Full pass**: every window and retrieval case.

Both fidelities are kept on the trial (``user_attrs["cheap"]``, ``["full"]``, plain
dicts of :class:`~.objectives.Measurement`), with ``"fidelity"`` naming the one its values
come from and ``"constraints"`` (<= 0: within the :class:`~.objectives.Budget`), also set
as optuna constraints (``trial.set_constraint``), which the samplers read.

Sampler: ``"tpe"`` (default): optuna's multi-objective TPE with ``multivariate=True,
group=True``, which models the conditional parameters jointly per branch of the space,
with the quality budget as constraints. ``"gp"`` (optuna's GPSampler, logEHVI with
constraints) is available, but it models only the parameters every trial shares and
samples the conditional ones at random, so on this space it is not the default.
``"random"``: the baseline.

Storage: any optuna storage URL (``sqlite:///profiles.db``, ``postgresql://...``); several
processes on several machines search one study when they give the same URL and study
name (``load_if_exists``). SQLite waits up to 60 s on a lock instead of failing.

What a study holds is read by :mod:`.library` (the Pareto set, the profile library) and
drawn by :mod:`.plots`; the ``tensorwire profile`` job (settings, worker processes) is
:mod:`.runner`.

Example
-------
>>> search = ProfileSearch(SearchSpace.from_registry(), EvaluatorMeasure(evaluator),  # doctest: +SKIP
...                        storage="sqlite:///profiles.db", study_name="smollm2")
>>> search.optimize(n_trials=40)                                                        # doctest: +SKIP
>>> search.library(ModelShape("SmolLM2-135M-Instruct", 30, 3, 64)).save("profiles.json")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import CandidateRejected, SearchError, TensorwireError
from ..kv.profiles import ModelShape, ProfileLibrary
from .library import full_trials, library_from_study, pareto_trials
from .objectives import DIRECTIONS, OBJECTIVES, Budget, Measure, Measurement
from .space import SearchSpace, config_key, optuna_module

__all__ = ["SAMPLERS", "ProfileSearch", "create_study", "make_sampler", "open_storage"]

SAMPLERS = ("tpe", "gp", "random")
CONSTRAINTS = ("ppl_increase", "retrieval_drop")  # optuna constraint names, in Budget.constraints order


# -- optuna plumbing ------------------------------------------------------------------------
def make_sampler(name: str = "tpe", seed: int | None = None, n_startup_trials: int = 10):
    """An optuna sampler by name: ``"tpe"``, ``"gp"`` or ``"random"`` (see the module docstring)."""
    optuna = optuna_module()
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is marked experimental (it has been since optuna 2.8)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=n_startup_trials)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")


def open_storage(url: str | None):
    """An optuna storage for ``url`` (None: in memory). SQLite waits on locks (several workers)."""
    optuna = optuna_module()
    if url is None:
        return None
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return url


def create_study(storage: str | None = None, study_name: str = "tensorwire-profile", sampler: Any = None):
    """Create, or load when it exists, a study with the three objectives of :mod:`.objectives`."""
    optuna = optuna_module()
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, directions=list(DIRECTIONS),
                                sampler=sampler, load_if_exists=True)  # fmt: skip
    found = [d.name.lower() for d in study.directions]
    if found != list(DIRECTIONS):
        raise SearchError(f"study {study_name!r} in {storage} optimises {found}; a profile search needs "
                          f"{list(DIRECTIONS)} ({', '.join(OBJECTIVES)}). Use another --study-name.")  # fmt: skip
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental since optuna 3.2, still there in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
    return study


# -- the driver -----------------------------------------------------------------------------
class ProfileSearch:
    """Search one study: draw candidates from ``space``, measure them with ``measure``.

    Parameters
    ----------
    space : SearchSpace
        Where candidates come from.
    measure : callable
        ``measure(pipeline, fidelity) -> Measurement`` with fidelity ``"cheap"`` or
        ``"full"`` (:class:`~.objectives.EvaluatorMeasure` on a real model).
    storage, study_name : str
        optuna storage URL (None: in memory) and study name; an existing study is joined.
    budget : Budget, optional
        Quality budget (optuna constraints; also the cheap pass's threshold); default
        ``Budget()``: ppl_increase <= 0.03, retrieval_drop <= 2 points.
    sampler : str or optuna sampler
        ``"tpe"`` (default), ``"gp"``, ``"random"``, or a sampler object.
    seed : int, optional
        Sampler seed (give each worker its own).
    cheap_first : bool
        Screen each candidate with the cheap fidelity first (default True).
    slack : float
        How much better than its cheap estimate a candidate may turn out (> 1).
    n_startup_trials : int
        Random trials before the model-based sampler starts.
    worker : str, optional
        Recorded on every trial this process runs (``user_attrs["worker"]``); default
        ``"<hostname>:<pid>"``.
    repeats : {"prune", "answer"}
        What a trial that draws an already measured config does: ``"prune"`` (default)
        ends it as pruned, which TPE counts against that region, so that it moves on;
        ``"answer"`` completes it with the earlier trial's values. Neither measures again.
    """

    def __init__(self, space: SearchSpace, measure: Measure, *, storage: str | None = None,
                 study_name: str = "tensorwire-profile", budget: Budget | None = None, sampler: Any = "tpe",
                 seed: int | None = None, cheap_first: bool = True, slack: float = 2.0,
                 n_startup_trials: int = 10, worker: str | None = None, repeats: str = "prune"):  # fmt: skip
        if repeats not in ("prune", "answer"):
            raise SearchError(f"repeats is {repeats!r}; expected 'prune' or 'answer'")
        if not slack >= 1.0:
            raise SearchError(f"slack is {slack!r}; it must be >= 1 (1: trust the cheap pass exactly)")
        self.space = space
        self.measure = measure
        self.budget = budget if budget is not None else Budget()
        self.cheap_first = cheap_first
        self.slack = slack
        self.repeats = repeats
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, seed, n_startup_trials)
        self.study = create_study(storage, study_name, sampler)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.evaluations = 0  # measure() calls made by this process
        self._known: dict[str, int] = {}  # config key -> number of a finished trial that measured it
        self._scan_from = 0  # trials before this number are finished and already in _known

    # -- one trial ---------------------------------------------------------------------------
    def objective(self, trial) -> tuple[float, float, float]:
        optuna = optuna_module()
        trial.set_user_attr("worker", self.worker)
        config = self.space.suggest(trial)
        try:
            pipeline = self.space.build(config)
        except CandidateRejected as exc:
            trial.set_user_attr("pipeline", config)
            trial.set_user_attr("rejected", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        key = config_key(pipeline)
        trial.set_user_attr("pipeline", pipeline.to_config())
        trial.set_user_attr("key", key)
        prior = self._find(key)
        if prior is not None:
            trial.set_user_attr("duplicate_of", prior.number)
            trial.set_user_attr("evaluations", 0)
            if self.repeats == "prune":
                raise optuna.TrialPruned(f"measured already in trial {prior.number}")
            for name in ("fidelity", "cheap", "full", "stopped"):
                if name in prior.user_attrs:
                    trial.set_user_attr(name, prior.user_attrs[name])
            # Constraints from the measurement under this search's budget (a resumed study may have another).
            measured = Measurement.from_dict(prior.user_attrs[prior.user_attrs["fidelity"]])
            self._constrain(trial, self.budget.constraints(measured))
            return tuple(prior.values)
        try:
            if self.cheap_first:
                cheap = self._measure(pipeline, "cheap")
                trial.set_user_attr("cheap", cheap.to_dict())
                reason = self._screen(cheap)
                if reason is not None:
                    trial.set_user_attr("stopped", reason)
                    return self._finish(trial, cheap, evaluations=1)
            full = self._measure(pipeline, "full")
        except TensorwireError as exc:  # the stages cannot run on this model's cache
            trial.set_user_attr("rejected", f"failed: {type(exc).__name__}: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("full", full.to_dict())
        return self._finish(trial, full, evaluations=2 if self.cheap_first else 1)

    def _measure(self, pipeline, fidelity: str) -> Measurement:
        self.evaluations += 1
        return self.measure(pipeline, fidelity)  # type: ignore[arg-type]

    def _finish(self, trial, m: Measurement, evaluations: int) -> tuple[float, float, float]:
        trial.set_user_attr("fidelity", m.fidelity)
        trial.set_user_attr("evaluations", evaluations)
        self._constrain(trial, list(self.budget.constraints(m)))
        return m.values()

    @staticmethod
    def _constrain(trial, values: Sequence[float]) -> None:
        # optuna's samplers read trial.constraints (<= 0: feasible); the copy in user_attrs
        # lets a repeat of this config, in any worker, copy them.
        trial.set_user_attr("constraints", list(values))
        for name, value in zip(CONSTRAINTS, values):
            trial.set_constraint(name, value)

    def _find(self, key: str):
        """A finished trial of the study (any worker) that measured ``key``, or None."""
        optuna = optuna_module()
        trials = self.study.get_trials(deepcopy=False)  # ordered by number
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        start, self._scan_from = self._scan_from, None
        for t in trials[start:]:
            if t.state not in finished:
                self._scan_from = t.number if self._scan_from is None else self._scan_from
                continue
            if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
                k = t.user_attrs.get("key")
                if k is not None:
                    self._known.setdefault(k, t.number)
        if self._scan_from is None:
            self._scan_from = len(trials)
        number = self._known.get(key)
        if number is None:
            return None
        return trials[number] if number < len(trials) and trials[number].number == number else next(
            t for t in trials if t.number == number)

    def _screen(self, cheap: Measurement) -> str | None:
        """Why the cheap pass is enough for this candidate, or None to measure it fully."""
        limit = self.budget.max_ppl_increase
        if limit > 0 and cheap.ppl_increase > self.slack * limit:
            return (f"over budget at the cheap fidelity: ppl_increase {cheap.ppl_increase:.4f} > "
                    f"{self.slack:g} x {limit:g}")  # fmt: skip
        if cheap.retrieval_drop is not None and cheap.retrieval_drop > self.slack * max(self.budget.max_retrieval_drop, 1.0):
            return f"over budget at the cheap fidelity: retrieval_drop {cheap.retrieval_drop:.1f} points"
        ratio, loss, speed = cheap.values()
        hope = (ratio + math.log2(1.02), loss / self.slack if loss > 0 else loss, speed + math.log10(self.slack))
        for t in self.full_trials(feasible=True):
            v = t.values
            if v[0] >= hope[0] and v[1] <= hope[1] and v[2] >= hope[2] and tuple(v) != hope:
                return f"dominated at the cheap fidelity by trial {t.number}, even with slack {self.slack:g}"
        return None

    # -- running -------------------------------------------------------------------------------
    def optimize(self, n_trials: int | None = None, *, until_total: int | None = None, timeout: float | None = None,
                 callbacks: Iterable[Callable] = (), show_progress_bar: bool = False) -> None:  # fmt: skip
        """Run trials: ``n_trials`` more in this process, and/or until the study (all
        workers) holds ``until_total`` finished trials."""
        optuna = optuna_module()
        callbacks = list(callbacks)
        if until_total is not None:
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
            if len(self.study.get_trials(deepcopy=False, states=states)) >= until_total:
                return
            callbacks.append(optuna.study.MaxTrialsCallback(until_total, states=states))
            n_trials = n_trials if n_trials is not None else until_total
        self.study.optimize(self.objective, n_trials=n_trials, timeout=timeout, callbacks=callbacks,
                            catch=(), gc_after_trial=False, show_progress_bar=show_progress_bar)  # fmt: skip

    # -- results -------------------------------------------------------------------------------
    def full_trials(self, feasible: bool = False) -> list:
        """The trials measured at full fidelity (within the budget when ``feasible``)."""
        return full_trials(self.study, self.budget if feasible else None)

    def pareto_trials(self) -> list:
        """The feasible, fully measured trials on the 3-D Pareto front (one per config)."""
        return pareto_trials(self.study, self.budget)

    def library(self, model: ModelShape, machine: Mapping[str, Any] | None = None, threads: int = 1) -> ProfileLibrary:
        """The feasible Pareto set as a profile library (:func:`~.library.library_from_study`)."""
        return library_from_study(self.study, model, self.budget, machine, threads)
