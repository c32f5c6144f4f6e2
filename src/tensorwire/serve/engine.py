"""The model side of a worker: prefill a prompt into a KV cache, and generate from a cache.

Disaggregated serving splits one generation in two. The prefill worker runs the prompt
*except its last token* (:meth:`Engine.prefill`) and ships that cache; the decode worker
feeds the last prompt token after the received cache and samples every new token
(:meth:`Engine.generate`). So all tokens come from the decode side, and the first one
waits for the KV transfer, which is what compression shortens. Local (non-disaggregated)
generation is the same two calls in one process: the reference an answer is checked
against.

Sampling is greedy at temperature 0, otherwise temperature and nucleus (top-p) sampling
with a torch generator seeded per request, so a seeded request gives the same tokens on
any worker: a request retried elsewhere can skip the tokens it already sent.

Example
-------
>>> engine = Engine.load()                                                  # doctest: +SKIP
>>> data = engine.prefill(prompt_ids, observe_window=64)                    # doctest: +SKIP
>>> list(engine.generate(data, prompt_ids[-1], SamplingParams(max_tokens=16, temperature=0)))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvaluationError, require
from ..kv import hf
from ..kv.stage import KVCacheData
from ..models import SMOLLM2_NAME, load_smollm2

__all__ = ["Engine", "SamplingParams", "sample_token"]

GREEDY_BELOW = 1e-6  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    ``temperature == 0`` is greedy decoding (argmax; ``top_p`` and ``seed`` are then
    irrelevant). Otherwise sample from ``softmax(logits / temperature)`` restricted to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (the top token
    is always kept, so ``top_p == 0`` is greedy too). ``seed`` (any int; None: fresh
    randomness) makes sampling reproducible for the same prompt and parameters, on any
    worker. Generation stops after ``max_tokens``, or at end-of-sequence or one of
    ``stop_token_ids``.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EvaluationError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        for name, value, high in (("temperature", self.temperature, math.inf), ("top_p", self.top_p, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise EvaluationError(f"{name} must be a number in [0, {high}], got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EvaluationError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        # Below 1e-6, logits / temperature overflows float32 to inf: that is argmax anyway.
        return self.temperature < GREEDY_BELOW or self.top_p == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop_token_ids": list(self.stop_token_ids)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> SamplingParams:
        """Inverse of :meth:`to_dict` (the settings as they travel between workers)."""
        try:
            return cls(data["max_tokens"], data.get("temperature", 1.0), data.get("top_p", 1.0), data.get("seed"),
                       tuple(data.get("stop_token_ids", ())))  # fmt: skip
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, EvaluationError):
                raise
            raise EvaluationError(f"bad sampling settings {data!r}: {exc}") from exc


def sample_token(logits: Any, sampling: SamplingParams, generator: Any) -> int:
    """The next token from a ``(vocab,)`` logits tensor: argmax when greedy, else nucleus
    sampling from ``softmax(logits / temperature)`` with ``generator``."""
    torch = require("torch")
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.to(torch.float32) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = torch.where(before < sampling.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        sorted_probs[0] = sorted_probs[0].clamp_min(1e-30)  # the top token is always kept
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """A causal LM and its tokenizer, driven one request at a time per thread.

    torch runs the model; calls from several threads are serialised by a lock, since a
    2-core worker gains nothing from running two forwards at once and torch's own
    threads already use the cores.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = SMOLLM2_NAME):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.shape = hf.model_shape(model)
        self.eos_token_id = tokenizer.eos_token_id
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None) -> Engine:
        """A causal LM from a model folder, float32 on CPU (default: the offline SmolLM2-135M-Instruct).

        A folder of ``*.twz`` shards (``tensorwire compress``) is decoded by
        :func:`tensorwire.integrations.transformers.from_pretrained`: chunk by chunk while
        the next is read, into the parameters' own memory; any other folder goes to
        transformers. The tokenizer comes from the folder.
        """
        if folder is None:
            model, tokenizer = load_smollm2()
            return cls(model, tokenizer)
        transformers = require("transformers")
        torch = require("torch")
        if any(Path(folder).glob("*.twz")):
            from ..integrations.transformers import from_pretrained

            model = from_pretrained(folder, "AutoModelForCausalLM").float()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cls(model, transformers.AutoTokenizer.from_pretrained(folder), name=Path(folder).name)

    @property
    def expect(self) -> dict[str, int]:
        """The cache a payload for this model may hold (``Pipeline.decode_data(expect=...)``): its
        shape, one sequence, at most the model's context."""
        return {**{k: self.shape[k] for k in ("n_layers", "kv_heads", "head_dim")}, "max_batch": 1,
                "max_seq_len": self.max_context}  # fmt: skip

    def prefill(self, prompt_ids: Sequence[int], observe_window: int = 0, prefix: KVCacheData | None = None) -> KVCacheData:
        """The cache of ``prompt_ids[:-1]`` (and its last queries, for SnapKV-style selectors).

        ``prefix``: the cache of the prompt's first ``prefix.seq_len`` tokens (from a KV
        pool); only the rest is run, at the positions after it. A one-token prompt has an
        empty cache (no layers, ``seq_len`` 0).
        """
        if len(prompt_ids) < 1:
            raise EvaluationError("a prompt needs at least one token")
        start = prefix.seq_len if prefix is not None and prefix.layers else 0
        if start > len(prompt_ids) - 1:
            raise EvaluationError(f"a prefix of {start} tokens is longer than the {len(prompt_ids) - 1} tokens to cache")
        if len(prompt_ids) == 1:
            return KVCacheData([], seq_len=0)
        if start == len(prompt_ids) - 1:
            return prefix  # nothing left to run (and no queries to observe)
        with self._lock:
            cache = hf.data_to_cache(prefix) if start else None
            cache, observations = hf.prefill(self.model, list(prompt_ids[start:-1]), observe_window=observe_window,
                                             cache=cache)  # fmt: skip
            return hf.cache_to_data(cache, observations)

    def generate(self, data: KVCacheData, last_token: int, sampling: SamplingParams,
                 prefix: Sequence[int] = ()) -> Iterator[int]:  # fmt: skip
        """New tokens after ``data`` (a cache, possibly evicted or quantized) and ``last_token``.

        ``prefix`` holds tokens already delivered for this request (by a worker that then
        failed): they are fed after ``last_token`` and not yielded again, so the rest of
        the answer continues what the client has. Stops after ``sampling.max_tokens`` in
        all, or after an end-of-sequence or stop token (which is yielded too, so the
        caller can tell why it stopped). Each step takes the model lock, so requests in
        several threads interleave token by token.
        """
        torch = require("torch")
        generator = None
        if not sampling.greedy:
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed % 2**64)
        stops = {*sampling.stop_token_ids, *([self.eos_token_id] if self.eos_token_id is not None else [])}
        with self._lock:
            cache = hf.data_to_cache(data, reserve=sampling.max_tokens + 1)
        feed = [int(last_token), *(int(t) for t in prefix)]
        if prefix and int(prefix[-1]) in stops:
            return  # the delivered part already ended the answer
        for _ in range(sampling.max_tokens - len(prefix)):
            with self._lock:
                logits = hf.forward(self.model, cache, feed).logits[0, -1]
                if not bool(torch.isfinite(logits).all()):
                    raise FloatingPointError("the model produced non-finite logits")
                token = sample_token(logits, sampling, generator)
            yield token
            if token in stops:
                return
            feed = [token]

    def warm_up(self) -> None:
        """One short prefill and decode, so that the first request runs at steady-state speed."""
        ids = self.tokenizer("tensorwire warms up the model before the first request.").input_ids
        list(self.generate(self.prefill(ids), ids[-1], SamplingParams(max_tokens=2, temperature=0)))
