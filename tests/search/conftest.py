"""A small analytic objective instead of the model, and a study of it, for the study, library and plot tests.

``analytic`` gives every pipeline a deterministic ratio, loss and speed from its
parameters, so that the driver's bookkeeping (skips, repeats, the cheap pass, storage
shared by processes, the library) can be checked exactly and fast. The real objective is
tested in test_objectives.py and end to end in test_runner.py.
"""

from __future__ import annotations

import pytest

from tensorwire.kv.pipeline import Pipeline
from tensorwire.search.objectives import Budget, Measurement
from tensorwire.search.space import SearchSpace
from tensorwire.search.study import ProfileSearch

SMALL = {"streaming_llm": {"keep_fraction": (0.5, 0.9)}, "kivi": {"k_bits": (2, 4, 8), "v_bits": (2, 4)},
         "raw": {}, "zstd": {"level": (3,)}}  # fmt: skip


def analytic(pipeline: Pipeline, fidelity: str) -> Measurement:
    """Fewer bits and fewer tokens: higher ratio, higher loss; zstd: smaller and slower."""
    q, sel = pipeline.quantizer, pipeline.selector
    bits = (q.k_bits + q.v_bits) / 2 if q is not None and q.id == "kivi" else 16.0
    keep = sel.keep_fraction if sel is not None else 1.0
    zstd = any(s.id == "zstd" for s in pipeline.stages)
    ratio = 16.0 / bits / keep * (1.15 if zstd else 1.0)
    loss = 0.2 * 2.0 ** (-bits) + 0.04 * (1.0 - keep) + (0.002 if fidelity == "cheap" else 0.0)
    speed = 1e9 / (4.0 if zstd else 1.0)
    return Measurement(ratio=ratio, ppl_increase=loss, retrieval_drop=0.0 if fidelity == "full" else None,
                       encode_bps=speed, decode_bps=2 * speed, key_error=loss, value_error=loss, fidelity=fidelity)  # fmt: skip


@pytest.fixture(scope="session")
def analytic_search() -> ProfileSearch:
    """30 TPE trials of ``analytic`` on ``SMALL`` within the default budget (read, never changed)."""
    search = ProfileSearch(SearchSpace.from_registry(SMALL), analytic, sampler="tpe", seed=0, budget=Budget(),
                           n_startup_trials=5)  # fmt: skip
    search.optimize(30)
    return search
