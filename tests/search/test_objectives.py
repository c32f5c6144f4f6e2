"""Objectives, budgets, the codec measurement, and the evaluator-backed measure on the real model."""

from __future__ import annotations

import math

import pytest

from tensorwire.kv.pipeline import Pipeline
from tensorwire.kv.quality import EvalSettings, Evaluator
from tensorwire.search.objectives import (
    DIRECTIONS,
    OBJECTIVES,
    Budget,
    EvaluatorMeasure,
    Measurement,
    codec_throughput,
    measure_codec,
)
from tensorwire.testing.strategies import kv_cache_data


def measurement(**kw) -> Measurement:
    base = {"ratio": 4.0, "ppl_increase": math.e - 1, "retrieval_drop": None, "encode_bps": 2e8, "decode_bps": 2e8,
            "key_error": 0.1, "value_error": 0.05}  # fmt: skip
    return Measurement(**{**base, **kw})


def test_codec_throughput():
    assert codec_throughput(2.0, 2.0) == 1.0
    assert codec_throughput(1e9, 3e9) == pytest.approx(0.75e9)
    with pytest.raises(ValueError, match="> 0"):
        codec_throughput(0.0, 1.0)


def test_objective_values():
    m = measurement()
    assert OBJECTIVES == ("log2_ratio", "quality_loss", "log10_codec_bps")
    assert DIRECTIONS == ("maximize", "minimize", "maximize")
    assert m.values() == pytest.approx((2.0, 1.0, 8.0))
    assert measurement(ppl_increase=-0.01).quality_loss == pytest.approx(math.log(0.99))
    assert Measurement.from_dict(m.to_dict()) == m


def test_budget():
    b = Budget(max_ppl_increase=0.03, max_retrieval_drop=2.0)
    assert b.constraints(measurement(ppl_increase=0.01)) == pytest.approx((-0.02, 0.0))  # retrieval not measured
    assert b.feasible(measurement(ppl_increase=0.01, retrieval_drop=2.0))
    assert not b.feasible(measurement(ppl_increase=0.01, retrieval_drop=4.0))
    assert not b.feasible(measurement(ppl_increase=0.031))
    with pytest.raises(ValueError, match="budget"):
        Budget(max_ppl_increase=-2)


def test_measure_codec_on_a_cache_shaped_like_a_real_one():
    caches = [kv_cache_data(n_layers=2, batch=1, heads=3, tokens=300, head_dim=64, seed=s) for s in (0, 1)]
    lossless = Pipeline.from_config({"stages": []})  # float32 planes: twice the bf16 bytes, plus the header
    ratio, enc, dec = measure_codec(lossless, caches)
    assert 0.45 < ratio < 0.5 and enc > 0 and dec > 0
    two_bit, _, _ = measure_codec(Pipeline.from_config({"stages": [{"id": "kivi", "residual": 32}, {"id": "zstd"}]}), caches)
    assert two_bit > 4
    with pytest.raises(ValueError, match="at least one cache"):
        measure_codec(lossless, [])


def test_evaluator_measure_reuses_quality_across_encoders(smollm2, sample_text):  # noqa: F811
    model, tokenizer = smollm2
    ev = Evaluator(model, tokenizer, EvalSettings(str(sample_text), context=64, continuation=8, windows=2, needles=1))
    measure = EvaluatorMeasure(ev)
    kivi = {"id": "kivi", "k_bits": 2, "v_bits": 4, "residual": 16}
    raw = measure(Pipeline.from_config({"stages": [kivi, {"id": "raw"}]}), "full")
    packed = measure(Pipeline.from_config({"stages": [kivi, {"id": "raw"}, {"id": "zstd"}]}), "full")
    assert (measure.evaluations, measure.codec_only) == (1, 1)
    assert packed.quality_reused and not raw.quality_reused
    assert (packed.ppl_increase, packed.retrieval_drop, packed.key_error) == (raw.ppl_increase, raw.retrieval_drop, raw.key_error)
    assert packed.ratio > raw.ratio > 1.5 and raw.windows == 2 and raw.needles == 1
    cheap = measure(Pipeline.from_config({"stages": [kivi, {"id": "raw"}]}), "cheap")
    assert cheap.fidelity == "cheap" and cheap.windows == 1 and cheap.needles == 0 and cheap.retrieval_drop is None
    assert measure.evaluations == 2  # a new fidelity is a new quality measurement
    with pytest.raises(ValueError, match="fidelity"):
        measure(Pipeline.from_config({"stages": [kivi]}), "medium")  # type: ignore[arg-type]
