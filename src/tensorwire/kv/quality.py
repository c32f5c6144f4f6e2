"""Quality and speed of a KV pipeline on a real model and real text (``tensorwire kv eval``).

For a context length ``L``, an :class:`Evaluator` prepares, once per process:

* **perplexity windows**: ``windows`` stretches of ``L + continuation`` tokens spread over
  the text. The prefix's KV cache is compressed; the continuation is scored with the
  decoded cache and with the uncompressed one (same tokens, paired comparison).
* **retrieval cases** (needle in a haystack): ``needles`` contexts of ``L`` tokens from the
  text, each with one planted fact ``"The secret number of <name> is <5 digits>."`` at a
  random depth; the model is asked for the number and answers greedily from the
  compressed cache. A case is correct when the answer starts with the exact digits.
  The greedy answer is found in one forward pass where it can be: the uncompressed
  cache's greedy answer (generated token by token once) is fed after the question and
  kept as far as the compressed cache's own argmax agrees with it; from the first token
  where it departs, generation goes on token by token.
  Where the question sits is a setting (``question``):

  - ``"after"`` (default): the cache holds the context only and the question comes after
    compression, as when a stored context is reused by requests not yet known (a KV pool);
    a selector cannot know what will be asked.
  - ``"in_prompt"``: the prompt is context + question, prefilled and compressed whole (the
    question's last token is fed at decode), as in disaggregated serving where prefill and
    decode run on different machines and the cache crosses the network in between. The
    context is shortened by the question's length so that the cache still holds ``L`` tokens.

Both are prefilled with observation capture (for SnapKV) and kept in memory, so
evaluating a pipeline costs its encode/decode plus short continuations: this is the
objective the profiling engine calls many times.

Measured per pipeline: compression ratio versus the bf16 cache bytes, perplexity and its
relative increase, retrieval accuracy and its drop (points), relative reconstruction
error of the kept keys and values, and encode/decode throughput (bytes of the bf16 cache
per second, one thread, median over the windows after a warm-up).
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EvaluationError
from . import hf
from .pipeline import Pipeline
from .stage import KVCacheData

__all__ = ["EvalSettings", "EvalResult", "Evaluator"]

OBSERVE_WINDOW = 64  # queries captured per layer during prefill (SnapKV windows up to this)
# SmolLM2's tokenizer spells numbers digit by digit: " 77965" is 6 tokens, so the answer
# needs at least that many new tokens; 8 leaves room for a leading space or newline.
ANSWER_TOKENS = 8
QUESTION_PLACES = ("after", "in_prompt")  # see the module docstring
FIRST_NAMES = ("Mira", "Tobias", "Ilse", "Dario", "Nadia", "Oskar", "Leona", "Piet", "Sunniva", "Corwin",
               "Hale", "Ysolde", "Bram", "Odile", "Fenna", "Quillon", "Rasmus", "Tamsin", "Ulric", "Veda")  # fmt: skip
LAST_NAMES = ("Castellan", "Venn", "Marrow", "Quell", "Fenwick", "Lindqvist", "Ashdown", "Brantley", "Corvo",
              "Dunmore", "Eskildsen", "Farrow", "Galloway", "Holmqvist", "Ingram", "Jessop")  # fmt: skip


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate on; ``tensorwire kv eval`` and the profile search (``ProfileSettings.evaluation``).

    Parameters
    ----------
    text : str
        Any UTF-8 text file (e.g. WikiText-2 raw test).
    context : int
        Tokens whose KV cache is compressed (>= 16).
    continuation : int
        Tokens scored after the prefix (>= 2).
    windows : int
        Perplexity windows, spread evenly over the text (>= 1).
    needles : int
        Retrieval cases (>= 0).
    seed : int
        Draws the retrieval cases: names, numbers, haystacks and depths.
    question : {"after", "in_prompt"}
        Where the retrieval question sits (see the module docstring).
    """

    text: str
    context: int = 2048
    continuation: int = 128
    windows: int = 4
    needles: int = 50
    seed: int = 0
    question: str = "after"

    def __post_init__(self) -> None:
        if self.context < 16 or self.continuation < 2 or self.windows < 1 or self.needles < 0:
            raise EvaluationError(
                f"need context >= 16, continuation >= 2, windows >= 1, needles >= 0; got {self}"
            )
        if self.question not in QUESTION_PLACES:
            raise EvaluationError(f"question is {self.question!r}; expected one of {QUESTION_PLACES}")


