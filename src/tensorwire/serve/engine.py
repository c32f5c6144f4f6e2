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
>>> list(engine.generate(data, prompt_ids[-1], Sampling(max_tokens=16)))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EvaluationError, require
from ..kv import hf
from ..kv.stage import KVCacheData
from ..models import SMOLLM2_NAME, load_smollm2

__all__ = ["Engine", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How to pick new tokens. ``temperature == 0``: greedy (``top_p`` and ``seed`` unused)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EvaluationError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise EvaluationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise EvaluationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop_token_ids": list(self.stop_token_ids)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sampling:
        try:
            return cls(int(data["max_tokens"]), float(data.get("temperature", 0.0)), float(data.get("top_p", 1.0)),
                       data.get("seed"), tuple(data.get("stop_token_ids", ())))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise EvaluationError(f"bad sampling settings {data!r}: {exc}") from exc


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
    def load(cls) -> Engine:
        """The offline SmolLM2-135M-Instruct (float32 on CPU)."""
        model, tokenizer = load_smollm2()
        return cls(model, tokenizer)

    @property
    def expect(self) -> dict[str, int]:
        """The cache shape a payload for this model must have (``Pipeline.decode_data(expect=...)``)."""
        return {k: self.shape[k] for k in ("n_layers", "kv_heads", "head_dim")}

    def prefill(self, prompt_ids: Sequence[int], observe_window: int = 0) -> KVCacheData:
        """The cache of ``prompt_ids[:-1]`` (and its last queries, for SnapKV-style selectors)."""
        if len(prompt_ids) < 2:
            raise EvaluationError(f"a prompt needs at least 2 tokens to split into cache + last token, got {len(prompt_ids)}")
        with self._lock:
            cache, observations = hf.prefill(self.model, list(prompt_ids[:-1]), observe_window=observe_window)
            return hf.cache_to_data(cache, observations)

    def generate(self, data: KVCacheData, last_token: int, sampling: Sampling) -> Iterator[int]:
        """New tokens after ``data`` (a cache, possibly evicted or quantized) and ``last_token``.

        Stops after ``sampling.max_tokens``, or after an end-of-sequence or stop token
        (which is yielded too, so the caller can tell why it stopped).
        """
        torch = require("torch")
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else 0)
        stops = {*sampling.stop_token_ids, *([self.eos_token_id] if self.eos_token_id is not None else [])}
        with self._lock:
            cache = hf.data_to_cache(data)
            out = hf.forward(self.model, cache, [int(last_token)])
        for step in range(sampling.max_tokens):
            token = _pick(torch, out.logits[0, -1], sampling, generator)
            yield token
            if token in stops or step == sampling.max_tokens - 1:
                return
            with self._lock:
                out = hf.forward(self.model, cache, [token])

    def warm_up(self) -> None:
        """One short prefill and decode, so that the first request runs at steady-state speed."""
        ids = self.tokenizer("tensorwire warms up the model before the first request.").input_ids
        list(self.generate(self.prefill(ids), ids[-1], Sampling(max_tokens=2)))


def _pick(torch: Any, logits: Any, sampling: Sampling, generator: Any) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < sampling.top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
