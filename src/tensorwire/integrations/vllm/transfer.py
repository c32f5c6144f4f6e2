"""Prefill instance -> decode instance: the KV of a prompt over tensorwire's transport, pulled.

The prefill instance's worker keeps each finished prompt's cache in an :class:`Outbox`: a
tensorwire transport server (authenticated, checksummed frames, docs/PROTOCOL.md) on a
thread of its own. The decode instance's worker :func:`pull`\\ s it by request id when vLLM
schedules the request there; the outbox's controller picks the profile for that transfer
from the link speed it learned from earlier ones and the request's quality budget (raw is a
candidate), and streams it layer by layer, encoding layer ``i + 1`` while layer ``i`` is on
the wire. The puller answers with its receive timings, which the controller learns from.

Messages (JSON frames on one connection per transfer): ``{"type": "pull", "id"}`` →
the KV transfer (PROTOCOL.md section 8) or ``{"type": "error", "message"}`` →
``{"type": "kv_received", "wire_s", "seconds"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from ...control import Controller, RequestContext
from ...kv.pipeline import Pipeline
from ...kv.presets import PRESETS
from ...kv.profiles import ProfileLibrary
from ...kv.stage import KVCacheData
from ...serve.transport import connect, start_server
from ...serve.transport.shaping import TokenBucket

__all__ = ["Outbox", "pull"]

log = logging.getLogger("tensorwire.vllm")

FIXED = {"raw": PRESETS["bf16"], "lossless": PRESETS["lossless"]}  # "raw": the bf16 cache; "lossless": bit-exact


class Outbox:
    """Caches waiting for their decode instance, served by a transport server on its own thread.

    Parameters
    ----------
    library : ProfileLibrary
        What the controller may pick from (raw is always a candidate).
    host, port : str, int
        Where to listen (the decode instances connect here).
    secret : bytes
        The deployment's shared secret (the handshake's).
    rate_bps : float, optional
        Emulate a link of this many bytes/s (a sender-side token bucket); None: unshaped.
    ttl_s : float
        A cache nobody pulled in this long is dropped (its decode instance then recomputes).
    """

    def __init__(self, library: ProfileLibrary, *, host: str, port: int, secret: bytes, rate_bps: float | None = None,
                 initial_bandwidth_bps: float = 1e9, ttl_s: float = 120.0, wait_s: float = 30.0):  # fmt: skip
        self.library = library
        self.controller = Controller(library, initial_bandwidth_bps=initial_bandwidth_bps if rate_bps is None else rate_bps)
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self._items: dict[str, tuple[KVCacheData, tuple[float, float], str, float]] = {}
        self._pulled: dict[str, None] = {}  # recently pulled ids (bounded): a second pull is refused at once
        self._ready = threading.Condition()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._error: BaseException | None = None

        async def serve() -> None:
            options: dict[str, Any] = {"shaper": TokenBucket(rate_bps)} if rate_bps else {}
            try:
                self._server = await start_server(self._handle, secret=secret, host=host, port=port, **options)
            except BaseException as exc:
                self._error = exc
            finally:
                started.set()

        self._thread = threading.Thread(target=self._run, args=(serve,), name="tensorwire-outbox", daemon=True)
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise self._error
        self.host, self.port = self._server.host, self._server.port
        self.transfers: list[dict[str, Any]] = []  # what each transfer chose and measured (newest last, bounded)

    def _run(self, serve) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def put(self, request_id: str, data: KVCacheData, budget: tuple[float, float] = (math.inf, math.inf),
            compression: str = "auto") -> None:  # fmt: skip
        """Keep ``data`` for ``request_id``; ``compression``: ``"auto"`` (the controller picks within
        ``budget``), ``"raw"`` (bf16), ``"lossless"`` (bit-exact) or a profile of the library."""
        if compression not in ("auto", *FIXED) and compression not in self.library.names:
            raise ValueError(f"compression {compression!r} is not auto, raw, lossless or a profile of the library")
        now = time.monotonic()
        with self._ready:
            for stale in [k for k, item in self._items.items() if now - item[-1] > self.ttl_s]:
                del self._items[stale]
            self._items[request_id] = (data, budget, compression, now)
            self._ready.notify_all()

    def _take(self, request_id: str) -> tuple[KVCacheData, tuple[float, float], str] | None:
        """The cache of ``request_id``, waiting a while for a save still in flight."""
        with self._ready:
            self._ready.wait_for(lambda: request_id in self._items or request_id in self._pulled, timeout=self.wait_s)
            item = self._items.pop(request_id, None)
            if item is not None:
                self._pulled[request_id] = None
                while len(self._pulled) > 10_000:
                    del self._pulled[next(iter(self._pulled))]
        return None if item is None else item[:3]

    async def _handle(self, conn) -> None:
        message = await conn.recv_message()
        request_id = str(message.get("id"))
        if message.get("type") != "pull":
            await conn.send_message({"type": "error", "message": f"expected a pull, got {message.get('type')!r}"})
            return
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(None, self._take, request_id)
        if item is None:
            await conn.send_message({"type": "error", "message": f"no KV cache for request {request_id!r} (pulled already, "
                                                                 "expired or never saved)"})  # fmt: skip
            return
        data, (max_ppl, max_retrieval), compression = item
        decision = self.controller.choose(RequestContext(kv_bytes=data.nbytes(2), max_ppl_increase=max_ppl,
                                                         max_retrieval_drop=max_retrieval))  # fmt: skip
        profile = decision.choice if compression == "auto" else compression
        config = FIXED.get(profile) or (FIXED["raw"] if decision.is_raw and compression == "auto" else
                                        self.library[profile].pipeline)  # fmt: skip
        await conn.send_message({"type": "kv", "id": request_id, "profile": profile})
        began = time.perf_counter()
        stream = await loop.run_in_executor(None, Pipeline.from_config(config).encode_stream, data)
        stats = await conn.send_kv(request_id, stream)
        reply = await conn.recv_message()
        latency = time.perf_counter() - began
        wire_s = reply.get("wire_s") or stats.wire_s
        if profile == decision.choice:  # a forced profile's transfer says nothing about the controller's choice
            self.controller.observe(decision, observed_latency=latency, bytes_sent=stats.wire_bytes, transfer_time=wire_s)
        self.transfers = [*self.transfers[-99:], {"id": request_id, "profile": profile, "reason": decision.reason,
                                                  "kv_bytes_raw": data.nbytes(2), "kv_bytes_sent": stats.wire_bytes,
                                                  "seconds": latency, "wire_s": wire_s}]  # fmt: skip
        log.info("transfer %s", json.dumps(self.transfers[-1]))  # one JSON object a line: benchmarks read it

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def pull(transfer: Mapping[str, Any], *, secret: bytes, expect: Mapping[str, int], timeout_s: float = 60.0) -> KVCacheData:
    """The cache a prefill instance's :class:`Outbox` holds for ``transfer["id"]`` (blocking; call it in a thread)."""

    async def run() -> KVCacheData:
        conn = await connect(str(transfer["host"]), int(transfer["port"]), secret=secret, read_timeout=timeout_s,
                             write_timeout=timeout_s)  # fmt: skip
        try:
            await conn.send_message({"type": "pull", "id": transfer["id"]})
            answer = await conn.recv_message()
            if answer.get("type") != "kv":
                raise ConnectionError(f"the prefill instance answered {answer.get('message') or answer!r}")
            began = time.perf_counter()
            data, stats = await conn.recv_kv(expect=dict(expect), request_id=str(transfer["id"]))
            await conn.send_message({"type": "kv_received", "id": transfer["id"], "wire_s": stats.wire_s,
                                     "seconds": time.perf_counter() - began})  # fmt: skip
            return data
        finally:
            await conn.close()

    return asyncio.run(asyncio.wait_for(run(), timeout_s))
