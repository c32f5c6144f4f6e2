"""The ``tensorwire profile`` job: settings, worker processes, and the library they leave.

:func:`run_profile` creates (or joins) a study on an optuna storage, starts
``settings.workers`` processes that each load the model, prefill the evaluation once and
run :class:`~.study.ProfileSearch` trials on the shared study until it holds the
requested number, then writes the feasible Pareto set as a profile library
(:mod:`.library`) and, if asked, its plot (:mod:`.plots`).

The first worker records on the study (``study.user_attrs``) what it was measured with:
``"model"`` (the cache shape), ``"settings"`` (:class:`ProfileSettings` as a dict, the
evaluation nested under ``"evaluation"``, plus the text's hash ``"text_sha256_16"``) and
``"machine"`` (:func:`tensorwire.sysinfo.machine_info`). A library taken from the study carries them.

Example
-------
>>> settings = ProfileSettings(EvalSettings("wikitext-2-raw-test.txt", needles=20), trials=40, workers=2,
...                            out="profiles.json", png="pareto.png")  # doctest: +SKIP
>>> library = run_profile(settings)                                    # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SearchError
from ..kv.profiles import ModelShape, ProfileLibrary
from ..sysinfo import machine_info
from ..kv.quality import EvalSettings
from .library import library_from_study, summary
from .objectives import Budget, EvaluatorMeasure
from .plots import plot_study
from .space import SearchSpace, optuna_module
from .study import SAMPLERS, ProfileSearch, create_study

__all__ = ["ProfileSettings", "run_profile"]

MODEL_NAME = "SmolLM2-135M-Instruct"  # the model tensorwire.models.load_smollm2 loads


@dataclass(frozen=True)
class ProfileSettings:
    """Everything ``tensorwire profile`` runs with (picklable: it travels to the workers).

    Parameters
    ----------
    evaluation : EvalSettings
        What each candidate is measured on, as ``tensorwire kv eval`` measures: text,
        context, continuation, and the full pass's windows and retrieval cases (the cheap
        pass uses one window and no case). ``evaluation.seed`` draws the retrieval cases.
    trials : int
        Trials to add to the study, all workers together (>= 1).
    storage : str, optional
        optuna storage URL shared by the workers; default: an SQLite file next to ``out``.
    study_name : str
        Study to create, or to join when it exists.
    workers : int
        Search processes on this machine (>= 1).
    out, png : str
        Where the profile library is written, and the Pareto plot (None: no plot).
    budget : Budget
        Quality budget: the study's constraints and the library's feasibility.
    seed : int
        Sampler seed; worker ``i`` uses ``seed + i``. Independent of ``evaluation.seed``.
    sampler : {"tpe", "gp", "random"}
        optuna sampler (:func:`~.study.make_sampler`).
    cheap_first : bool
        Screen each candidate with the cheap pass first.
    threads : int
        ``Profile.threads`` of the library: threads a pipeline runs on when serving.
    """

    evaluation: EvalSettings
    trials: int = 60
    storage: str | None = None
    study_name: str = "tensorwire-profile"
    workers: int = 1
    out: str = "profiles.json"
    png: str | None = None
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    sampler: str = "tpe"
    cheap_first: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1 or self.trials < 1:
            raise SearchError(f"need workers >= 1 and trials >= 1, got {self.workers} and {self.trials}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")

    def storage_url(self) -> str:
        """``storage``, or ``sqlite:///`` the absolute path of ``out`` with the suffix ``.db``."""
        if self.storage:
            return self.storage
        return "sqlite:///" + str(Path(self.out).resolve().with_suffix(".db"))


def _worker(settings: ProfileSettings, index: int, until_total: int) -> None:
    """One search process: load the model, prefill, and run trials until the study is full."""
    from ..kv import hf
    from ..kv.quality import Evaluator
    from ..models import load_smollm2

    torch = hf._torch()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, settings.workers)))
    model, tokenizer = load_smollm2()
    evaluator = Evaluator(model, tokenizer, settings.evaluation)
    search = ProfileSearch(SearchSpace.from_registry(), EvaluatorMeasure(evaluator), storage=settings.storage_url(),
                           study_name=settings.study_name, budget=settings.budget, sampler=settings.sampler,
                           seed=settings.seed + index, cheap_first=settings.cheap_first)  # fmt: skip
    shape = hf.model_shape(model)
    attrs = search.study.user_attrs
    if "model" not in attrs:
        # dtype BF16: the evaluator's ratios and throughputs are against the bf16 cache bytes.
        search.study.set_user_attr("model", {"name": MODEL_NAME, "n_layers": shape["n_layers"], "kv_heads": shape["kv_heads"],
                                             "head_dim": shape["head_dim"], "dtype": "BF16"})  # fmt: skip
        search.study.set_user_attr("settings", {**asdict(settings), "text_sha256_16": evaluator.text_id})
        search.study.set_user_attr("machine", machine_info(("torch", "optuna")))
    search.optimize(until_total=until_total)


def run_profile(settings: ProfileSettings, log: Callable[[str], None] | None = print) -> ProfileLibrary:
    """Run the search (``settings.workers`` processes on one study) and write the library.

    Parameters
    ----------
    settings : ProfileSettings
        What to search, on what, and where to write.
    log : callable, optional
        Receives a line before the search and the :func:`~.library.summary` after it
        (None: silent).

    Returns
    -------
    ProfileLibrary
        The library written to ``settings.out`` (the plot goes to ``settings.png``).
    """
    optuna = optuna_module()
    url = settings.storage_url()
    study = create_study(url, settings.study_name)
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)))  # fmt: skip
    target = finished + settings.trials
    if log:
        log(f"study {settings.study_name!r} at {url}: {finished} finished trials, running to {target} "
            f"with {settings.workers} worker(s)")  # fmt: skip
    began = time.perf_counter()
    if settings.workers == 1:
        _worker(settings, 0, target)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch/numba threads
        procs = [ctx.Process(target=_worker, args=(settings, i, target), name=f"tensorwire-profile-{i}")
                 for i in range(settings.workers)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
        if failed:
            raise SearchError(f"search worker(s) failed: {failed}; their trials stay in {url} (re-run to resume)")
    study = create_study(url, settings.study_name)
    model = ModelShape.from_dict(study.user_attrs["model"])
    library = library_from_study(study, model, settings.budget, threads=settings.threads)
    library.save(settings.out)
    if settings.png:
        plot_study(study, settings.png, settings.budget)
    if log:
        log(summary(study, settings.budget, library, time.perf_counter() - began))
    return library