@dataclass
class EvalResult:
    """Measurements of one pipeline (JSON-ready with :meth:`to_dict`)."""

    pipeline: dict[str, Any]
    ratio: float
    payload_bytes: float
    kv_bytes: int
    ppl_base: float
    ppl: float
    ppl_increase: float
    retrieval_base: float | None
    retrieval: float | None
    retrieval_drop: float | None
    key_error: float
    value_error: float
    encode_bps: float | None
    decode_bps: float | None
    windows: int
    needles: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Window:
    cache: KVCacheData
    continuation: np.ndarray  # token ids scored after the prefix
    base_nll: np.ndarray  # per continuation token, with the uncompressed cache


@dataclass
class _Needle:
    cache: KVCacheData
    question: list[int]
    answer: str
    base_tokens: list[int] = field(default_factory=list)  # the greedy answer from the uncompressed cache
    base_correct: bool = False


class Evaluator:
    """Evaluates pipelines on one model and one text; the uncompressed baselines are cached.

    Example
    -------
    >>> model, tokenizer = load_smollm2()                               # doctest: +SKIP
    >>> ev = Evaluator(model, tokenizer, EvalSettings("wikitext-2-raw-test.txt"))  # doctest: +SKIP
    >>> ev.evaluate(Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4}]}))  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, settings: EvalSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.shape = hf.model_shape(model)
        path = Path(settings.text)
        if not path.is_file():
            raise EvaluationError(f"text file {path} does not exist; pass a UTF-8 text file (e.g. WikiText-2 raw)")
        text = path.read_text(encoding="utf-8")
        self.text_id = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.tokens = np.asarray(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int64)
        need = settings.context + settings.continuation
        if self.tokens.size < need * 2:
            raise EvaluationError(f"the text has {self.tokens.size} tokens; need at least {need * 2} for context {settings.context}")
        self._windows: list[_Window] | None = None
        self._needles: list[_Needle] | None = None

    # -- baselines -----------------------------------------------------------------------
    def _prefill(self, ids) -> KVCacheData:
        cache, observations = hf.prefill(self.model, ids, observe_window=OBSERVE_WINDOW)
        return hf.cache_to_data(cache, observations)

    def _continuation_nll(self, data: KVCacheData, continuation: np.ndarray) -> np.ndarray:
        torch = hf._torch()
        out = hf.forward(self.model, hf.data_to_cache(data, reserve=len(continuation)), continuation)
        logits = out.logits[0, :-1].float()
        target = torch.as_tensor(continuation[1:])
        return torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy().astype(np.float64)

    def windows(self, count: int | None = None) -> list[_Window]:
        """The perplexity windows (prefilled on first use)."""
        s = self.settings
        if self._windows is None:
            span = s.context + s.continuation
            starts = np.linspace(0, self.tokens.size - span, s.windows).astype(np.int64)
            self._windows = []
            for start in starts:
                prefix = self.tokens[start : start + s.context]
                continuation = self.tokens[start + s.context : start + span]
                data = self._prefill(prefix)
                self._windows.append(_Window(data, continuation, self._continuation_nll(data, continuation)))
        return self._windows[: count or len(self._windows)]

    def needles(self, count: int | None = None) -> list[_Needle]:
        """The retrieval cases (built and prefilled on first use)."""
        s = self.settings
        if self._needles is None:
            rng = np.random.default_rng(s.seed + 1)
            tok = self.tokenizer
            self._needles = []
            for _ in range(s.needles):
                name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
                number = str(int(rng.integers(10000, 100000)))
                needle = tok(f" The secret number of {name} is {number}.", add_special_tokens=False).input_ids
                question = tok(f"\nWhat is the secret number of {name}? The secret number of {name} is",
                               add_special_tokens=False).input_ids  # fmt: skip
                asked = question[:-1] if s.question == "in_prompt" else []  # prefilled and compressed with the context
                start = int(rng.integers(0, self.tokens.size - s.context))
                hay = self.tokens[start : start + s.context - len(needle) - len(asked)].tolist()
                depth = int(rng.uniform(0.05, 0.9) * len(hay))
                prefix = np.asarray(hay[:depth] + needle + hay[depth:] + asked, dtype=np.int64)
                data = self._prefill(prefix)
                case = _Needle(data, question[len(asked) :], number)
                case.base_tokens = hf.generate(self.model, self._cache_for(data, case), case.question,
                                               max_new_tokens=ANSWER_TOKENS)  # fmt: skip
                case.base_correct = self._is_answer(case.base_tokens, case)
                self._needles.append(case)
        return self._needles[: s.needles if count is None else count]

    @staticmethod
    def _cache_for(data: KVCacheData, case: _Needle):
        return hf.data_to_cache(data, reserve=len(case.question) + ANSWER_TOKENS)

    def _is_answer(self, tokens: list[int], case: _Needle) -> bool:
        digits = re.match(r"\d+", self.tokenizer.decode(tokens).strip())
        return digits is not None and digits.group(0) == case.answer

    def _decided(self, tokens: list[int], case: _Needle) -> bool | None:
        """What :meth:`_is_answer` will say of any continuation of ``tokens``, or None if open."""
        text = self.tokenizer.decode(tokens).lstrip()
        digits = re.match(r"\d*", text).group(0)
        if not case.answer.startswith(digits):
            return False  # more tokens only add digits to a run that is already wrong
        if len(text) > len(digits):
            return digits == case.answer  # the run has ended
        return None

    def _answer(self, data: KVCacheData, case: _Needle) -> bool:
        """Whether the greedy answer from ``data`` is right (see the module docstring)."""
        cache = self._cache_for(data, case)
        base = case.base_tokens
        out = hf.forward(self.model, cache, case.question + base[:-1])
        predicted = out.logits[0, len(case.question) - 1 :].argmax(-1).tolist()
        agree = next((i for i, (p, b) in enumerate(zip(predicted, base)) if p != b), len(base))
        if agree == len(base):
            return case.base_correct
        surplus = len(base) - 1 - agree  # fed tokens after the first departure: not this cache's answer
        if surplus:
            for layer in cache.layers:
                layer.crop(-surplus)
            cache.seq_len -= surplus
        tokens = base[:agree] + [predicted[agree]]
        while (decided := self._decided(tokens, case)) is None and len(tokens) < ANSWER_TOKENS:
            tokens.append(int(hf.forward(self.model, cache, tokens[-1:]).logits[0, -1].argmax()))
        return self._is_answer(tokens, case) if decided is None else decided

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(
        self, pipeline: Pipeline, windows: int | None = None, needles: int | None = None, speed: bool = True
    ) -> EvalResult:
        """Measure ``pipeline``; ``windows``/``needles`` evaluate on the first few only (cheap pass)."""
        from ..codec.cpu import one_thread

        began = time.perf_counter()
        win = self.windows(windows)
        cases = self.needles(needles)
        with one_thread():
            if speed:  # warm-up: numba compiles on first use; never time that
                Pipeline.decode_data(pipeline.encode(win[0].cache))
            sizes, enc_t, dec_t, k_err, v_err, nll_base, nll = [], [], [], [], [], [], []
            for w in win:
                size, decoded, t_enc, t_dec = self._roundtrip(pipeline, w.cache)
                sizes.append(size)
                enc_t.append(t_enc)
                dec_t.append(t_dec)
                ke, ve = reconstruction_error(w.cache, decoded)
                k_err.append(ke)
                v_err.append(ve)
                nll.append(self._continuation_nll(decoded, w.continuation))
                nll_base.append(w.base_nll)
            correct = base_correct = 0
            for case in cases:
                decoded = Pipeline.decode_data(pipeline.encode(case.cache), expect=self._expect())
                correct += self._answer(decoded, case)
                base_correct += case.base_correct
        kv_bytes = win[0].cache.nbytes(2)
        ppl_base = math.exp(float(np.mean(np.concatenate(nll_base))))
        ppl = math.exp(float(np.mean(np.concatenate(nll))))
        n_cases = len(cases)
        retrieval_base = 100.0 * base_correct / n_cases if n_cases else None
        retrieval = 100.0 * correct / n_cases if n_cases else None
        payload_bytes = float(np.mean(sizes))
        return EvalResult(
            pipeline=pipeline.to_config(),
            ratio=kv_bytes / payload_bytes,
            payload_bytes=payload_bytes,
            kv_bytes=kv_bytes,
            ppl_base=ppl_base,
            ppl=ppl,
            ppl_increase=ppl / ppl_base - 1.0,
            retrieval_base=retrieval_base,
            retrieval=retrieval,
            retrieval_drop=None if retrieval is None else retrieval_base - retrieval,
            key_error=float(np.mean(k_err)),
            value_error=float(np.mean(v_err)),
            encode_bps=kv_bytes / statistics.median(enc_t) if speed else None,
            decode_bps=kv_bytes / statistics.median(dec_t) if speed else None,
            windows=len(win),
            needles=n_cases,
            seconds=time.perf_counter() - began,
            extra={"context": self.settings.context, "continuation": self.settings.continuation, "text": self.text_id},
        )

    def codec_speed(self, pipeline: Pipeline, windows: int | None = None) -> tuple[float, float]:
        """Encode and decode KV bytes/s on one core, timed exactly as :meth:`evaluate` does
        (warm-up, then the median over the windows), without the model: to re-time
        configurations measured under other conditions."""
        from ..codec.cpu import one_thread

        win = self.windows(windows)
        with one_thread():
            Pipeline.decode_data(pipeline.encode(win[0].cache))
            times = [self._roundtrip(pipeline, w.cache)[2:] for w in win]
        kv_bytes = win[0].cache.nbytes(2)
        return kv_bytes / statistics.median(t[0] for t in times), kv_bytes / statistics.median(t[1] for t in times)

    def _roundtrip(self, pipeline: Pipeline, cache: KVCacheData) -> tuple[int, KVCacheData, float, float]:
        """Payload size, decoded cache, encode seconds, decode seconds."""
        t0 = time.perf_counter()
        payload = pipeline.encode(cache)
        t1 = time.perf_counter()
        decoded = Pipeline.decode_data(payload, expect=self._expect())
        return len(payload), decoded, t1 - t0, time.perf_counter() - t1

    def _expect(self) -> dict[str, int]:
        return {"n_layers": self.shape["n_layers"], "kv_heads": self.shape["kv_heads"], "head_dim": self.shape["head_dim"]}


def reconstruction_error(original: KVCacheData, decoded: KVCacheData) -> tuple[float, float]:
    """Relative L2 error of the kept keys and values (evicted tokens are not counted here)."""
    num_k = den_k = num_v = den_v = 0.0
    for ref, got in zip(original.layers, decoded.layers):
        if got.keys.shape[2] == ref.keys.shape[2]:  # every position kept (kept tokens are in order)
            k, v = ref.keys, ref.values
        else:  # the original cache holds every position, in order
            take = got.positions[..., None]
            k = np.take_along_axis(ref.keys, take, axis=2)
            v = np.take_along_axis(ref.values, take, axis=2)
        num_k += float(np.sum((got.keys - k) ** 2))
        den_k += float(np.sum(k.astype(np.float64) ** 2))
        num_v += float(np.sum((got.values - v) ** 2))
        den_v += float(np.sum(v.astype(np.float64) ** 2))
    return math.sqrt(num_k / max(den_k, 1e-30)), math.sqrt(num_v / max(den_v, 1e-30))
