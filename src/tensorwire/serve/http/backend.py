"""The interface between the HTTP front end and the serving system: :class:`Backend`.

The front end (:func:`tensorwire.serve.http.create_app`) parses and validates OpenAI
requests, tokenizes them, detokenizes the output, applies stop strings, streams, counts
and reports. Everything else is the backend's: it turns a :class:`GenerationRequest` (the
prompt as token ids, the sampling parameters, the request's KV options) into a stream of
:class:`GenerationEvent`. The in-process :class:`~tensorwire.serve.http.local.LocalBackend`
implements it with SmolLM2; the prefill/decode workers implement it over the wire.

This module needs no optional dependency (no FastAPI, no torch): a worker can import it
alone.

What a backend implements
-------------------------
``tokenizer`` (property) -> :class:`Tokenizer`
    What the front end counts, encodes, decodes and applies the chat template with. It must
    be the model's tokenizer; :class:`HFTokenizer` adapts a transformers tokenizer.
``profiles`` (property) -> ``Collection[str]``
    The profile names a client may force with ``"tensorwire": {"compression": NAME}``
    (besides ``"auto"`` and ``"raw"``); empty when the backend has no profile library.
    The front end answers 400 for any other name, so the backend only ever sees these.
``generate(request)`` -> ``AsyncIterator[GenerationEvent]``
    Usually an ``async def`` generator. Events, in order:

    1. at most one :class:`Prefilled`, before the first token: what happened to the KV
       cache (the controller's decision, bytes raw and sent, prefill/transfer timings).
       The front end waits for the first event before it sends the response's headers
       (the ``x-tensorwire-profile`` header comes from it), so emit it as soon as the
       decode side holds the cache;
    2. any number of :class:`Tokens` (one or more new token ids each, in order);
    3. exactly one :class:`Finished`, last: ``"stop"`` when the model produced an
       end-of-sequence token (yield that token too, in the last :class:`Tokens`; the front
       end drops special tokens from the text), ``"length"`` after
       ``request.sampling.max_tokens`` tokens. Never more than ``max_tokens`` tokens.

    The front end may stop iterating at any time (a stop string matched, the client went
    away) and then closes the iterator (``aclose()``): the backend must release the
    request's resources in a ``finally`` (or on ``GeneratorExit``/``CancelledError``).
    Many ``generate`` calls run concurrently on one event loop: never block it (run model
    compute in a thread or another process). Raise :class:`~tensorwire.errors.BackendUnavailable`
    when the workers cannot take the request (the client gets a 503), anything else for a
    failure (500, or an error event mid-stream); the front end logs it and keeps serving.
``health()`` (async) -> :class:`BackendHealth`
    Cheap (called by ``GET /health``, e.g. every few seconds by a load balancer): whether
    requests can be served now and the state of each worker. It should not raise; if it
    does, the front end reports the backend as not ready.

Inputs are already validated: ``prompt_token_ids`` is non-empty and within the vocabulary,
``len(prompt_token_ids) + max_tokens <= max_context``, ``0 <= temperature <= 2``,
``0 <= top_p <= 1``, the KV options are in range (see :class:`KVOptions`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from ...control.context import RequestContext
from ..engine import SamplingParams  # one definition for the front end and the workers

__all__ = [
    "AUTO",
    "RAW",
    "Backend",
    "BackendHealth",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "HFTokenizer",
    "KVOptions",
    "Prefilled",
    "SamplingParams",
    "Tokenizer",
    "Tokens",
]

AUTO = "auto"  # compression chosen by the controller
RAW = "raw"  # the cache sent uncompressed (same string as tensorwire.kv.profiles.RAW)

FinishReason = Literal["stop", "length"]


# -- the request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVOptions:
    """The request's KV-cache options (the ``"tensorwire"`` object of the body, merged with
    the server's defaults).

    ``compression`` is ``"auto"`` (the controller chooses within the budget), ``"raw"``
    (send the cache uncompressed) or the name of one of the backend's ``profiles`` (use it
    unless the quality budget excludes it). ``slo_s`` is the latency objective for moving
    the cache (``inf``: none); ``max_ppl_increase`` the relative perplexity increase
    allowed (0.01 = +1 %) and ``max_retrieval_drop`` the retrieval accuracy points that
    may be lost (``inf``: no limit). ``workload`` is the controller's workload class.
    ``policy`` names the policy that decides (None: the backend's controller; a prefill
    worker also holds ``"kvserve-rule"``), for benchmarks that compare them. With a KV
    pool, ``pool_fetch`` is ``"auto"`` (fetch what beats prefilling), ``"always"`` or
    ``"never"``, and ``pool_store`` ``"auto"`` (the pool's controller picks the profile),
    ``"raw"``, a profile name or ``"none"``.
    """

    compression: str = AUTO
    slo_s: float = math.inf
    max_ppl_increase: float = math.inf
    max_retrieval_drop: float = math.inf
    workload: str = "default"
    policy: str | None = None
    pool_fetch: str = "auto"
    pool_store: str = "auto"

    def context(self, tokens: int, *, bandwidth_bps: float | None = None, request_id: int | None = None) -> RequestContext:
        """The controller's :class:`~tensorwire.control.context.RequestContext` for a cache of
        ``tokens`` tokens (the prefill side knows ``tokens``; a link speed if it knows one)."""
        return RequestContext(tokens=tokens, slo_s=self.slo_s, max_ppl_increase=self.max_ppl_increase,
                              max_retrieval_drop=self.max_retrieval_drop, workload=self.workload,
                              bandwidth_bps=bandwidth_bps, request_id=request_id)  # fmt: skip


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, as the backend sees it.

    ``request_id`` is unique per server (``cmpl-...`` / ``chatcmpl-...``, the response's
    ``id``); use it in logs and on the wire. ``prompt_token_ids`` is the whole prompt
    (chat requests: after the chat template, generation prompt included). ``tenant`` is
    the client's namespace in a KV pool (:func:`~tensorwire.serve.auth.tenant_tag` of its
    API key): one tenant's stored prefixes never serve another's.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    kv: KVOptions = field(default_factory=KVOptions)
    tenant: str = "anonymous"


# -- the events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prefilled:
    """The prompt is prefilled and its KV cache is where decoding runs.

    Parameters
    ----------
    profile : str or None
        What the cache went through: ``"raw"``, a profile name, or None when the cache did
        not move (plain local generation).
    decision : mapping or None
        The controller's decision, ``Decision.to_dict()`` (choice, reason, candidates, ...),
        shown to the client as is; None when no controller decided.
    kv_bytes_raw : int
        Bytes the cache would take on the wire uncompressed (0 when it did not move).
    kv_bytes_sent : int
        Bytes actually sent (the payload; ``kv_bytes_raw`` for raw; 0 when it did not move).
    timings : mapping of str to float
        Seconds spent in named phases (``queue_s``, ``prefill_s``, ``encode_s``,
        ``transfer_s``, ``decode_s``, ...); shown to the client as is.
    pool : mapping or None
        What the KV pool did (``hit_tokens``, ``decision``: ``"fetch"``, ``"recompute"`` or
        ``"miss"``, ``reason``, ``fetched_tokens``, ``fetched_bytes``, ``fetch_s``); None
        without a pool.
    """

    profile: str | None = None
    decision: Mapping[str, Any] | None = None
    kv_bytes_raw: int = 0
    kv_bytes_sent: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)
    pool: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Tokens:
    """New token ids, in order (one per decode step, or several at once)."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The last event: why generation ended, and the backend's timings for the decode phase."""

    finish_reason: FinishReason
    timings: Mapping[str, float] = field(default_factory=dict)


GenerationEvent = Prefilled | Tokens | Finished


@dataclass(frozen=True)
class BackendHealth:
    """The answer to ``health()``: ``ready`` when requests can be served now; ``workers``
    maps a worker's name to what is known about it (at least ``{"up": bool}``);
    ``detail`` says what is wrong when not ready."""

    ready: bool
    workers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    detail: str = ""


# -- the tokenizer -----------------------------------------------------------------------------------
@runtime_checkable
class Tokenizer(Protocol):
    """What the front end needs from the model's tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Token ids are ``0 <= id < vocab_size``."""

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id (the chat template's turn end for an instruct model)."""

    def encode(self, text: str) -> list[int]:
        """The prompt ``text`` as token ids, with the special tokens the model expects."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens (EOS and the like give "")."""

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat (``[{"role": ..., "content": ...}, ...]``) with the
        assistant's generation prompt appended."""


class HFTokenizer:
    """A transformers tokenizer as a :class:`Tokenizer` (SmolLM2's has a chat template)."""

    def __init__(self, tokenizer: Any):
        self.hf = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text).input_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        text = self.hf.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        return list(self.hf(text, add_special_tokens=False).input_ids)


# -- the backend ----------------------------------------------------------------------------------------
@runtime_checkable
class Backend(Protocol):
    """What the HTTP front end needs from the serving system (see the module docstring for
    the full contract)."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""

    @property
    def profiles(self) -> Collection[str]:
        """Profile names a request may force (``"tensorwire": {"compression": NAME}``)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Prefilled?, Tokens*, Finished; closed early by the front end when it stops reading."""

    async def health(self) -> BackendHealth:
        """Whether requests can be served now, and each worker's state."""
