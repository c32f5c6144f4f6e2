"""The decode worker: receives a request's KV cache layer by layer and generates from it.

One connection per request, from a prefill worker (docs/PROTOCOL.md, "Worker messages"):

1. ``{"type": "continue", "id", "last_token", "sampling", "skip"}``;
2. the KV transfer (header, bitmap, layers), each layer decoded while the next arrives;
3. the worker answers ``{"type": "kv_received", ...}`` with its decode timings, then one
   ``{"type": "token", "index", "token"}`` per new token (the first ``skip`` are computed
   but not sent: a retried request already delivered them), then ``{"type": "done", ...}``.

A transfer that fails its checks (a corrupt layer, a payload for another model) gets
``{"type": "error", "code": "bad_kv", ...}`` so that the sender can resend it raw; any
other failure ``{"type": "error", "code": "internal", ...}``. Neither stops the worker.

What runs concurrently: transfers and payload decoding of several requests; the model's
forward passes are queued one at a time (the :class:`~tensorwire.serve.engine.Engine`
lock), since on a CPU worker torch's own threads already use every core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..engine import Engine, SamplingParams
from ...errors import FormatError, TensorwireError
from ..transport.tcp import Connection

__all__ = ["DecodeWorker"]

log = logging.getLogger("tensorwire.serve.decode")


class DecodeWorker:
    """Serves ``continue`` requests on connections from prefill workers."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.in_flight = 0
        self.served = 0

    async def handle(self, conn: Connection) -> None:
        """One request on one authenticated connection."""
        request_id = None
        self.in_flight += 1
        try:
            message = await conn.recv_message()
            if message.get("type") != "continue":
                await conn.send_message({"type": "error", "code": "bad_request",
                                         "message": f"expected a 'continue' message, got {message.get('type')!r}"})  # fmt: skip
                return
            request_id = message.get("id")
            sampling = SamplingParams.from_dict(message.get("sampling", {}))
            skip = int(message.get("skip", 0))
            began = time.perf_counter()
            try:
                data, stats = await conn.recv_kv(expect=self.engine.expect)
            except FormatError as exc:
                await conn.send_message({"type": "error", "id": request_id, "code": "bad_kv",
                                         "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                return
            spans = stats.wire_intervals
            await conn.send_message({"type": "kv_received", "id": request_id, "seconds": time.perf_counter() - began,
                                     "wire_span_s": spans[-1][1] - spans[0][0] if spans else 0.0,
                                     "stats": stats.to_dict()})  # fmt: skip
            await self._generate(conn, request_id, data, int(message["last_token"]), sampling, skip)
            self.served += 1
        except (TensorwireError, KeyError, TypeError, ValueError) as exc:
            log.warning("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
            await _try_send(conn, {"type": "error", "id": request_id, "code": "internal",
                                   "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        finally:
            self.in_flight -= 1

    async def _generate(self, conn: Connection, request_id: Any, data, last_token: int, sampling: SamplingParams, skip: int) -> None:
        loop = asyncio.get_running_loop()
        tokens = self.engine.generate(data, last_token, sampling)
        began = time.perf_counter()
        index = 0
        while True:
            # Each forward pass runs in a thread: the event loop keeps serving other transfers.
            token = await loop.run_in_executor(None, next, tokens, None)
            if token is None:
                break
            if index >= skip:
                await conn.send_message({"type": "token", "id": request_id, "index": index, "token": token})
            index += 1
        await conn.send_message({"type": "done", "id": request_id, "tokens": index,
                                 "generate_s": time.perf_counter() - began})  # fmt: skip


async def _try_send(conn: Connection, message: dict[str, Any]) -> None:
    try:
        await conn.send_message(message)
    except (OSError, TensorwireError):  # the peer is gone: nothing left to tell it
        pass
