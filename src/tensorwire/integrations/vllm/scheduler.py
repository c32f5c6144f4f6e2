"""The connector's scheduler side: which tokens of a request come from tensorwire, and what to save.

It runs in vLLM's EngineCore process, on the scheduler's thread, and must never wait on
the network there. A request's pool lookup (one Redis round trip) runs in a thread: until
it has answered, :meth:`SchedulerSide.matched` says "ask again" (vLLM then skips the
request for that step); then the fetch-or-recompute plan (:func:`~tensorwire.serve.pool.
decide.plan_fetch`, from the pool bandwidth and prefill speed the worker measured) says how
many stored tokens to load. A request whose KV was sent by a prefill instance (its
``kv_transfer_params`` name a tensorwire transfer) loads that, asynchronously: the worker
pulls it while vLLM schedules other requests.

Per step, :meth:`build` turns what was decided into :class:`ConnectorMetadata` for the
worker: loads (the pool blocks or the transfer, the vLLM blocks to fill) and saves (a
request whose prompt finishes prefilling in this step: its full pool blocks not stored yet,
or, on a prefill instance, the whole prompt for its decode instance).

Nothing here imports vLLM: the objects it reads (requests, scheduler outputs) are passed
in, so the logic is tested without it.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ...serve.pool.session import PoolSession
from ...serve.pool.store import PoolHit

__all__ = ["ConnectorMetadata", "Load", "Save", "SchedulerSide", "WorkerReport"]

log = logging.getLogger("tensorwire.vllm")


@dataclass
class Load:
    """Fill ``block_ids`` (vLLM's) with tokens ``[start, end)`` of the request's prompt."""

    request_id: str
    block_ids: list[int]
    start: int
    end: int
    pool: PoolHit | None = None  # the stored blocks covering [start, end), from block pool_first on
    pool_first: int = 0
    transfer: dict[str, Any] | None = None  # a prefill instance's transfer: host, port, id, tokens


@dataclass
class Save:
    """After this step, save the prompt's tokens ``[start, end)`` held in ``block_ids`` (from token 0)."""

    request_id: str
    prompt: list[int]
    block_ids: list[int]
    start: int
    end: int
    tenant: str
    store: str = "auto"  # the pool's profile ("auto": its controller picks), or "transfer" for a decode instance
    budget: tuple[float, float] = (math.inf, math.inf)  # max perplexity increase, max retrieval drop
    compression: str = "auto"  # a transfer's: "auto" (the controller), "raw", "lossless" or a profile


@dataclass
class ConnectorMetadata:
    """What the scheduler hands the worker for one step (pickled across processes)."""

    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)
    prefill_tokens: int = 0  # prompt tokens computed in this step
    prefill_only: bool = False  # no decode token in this step: its time measures the prefill speed


