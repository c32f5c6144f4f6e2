"""The front end's :class:`~tensorwire.serve.http.backend.Backend` over the workers.

Each request opens one authenticated connection to the prefill worker, sends
``{"type": "generate", ...}`` and turns what comes back into the backend's events:
``kv_sent`` into :class:`Prefilled`, each ``token`` into :class:`Tokens`, ``done`` into
:class:`Finished`. Closing the event stream early closes the connection, which ends the
request's work on the workers (they see the peer go and stop).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

from ...errors import BackendError, BackendUnavailable, TensorwireError
from ..http.backend import BackendHealth, Finished, GenerationEvent, GenerationRequest, HFTokenizer, Prefilled, Tokens
from ..protocol import json_safe
from ..transport import connect

__all__ = ["WorkerBackend"]


class WorkerBackend:
    """Requests go to the prefill worker at ``host:port``; ``profiles`` are the names a client may force."""

    def __init__(self, tokenizer: Any, host: str, port: int, *, secret: bytes, profiles: Collection[str] = (),
                 read_timeout: float = 120.0):  # fmt: skip
        self._tokenizer = HFTokenizer(tokenizer)
        self.host, self.port = host, port
        self._secret = secret
        self._profiles = tuple(profiles)
        self.read_timeout = read_timeout

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def profiles(self) -> Collection[str]:
        return self._profiles

    async def _connect(self):
        try:
            return await connect(self.host, self.port, secret=self._secret, read_timeout=self.read_timeout)
        except (OSError, TensorwireError) as exc:
            raise BackendUnavailable(f"the prefill worker at {self.host}:{self.port} cannot be reached: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        conn = await self._connect()
        try:
            kv = request.kv
            await conn.send_message({
                "type": "generate", "id": request.request_id, "prompt_ids": list(request.prompt_token_ids),
                "tenant": request.tenant,
                "sampling": request.sampling.to_dict(),
                "control": {"compression": kv.compression, "slo_s": json_safe(kv.slo_s),
                            "max_ppl_increase": json_safe(kv.max_ppl_increase),
                            "max_retrieval_drop": json_safe(kv.max_retrieval_drop), "workload": kv.workload,
                            "policy": kv.policy, "pool": {"fetch": kv.pool_fetch, "store": kv.pool_store}},
            })  # fmt: skip
            while True:
                message = await conn.recv_message()
                kind = message.get("type")
                if kind == "token":
                    yield Tokens((int(message["token"]),))
                elif kind == "kv_sent":
                    decision = message.get("decision") or {}
                    # What the cache went through, which is not the decision's choice after a
                    # raw resend (None: it did not move); a prefill worker without the field: the choice.
                    profile = message["profile"] if "profile" in message else decision.get("choice")
                    pool = message.get("pool")
                    yield Prefilled(profile, decision, int(message.get("kv_bytes_raw") or 0),
                                    int(message.get("kv_bytes_sent") or 0), message.get("timings", {}),
                                    pool if isinstance(pool, dict) else None)  # fmt: skip
                elif kind == "done":
                    yield Finished(message.get("finish_reason", "stop"), {"attempts": message.get("attempts", [])})
                    return
                else:
                    raise BackendError(f"the prefill worker failed the request: {message.get('message', message)}")
        finally:
            await conn.close()

    async def health(self) -> BackendHealth:
        try:
            conn = await self._connect()
            try:
                await conn.send_message({"type": "health"})
                state = await conn.recv_message(timeout=5.0)
            finally:
                await conn.close()
        except (OSError, TensorwireError) as exc:
            return BackendHealth(ready=False, workers={"prefill": {"up": False}}, detail=str(exc))
        workers: dict[str, dict[str, Any]] = {"prefill": {"up": True, "in_flight": state.get("in_flight"),
                                                          "pool_stores": state.get("pool_stores")}}  # fmt: skip
        for peer in state.get("peers", []):
            workers[f"decode {peer['host']}:{peer['port']}"] = {"up": peer.get("failures", 0) == 0, **peer}
        return BackendHealth(ready=True, workers=workers)
