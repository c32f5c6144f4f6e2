"""Reading results out of a profile study: measured trials, the Pareto set, the library.

A study holds every trial of :class:`~.study.ProfileSearch` (its measurements in the
trials' ``user_attrs``, see :mod:`.study`). From it:

* :func:`full_trials`: the completed trials measured at full fidelity (not repeats);
* :func:`pareto_trials`: those within the budget, compressing (ratio > 1), on the 3-D
  Pareto front;
* :func:`library_from_study`: that front as a :class:`~tensorwire.kv.profiles.ProfileLibrary`
  (what the online controller reads), profiles named by :func:`profile_name`;
* :func:`summary`: a short text report of the study and its library.

Example
-------
>>> library = library_from_study(study, ModelShape("SmolLM2-135M-Instruct", 30, 3, 64), Budget())  # doctest: +SKIP
>>> library.save("profiles.json")                                                              # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from ..errors import SearchError
from ..kv.profiles import ModelShape, Profile, ProfileLibrary
from .objectives import DIRECTIONS, Budget, Measurement
from .pareto import pareto_mask
from .space import optuna_module

__all__ = ["full_trials", "library_from_study", "pareto_trials", "profile_name", "summary"]


def full_trials(study, budget: Budget | None = None) -> list:
    """Completed trials measured at full fidelity (not duplicates), feasible under ``budget`` if given."""
    optuna = optuna_module()
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("fidelity") != "full" or "duplicate_of" in t.user_attrs:
            continue
        if budget is not None and not budget.feasible(Measurement.from_dict(t.user_attrs["full"])):
            continue
        out.append(t)
    return out


def pareto_trials(study, budget: Budget) -> list:
    """Feasible full-fidelity trials on the Pareto front, with a ratio above 1.

    A ratio <= 1 never beats sending the cache raw (ratio 1, no loss, no codec time), so
    such pipelines are left out, whatever their other objectives.
    """
    trials = [t for t in full_trials(study, budget) if t.values[0] > 0]
    if not trials:
        return []
    mask = pareto_mask(np.array([t.values for t in trials]), DIRECTIONS)
    return [t for t, keep in zip(trials, mask) if keep]


def profile_name(config: Mapping[str, Any]) -> str:
    """A readable, unique name for a pipeline config: stage ids with their non-default parameters.

    >>> profile_name({"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 2, "group_size": 32, "residual": 128}, {"id": "zstd", "level": 3}]})
    'kivi:k_bits=4/zstd'
    """
    import dataclasses

    from ..kv.registry import stage_class

    parts = []
    for stage in config["stages"]:
        klass = stage_class(stage["id"])
        defaults = {f.name: f.default for f in dataclasses.fields(klass) if f.default is not dataclasses.MISSING}
        params = [f"{k}={v}" for k, v in stage.items() if k != "id" and (k not in defaults or defaults[k] != v)]
        parts.append(stage["id"] + (":" + ",".join(params) if params else ""))
    return "/".join(parts)


def library_from_study(study, model: ModelShape, budget: Budget, machine: Mapping[str, Any] | None = None,
                       threads: int = 1) -> ProfileLibrary:  # fmt: skip
    """The feasible 3-D Pareto set of ``study`` as a profile library (``kv/profiles.py`` format).

    Each profile holds the full-fidelity measurement; its ``extra`` adds the objectives,
    the reconstruction errors, the trial number and the cheap-pass measurement.

    Parameters
    ----------
    study : optuna.Study
        A study of :class:`~.study.ProfileSearch`.
    model : ModelShape
        The cache the profiles were measured on.
    budget : Budget
        Which measurements are feasible.
    machine : mapping, optional
        The library's machine record; default: the study's ``user_attrs["machine"]``.
        Either way a ``"search"`` entry is added (study, trials, budget and the study's
        ``user_attrs["settings"]``) unless it holds one.
    threads : int
        ``Profile.threads`` of every profile.

    Raises
    ------
    SearchError
        When no fully measured trial is within the budget and compresses.
    """
    chosen = pareto_trials(study, budget)
    if not chosen:
        raise SearchError(f"study {study.study_name!r} has no fully measured pipeline within the budget "
                          f"(ppl_increase <= {budget.max_ppl_increase}, retrieval_drop <= {budget.max_retrieval_drop}) "
                          "that compresses (ratio > 1); run more trials or loosen the budget")  # fmt: skip
    chosen.sort(key=lambda t: -t.values[0])
    profiles, names = [], set()
    for t in chosen:
        m = Measurement.from_dict(t.user_attrs["full"])
        name = base = profile_name(t.user_attrs["pipeline"])
        n = 2
        while name in names:
            name, n = f"{base}#{n}", n + 1
        names.add(name)
        extra = {
            "quality_loss": m.quality_loss, "codec_bps": m.codec_bps, "key_error": m.key_error,
            "value_error": m.value_error, "ppl_base": m.ppl_base, "retrieval_base": m.retrieval_base,
            "measured": {"windows": m.windows, "needles": m.needles}, "trial": t.number,
            "cheap": t.user_attrs.get("cheap"),
        }  # fmt: skip
        profiles.append(Profile(name=name, pipeline=t.user_attrs["pipeline"], ratio=m.ratio, ppl_increase=m.ppl_increase,
                                retrieval_drop=0.0 if m.retrieval_drop is None else m.retrieval_drop,
                                encode_bps=m.encode_bps, decode_bps=m.decode_bps, threads=threads, extra=extra))  # fmt: skip
    info = dict(machine or study.user_attrs.get("machine") or {})
    info.setdefault("source", f"tensorwire.search: study {study.study_name!r}, {len(study.trials)} trials, "
                              f"budget ppl_increase <= {budget.max_ppl_increase}, retrieval_drop <= {budget.max_retrieval_drop}")  # fmt: skip
    info.setdefault("search", {"study": study.study_name, "trials": len(study.trials), "budget": asdict(budget),
                               "settings": study.user_attrs.get("settings")})  # fmt: skip
    return ProfileLibrary(model, tuple(profiles), info)


def summary(study, budget: Budget, library: ProfileLibrary, seconds: float | None = None) -> str:
    """A short text report of a study and the library taken from it."""
    optuna = optuna_module()
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}  # fail, ...
    dup = sum("duplicate_of" in t.user_attrs for t in trials)
    stopped = sum("stopped" in t.user_attrs and "duplicate_of" not in t.user_attrs for t in trials)
    rejected = sum("rejected" in t.user_attrs for t in trials)
    lines = [f"{len(trials)} trials: {len(full_trials(study))} measured in full, {stopped} stopped after the cheap pass, "
             f"{rejected} skipped or invalid, {dup} repeats (not measured again), {states['fail']} failed"
             + (f"; {seconds:.0f} s" if seconds is not None else ""),
             (f"{len(library)} profiles on the feasible Pareto set (ppl_increase <= {budget.max_ppl_increase}, "
              f"retrieval_drop <= {budget.max_retrieval_drop}):"),
             f"  {'ratio':>6} {'ppl +%':>7} {'drop':>5} {'enc MB/s':>9} {'dec MB/s':>9}  profile"]  # fmt: skip
    for p in library:
        lines.append(f"  {p.ratio:6.2f} {p.ppl_increase * 100:7.3f} {p.retrieval_drop:5.1f} {p.encode_bps / 1e6:9.0f} "
                     f"{p.decode_bps / 1e6:9.0f}  {p.name}")  # fmt: skip
    return "\n".join(lines)