@dataclass
class WorkerReport:
    """What the worker measured in one step, back to the scheduler (vLLM aggregates them)."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    fetched_bytes: int = 0
    fetch_s: float = 0.0

    def aggregate(self, other: WorkerReport) -> WorkerReport:
        return WorkerReport(self.prefill_tokens + other.prefill_tokens, self.prefill_s + other.prefill_s,
                            self.fetched_bytes + other.fetched_bytes, self.fetch_s + other.fetch_s)  # fmt: skip


@dataclass
class _Tracked:
    prompt: list[int]
    tenant: str
    kv: dict[str, Any]
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    hit_tokens: int = 0  # tokens the pool holds already (not stored again)
    saved: bool = False


class SchedulerSide:
    """See the module docstring.

    Parameters
    ----------
    block_size : int
        vLLM's block size (tokens); the pool's blocks are a multiple of it.
    session : PoolSession, optional
        The KV pool and what plans its fetches (None: no pool); the worker's measurements
        (:meth:`observe`) teach it the prefill speed and the pool's bandwidth.
    role : str
        ``"both"``, ``"producer"`` (a prefill instance: saves every prompt for its decode
        instance) or ``"consumer"`` (loads what ``kv_transfer_params`` names).
    tenant : str
        The pool namespace of requests that name none in ``kv_transfer_params``.
    """

    def __init__(self, *, block_size: int, session: PoolSession | None = None, role: str = "both", tenant: str = "shared",
                 store: str = "auto", budget: tuple[float, float] = (math.inf, math.inf)):  # fmt: skip
        pool = session.pool if session is not None else None
        if pool is not None and pool.block_tokens % block_size:
            raise ValueError(f"the pool's blocks ({pool.block_tokens} tokens) must be a multiple of vLLM's "
                             f"({block_size}): set the pool's block_tokens accordingly")  # fmt: skip
        self.block_size = int(block_size)
        self.session, self.pool = session, pool
        self.role = role
        self.tenant = tenant
        self.store = store
        self.budget = budget
        self._lookups: dict[str, Future] = {}
        self._matched: dict[str, tuple[int, PoolHit | None, dict[str, Any] | None]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._loads: dict[str, Load] = {}
        self._issued: set[str] = set()  # requests whose load was handed to the worker
        self._threads = ThreadPoolExecutor(1, thread_name_prefix="tensorwire-pool-lookup") if pool is not None else None

    # -- get_num_new_matched_tokens ------------------------------------------------------------
    def matched(self, request_id: str, prompt: list[int], num_computed: int,
                kv_params: dict[str, Any] | None) -> tuple[int | None, bool]:  # fmt: skip
        """``(tokens to load beyond num_computed, load asynchronously)``; ``(None, False)``: ask again."""
        if request_id in self._issued:
            return 0, False  # asked again after a load was issued: it failed and vLLM recomputes (no retry loop)
        limit = (len(prompt) - 1) // self.block_size * self.block_size  # vLLM computes at least the last token
        transfer = (kv_params or {}).get("tensorwire_transfer")
        if transfer is not None and self.role in ("consumer", "both"):
            tokens = min(int(transfer.get("tokens", 0)), limit)
            self._matched[request_id] = (tokens, None, transfer)
            return (tokens - num_computed, True) if tokens > num_computed else (0, False)
        if self.pool is None or limit == 0:
            return 0, False
        if request_id not in self._matched:
            future = self._lookups.get(request_id)
            if future is None:
                tenant = str((kv_params or {}).get("tenant") or self.tenant)
                self._lookups[request_id] = self._threads.submit(self.pool.lookup, prompt[:limit], tenant)
                return None, False
            if not future.done():
                return None, False
            del self._lookups[request_id]
            self._matched[request_id] = (self._plan(future.result(), limit), future.result(), None)
        tokens = self._matched[request_id][0]
        return (tokens - num_computed, False) if tokens > num_computed else (0, False)

    def _plan(self, hit: PoolHit, limit: int) -> int:
        plan = self.session.plan(hit, limit)
        self.session.count(plan, hit)
        log.info("pool: %s", plan.reason)
        return plan.blocks * hit.block_tokens

    # -- update_state_after_alloc ----------------------------------------------------------------
    def allocated(self, request_id: str, prompt: list[int], block_ids: list[int], num_external: int,
                  kv_params: dict[str, Any] | None) -> None:  # fmt: skip
        """Blocks were allocated for a scheduled request; ``num_external`` of its tokens are ours to load."""
        params = kv_params or {}
        tracked = self._tracked.setdefault(request_id, _Tracked(list(prompt), str(params.get("tenant") or self.tenant),
                                                                dict(params.get("tensorwire") or {})))  # fmt: skip
        tokens, hit, transfer = self._matched.pop(request_id, (0, None, None))
        if hit is not None:
            tracked.hit_tokens = hit.tokens if tokens else 0
        if num_external <= 0:
            return
        self._issued.add(request_id)
        end = tokens
        start = end - num_external
        first_block = start // self.block_size
        ids = list(block_ids[first_block:end // self.block_size])
        if transfer is not None:
            self._loads[request_id] = Load(request_id, ids, start, end, transfer=dict(transfer))
        elif hit is not None:
            first = start // hit.block_tokens
            used = hit.truncated(-(-end // hit.block_tokens)).tail(first)
            self._loads[request_id] = Load(request_id, ids, start, end, pool=used, pool_first=first)

    # -- build_connector_meta -------------------------------------------------------------------
    def build(self, scheduler_output: Any) -> ConnectorMetadata:
        meta = ConnectorMetadata(loads=list(self._loads.values()))
        self._loads.clear()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                tracked.computed = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for i, request_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            added = cached.new_block_ids[i]
            if request_id in getattr(cached, "resumed_req_ids", ()) and added is not None:
                tracked.block_ids = list(added[0])  # a preempted request resumes with new blocks
            elif added is not None:
                tracked.block_ids.extend(added[0])
            tracked.computed = cached.num_computed_tokens[i]
        decoding = False
        for request_id, tracked in self._tracked.items():
            if request_id not in scheduled:
                continue
            left = len(tracked.prompt) - tracked.computed
            meta.prefill_tokens += max(0, min(scheduled[request_id], left))
            decoding |= left <= 0
            if tracked.saved:
                continue
            if tracked.computed + scheduled[request_id] >= len(tracked.prompt):
                tracked.saved = True
                save = self._save(request_id, tracked)
                if save is not None:
                    meta.saves.append(save)
        meta.prefill_only = not decoding and len(scheduled) == sum(r in self._tracked for r in scheduled)
        for request_id in scheduler_output.finished_req_ids:
            self.finished(request_id)
        return meta

    def _save(self, request_id: str, tracked: _Tracked) -> Save | None:
        budget = (float(tracked.kv.get("max_ppl_increase", self.budget[0])),
                  float(tracked.kv.get("max_retrieval_drop", self.budget[1])))  # fmt: skip
        if self.role == "producer":
            end = (len(tracked.prompt) - 1) // self.block_size * self.block_size
            if end == 0:
                return None
            return Save(request_id, tracked.prompt, tracked.block_ids[:end // self.block_size], 0, end, tracked.tenant,
                        store="transfer", budget=budget, compression=str(tracked.kv.get("compression", "auto")))  # fmt: skip
        if self.pool is None:
            return None
        store = str(tracked.kv.get("pool_store", self.store))
        end = (len(tracked.prompt) - 1) // self.pool.block_tokens * self.pool.block_tokens
        if store == "none" or end <= tracked.hit_tokens:
            return None
        return Save(request_id, tracked.prompt, tracked.block_ids[:end // self.block_size], tracked.hit_tokens, end,
                    tracked.tenant, store=store, budget=budget)  # fmt: skip

    # -- the rest ----------------------------------------------------------------------------------
    def finished(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self._issued.discard(request_id)
        self._matched.pop(request_id, None)
        future = self._lookups.pop(request_id, None)
        if future is not None:
            future.cancel()

    def observe(self, report: WorkerReport | None) -> None:
        """Learn the prefill speed and the pool's bandwidth from what the worker measured."""
        if report is None or self.session is None:
            return
        if report.prefill_tokens:
            self.session.observe_prefill(report.prefill_tokens, report.prefill_s)
        if report.fetched_bytes and report.fetch_s > 0:
            self.session.bandwidth.add_transfer(report.fetched_bytes, report.fetch_s)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
