"""The decode worker: receives a request's KV cache layer by layer and generates from it.

One connection per request, from a prefill worker (docs/PROTOCOL.md, "Worker messages"):

1. ``{"type": "continue", "id", "last_token", "sampling", "prefix"}``;
2. the KV transfer (header, bitmap, layers), each layer decoded while the next arrives;
3. the worker answers ``{"type": "kv_received", ...}`` with its decode timings, then one
   ``{"type": "token", "index", "token"}`` per new token, then ``{"type": "done", ...}``.
   ``prefix`` holds tokens a failed worker already delivered for this request: they are
   fed after ``last_token``, and indexes continue after them.

A transfer that fails its checks (a corrupt layer, a payload for another model) is
refused by the transport with an ERROR frame whose code says why, so that the sender can
resend it raw; a bad request gets ``{"type": "error", "code": "bad_request", ...}``, any
other failure ``"internal"``. None of them stops the worker.

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
from ...errors import TensorwireError
from ..transport.tcp import Connection
from . import try_send

__all__ = ["DecodeWorker"]

log = logging.getLogger("tensorwire.serve.decode")


class DecodeWorker:
    """Serves ``continue`` requests on connections from prefill workers."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.in_flight = 0

    async def handle(self, conn: Connection) -> None:
        """One request on one authenticated connection."""
        request_id = None
        self.in_flight += 1
        try:
            message = await conn.recv_message()
            if message.get("type") != "continue":
                raise ValueError(f"expected a 'continue' message, got {message.get('type')!r}")
            request_id = message.get("id")
            sampling = SamplingParams.from_dict(message.get("sampling", {}))
            prefix = [int(t) for t in message.get("prefix", ())]
            last_token = int(message["last_token"])
        except (TensorwireError, KeyError, TypeError, ValueError) as exc:
            self.in_flight -= 1
            await try_send(conn, {"type": "error", "id": request_id, "code": "bad_request",
                                   "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
            return
        try:
            began = time.perf_counter()
            # A damaged or foreign payload: recv_kv answers with an ERROR frame and raises.
            data, stats = await conn.recv_kv(expect=self.engine.expect, request_id=request_id)
            spans = stats.wire_intervals
            await conn.send_message({"type": "kv_received", "id": request_id, "seconds": time.perf_counter() - began,
                                     "wire_span_s": spans[-1][1] - spans[0][0] if spans else 0.0,
                                     "stats": stats.to_dict()})  # fmt: skip
            await self._generate(conn, request_id, data, last_token, sampling, prefix)
        except (TensorwireError, OSError) as exc:
            log.warning("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
        except Exception as exc:  # a bug or the model failing: the worker goes on serving
            log.exception("request %s failed", request_id)
            await try_send(conn, {"type": "error", "id": request_id, "code": "internal",
                                   "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        finally:
            self.in_flight -= 1

    async def _generate(self, conn: Connection, request_id: Any, data, last_token: int, sampling: SamplingParams,
                        prefix: list[int]) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        tokens = self.engine.generate(data, last_token, sampling, prefix)
        began = time.perf_counter()
        index = len(prefix)
        while True:
            # Each forward pass runs in a thread: the event loop keeps serving other transfers.
            token = await loop.run_in_executor(None, next, tokens, None)
            if token is None:
                break
            await conn.send_message({"type": "token", "id": request_id, "index": index, "token": token})
            index += 1
        await conn.send_message({"type": "done", "id": request_id, "tokens": index,
                                 "generate_s": time.perf_counter() - began})  # fmt: skip
