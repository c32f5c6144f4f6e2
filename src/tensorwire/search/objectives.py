"""The three objectives of the offline search, and how a candidate is measured.

Objectives (what the optuna study holds, in this order)
--------------------------------------------------------
1. ``log2_ratio`` (maximise): log2 of the compression ratio against the bf16 cache.
2. ``quality_loss`` (minimise): ``log(ppl / ppl_base) = log1p(ppl_increase)``, the mean
   increase of the continuation's negative log-likelihood, in nats per token. It orders
   pipelines exactly as ``ppl_increase`` does, is defined for slightly negative
   increases, and does not let a broken pipeline (perplexity x10) dwarf the scale.
   Retrieval is not folded into it: ``retrieval_drop`` is a *constraint*
   (:class:`Budget`), as is ``ppl_increase``, so the search minimises perplexity loss
   among pipelines that keep retrieval within budget.
3. ``log10_codec_bps`` (maximise): log10 of the codec throughput
   ``1 / (1 / encode_bps + 1 / decode_bps)``: bytes of the bf16 cache per second of
   encode plus decode time, one thread. This is the rate of a request that is encoded
   and then decoded; it is half the harmonic mean of the two, so the slower side
   dominates, as it does for the latency of one transfer.

The logs keep the samplers' models well scaled (ratios span 1..20x, throughputs four
decades); dominance, and so the Pareto set, is the same as on the raw numbers.

Fidelities
----------
``"cheap"``: the first perplexity window only, no retrieval cases, speed measured (a
screening pass). ``"full"``: every window and every retrieval case. The study driver
(:mod:`.study`) runs cheap first and only survivors get the full pass.

Quality depends only on the lossy stages (transforms, selector, quantizer): encoders are
lossless. :class:`EvaluatorMeasure` therefore measures quality once per lossy prefix and
fidelity; a candidate that differs only in its encoders gets its size and speed measured
(:func:`measure_codec`, the evaluator's own method: one thread, warm-up, median over
windows) and reuses the quality.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..kv.pipeline import Pipeline
from ..kv.stage import KVCacheData
from .space import lossy_key

__all__ = [
    "DIRECTIONS",
    "OBJECTIVES",
    "Budget",
    "EvaluatorMeasure",
    "Fidelity",
    "Measure",
    "Measurement",
    "codec_throughput",
    "measure_codec",
]

Fidelity = Literal["cheap", "full"]
OBJECTIVES = ("log2_ratio", "quality_loss", "log10_codec_bps")
DIRECTIONS = ("maximize", "minimize", "maximize")


def codec_throughput(encode_bps: float, decode_bps: float) -> float:
    """Bytes per second of encode + decode time: ``1 / (1/encode_bps + 1/decode_bps)``."""
    if not (encode_bps > 0 and decode_bps > 0):
        raise ValueError(f"throughputs must be > 0, got encode {encode_bps!r}, decode {decode_bps!r}")
    return 1.0 / (1.0 / encode_bps + 1.0 / decode_bps)


@dataclass(frozen=True)
class Budget:
    """Quality budget: a pipeline is feasible when both losses are within it.

    ``retrieval_drop`` counts only where it was measured (full fidelity with needles).
    """

    max_ppl_increase: float = 0.03
    max_retrieval_drop: float = 2.0

    def __post_init__(self) -> None:
        if not (self.max_ppl_increase > -1 and self.max_retrieval_drop >= -100):
            raise ValueError(f"a budget needs max_ppl_increase > -1 and max_retrieval_drop >= -100, got {self}")

    def constraints(self, m: Measurement) -> tuple[float, float]:
        """optuna constraint values (<= 0: satisfied) for ``m``."""
        drop = 0.0 if m.retrieval_drop is None else m.retrieval_drop - self.max_retrieval_drop
        return (m.ppl_increase - self.max_ppl_increase, drop)

    def feasible(self, m: Measurement) -> bool:
        return all(c <= 0 for c in self.constraints(m))


@dataclass(frozen=True)
class Measurement:
    """What one evaluation of one pipeline measured (JSON-ready with :meth:`to_dict`)."""

    ratio: float
    ppl_increase: float
    retrieval_drop: float | None
    encode_bps: float
    decode_bps: float
    key_error: float
    value_error: float
    fidelity: str = "full"
    windows: int = 0
    needles: int = 0
    seconds: float = 0.0
    ppl_base: float | None = None
    retrieval_base: float | None = None
    quality_reused: bool = False  # quality taken from an earlier pipeline with the same lossy stages
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quality_loss(self) -> float:
        """``log1p(ppl_increase)``: nats per token of extra negative log-likelihood."""
        return math.log1p(max(self.ppl_increase, -1 + 1e-12))

    @property
    def codec_bps(self) -> float:
        return codec_throughput(self.encode_bps, self.decode_bps)

    def values(self) -> tuple[float, float, float]:
        """The objective values, in the order of :data:`OBJECTIVES`."""
        return (math.log2(self.ratio), self.quality_loss, math.log10(self.codec_bps))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        return cls(**dict(data))

    @classmethod
    def from_eval(cls, result: Any, fidelity: str, seconds: float | None = None) -> Measurement:
        """From a :class:`tensorwire.kv.quality.EvalResult` measured with speed on."""
        if result.encode_bps is None or result.decode_bps is None:
            raise ValueError("the evaluation was run without speed; the search needs encode/decode throughput")
        return cls(
            ratio=result.ratio, ppl_increase=result.ppl_increase, retrieval_drop=result.retrieval_drop,
            encode_bps=result.encode_bps, decode_bps=result.decode_bps, key_error=result.key_error,
            value_error=result.value_error, fidelity=fidelity, windows=result.windows, needles=result.needles,
            seconds=result.seconds if seconds is None else seconds, ppl_base=result.ppl_base,
            retrieval_base=result.retrieval_base,
        )  # fmt: skip


# A measure: (pipeline, fidelity) -> Measurement. The study driver calls one of these.
Measure = Callable[[Pipeline, Fidelity], Measurement]


def measure_codec(pipeline: Pipeline, caches: Sequence[KVCacheData], expect: Mapping[str, int] | None = None
                  ) -> tuple[float, float, float]:  # fmt: skip
    """``(ratio, encode_bps, decode_bps)`` of ``pipeline`` on ``caches``, one thread.

    The evaluator's method: one untimed warm-up encode/decode (numba compiles on first
    use), then each cache encoded and decoded once; throughput is bytes of the bf16 cache
    over the median time; the ratio is bf16 bytes over the mean payload size.
    """
    from ..codec.cpu import get_threads, set_threads

    if not caches:
        raise ValueError("measure_codec needs at least one cache")
    threads = get_threads()
    set_threads(1)
    try:
        Pipeline.decode_data(pipeline.encode(caches[0]), expect=expect)
        sizes, enc_t, dec_t = [], [], []
        for cache in caches:
            t0 = time.perf_counter()
            payload = pipeline.encode(cache)
            t1 = time.perf_counter()
            Pipeline.decode_data(payload, expect=expect)
            t2 = time.perf_counter()
            sizes.append(len(payload))
            enc_t.append(t1 - t0)
            dec_t.append(t2 - t1)
    finally:
        set_threads(threads)
    kv_bytes = caches[0].nbytes(2)
    return kv_bytes / statistics.fmean(sizes), kv_bytes / statistics.median(enc_t), kv_bytes / statistics.median(dec_t)


class EvaluatorMeasure:
    """Measure pipelines with a :class:`tensorwire.kv.quality.Evaluator` (real model, real text).

    Parameters
    ----------
    evaluator : Evaluator
        Holds the model, the text and the prefilled windows and retrieval cases.
    cheap_windows, cheap_needles : int
        The cheap fidelity's windows and retrieval cases (default 1 and 0).
    reuse_quality : bool
        Measure quality once per lossy prefix and fidelity (default True; see the module
        docstring). Quality is deterministic, so the reused numbers are the ones a new
        evaluation would give.

    Example
    -------
    >>> measure = EvaluatorMeasure(Evaluator(model, tokenizer, EvalSettings("wiki.txt")))  # doctest: +SKIP
    >>> measure(Pipeline.from_config({"stages": [{"id": "kivi"}]}), "cheap").ratio          # doctest: +SKIP
    """

    def __init__(self, evaluator: Any, cheap_windows: int = 1, cheap_needles: int = 0, reuse_quality: bool = True):
        if cheap_windows < 1 or cheap_needles < 0:
            raise ValueError(f"cheap_windows must be >= 1 and cheap_needles >= 0, got {cheap_windows}, {cheap_needles}")
        self.evaluator = evaluator
        self.cheap = (cheap_windows, cheap_needles)
        self.reuse_quality = reuse_quality
        self._quality: dict[tuple[str, str], Measurement] = {}
        self.evaluations = 0  # model evaluations (quality measured), for reports
        self.codec_only = 0  # size/speed only (quality reused)

    def _counts(self, fidelity: Fidelity) -> tuple[int | None, int | None]:
        if fidelity == "cheap":
            return self.cheap
        if fidelity == "full":
            return None, None
        raise ValueError(f"fidelity is {fidelity!r}; expected 'cheap' or 'full'")

    def __call__(self, pipeline: Pipeline, fidelity: Fidelity) -> Measurement:
        windows, needles = self._counts(fidelity)
        key = (lossy_key(pipeline), fidelity)
        known = self._quality.get(key) if self.reuse_quality else None
        began = time.perf_counter()
        if known is None:
            result = self.evaluator.evaluate(pipeline, windows=windows, needles=needles, speed=True)
            measurement = Measurement.from_eval(result, fidelity)
            self._quality[key] = measurement
            self.evaluations += 1
            return measurement
        caches = [w.cache for w in self.evaluator.windows(windows)]
        shape = self.evaluator.shape
        expect = {"n_layers": shape["n_layers"], "kv_heads": shape["kv_heads"], "head_dim": shape["head_dim"]}
        ratio, encode_bps, decode_bps = measure_codec(pipeline, caches, expect=expect)
        self.codec_only += 1
        return Measurement(
            ratio=ratio, ppl_increase=known.ppl_increase, retrieval_drop=known.retrieval_drop,
            encode_bps=encode_bps, decode_bps=decode_bps, key_error=known.key_error, value_error=known.value_error,
            fidelity=fidelity, windows=known.windows, needles=known.needles, seconds=time.perf_counter() - began,
            ppl_base=known.ppl_base, retrieval_base=known.retrieval_base, quality_reused=True,
        )  # fmt: skip
