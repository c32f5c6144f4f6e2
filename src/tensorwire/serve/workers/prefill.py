"""The prefill worker: runs the prompt, lets the controller pick a pipeline, ships the KV cache.

Per ``{"type": "generate", ...}`` request from the front end (docs/PROTOCOL.md, "Worker
messages"):

1. prefill ``prompt_ids[:-1]`` (with the last queries, for SnapKV-style profiles); with a
   KV pool, first fetch the stored prefix of the prompt where that beats prefilling it
   (``serve.pool.session``), prefill only the rest, and store the new blocks after the
   answer;
2. ask the controller for a profile, or raw, from the cache size, the learned bandwidth
   to the decode workers, the request's SLO and quality budget (or take the one the
   request forces; ``control.policy`` may name another policy the worker holds, such as
   ``"kvserve-rule"``, for side-by-side benchmarks);
3. connect to the least busy decode worker, send ``continue`` and the KV stream (each
   layer encoded while the previous one is on the wire); once the decode worker holds the
   cache, tell the front end (``{"type": "kv_sent", "decision", "kv_bytes_raw",
   "kv_bytes_sent", "timings"}``) and relay the decode worker's tokens as they come;
4. feed the controller what it observed: the latency from the first encode to the decode
   worker's ``kv_received``, the bytes, and the wire time.

Faults: a decode worker that cannot be reached, drops the connection, stalls (nothing for
the connection's idle timeout: the worker's ``--peer-timeout-s``) or fails is replaced by
the next one; a transfer it refuses as damaged is resent raw, to it first;
when no decode worker is left, this worker generates the rest itself from its own cache.
A retry carries the tokens already relayed as a prefix that the next worker feeds after
the prompt, so the answer continues what the client has: no token is lost, repeated or
taken from another generation. A front end that goes away ends the request at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...control import RAW, Controller, Decision, RequestContext
from ...control.policy import BasePolicy
from ...errors import PeerError, TensorwireError
from ...kv.pipeline import Pipeline
from ...kv.presets import PRESETS
from ..engine import Engine, SamplingParams
from ..pool.session import PoolSession
from ..protocol import json_safe
from ..transport.tcp import Connection
from . import try_send

__all__ = ["PrefillWorker", "Peer", "RAW_PIPELINE"]

log = logging.getLogger("tensorwire.serve.prefill")

# ERROR codes of a transfer that arrived damaged (docs/PROTOCOL.md): resent raw, elsewhere.
DAMAGED = frozenset({"frame-checksum", "malformed-frame", "payload-checksum", "corrupt-payload"})
RAW_PIPELINE = PRESETS["bf16"]  # "uncompressed": the bf16 cache a server holds, as it is
OBSERVE_WINDOW = 64  # queries captured during prefill for SnapKV-style selectors
CONTROLLER = "controller"  # the policy a request gets unless its control.policy names another


@dataclass
class Peer:
    """A decode worker and what this prefill worker knows of it."""

    host: str
    port: int
    in_flight: int = 0
    failures: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class PrefillWorker:
    """Serves ``generate`` requests from the front end.

    Parameters
    ----------
    engine : Engine
        The model (the same one the decode workers run).
    controller : Controller
        Chooses a profile per request; learns from every transfer.
    peers : sequence of Peer
        The decode workers.
    connect : callable
        ``await connect(host, port) -> Connection`` (authenticated, shaped as configured).
    alternatives : mapping of str to Policy
        Other policies a request may name in ``control.policy`` (the controller's name is
        ``"controller"``); each learns only from the transfers it decided.
    pool : PoolSession, optional
        A KV pool: a stored prefix of the prompt is fetched instead of recomputed where
        that is faster, and the prompt's new blocks are stored after the transfer.
    shared_pool : bool
        Every tenant's prefixes serve every tenant (default: each tenant its own).
    """

    def __init__(self, engine: Engine, controller: Controller, peers: Sequence[Peer],
                 connect: Callable[[str, int], Any], observe_window: int = OBSERVE_WINDOW,
                 alternatives: Mapping[str, BasePolicy] | None = None, pool: PoolSession | None = None,
                 shared_pool: bool = False):  # fmt: skip
        self.engine = engine
        self.controller = controller
        self.policies: dict[str, BasePolicy] = {CONTROLLER: controller, **(alternatives or {})}
        self.pool = pool
        self.shared_pool = shared_pool
        self._stores: set[asyncio.Future] = set()  # pool writes in flight, off the request path
        self.peers = list(peers)
        self.connect = connect
        self.observe_window = observe_window
        self.in_flight = 0

    # -- one request ---------------------------------------------------------------------
    async def handle(self, front: Connection) -> None:
        request = await front.recv_message()
        request_id = request.get("id")
        self.in_flight += 1
        try:
            if request.get("type") == "health":
                await front.send_message({"type": "health", "in_flight": self.in_flight - 1, "pool_stores": len(self._stores),
                                          "peers": [dataclasses.asdict(p) for p in self.peers]})  # fmt: skip
                return
            if request.get("type") != "generate":
                raise ValueError(f"expected a 'generate' or 'health' message, got {request.get('type')!r}")
            await self._serve(front, request)
        except FrontEndGone:
            log.info("request %s: the front end went away; the request ends here", request_id)
        except (TensorwireError, KeyError, TypeError, ValueError) as exc:
            log.warning("request %s failed: %s: %s", request_id, type(exc).__name__, exc)
            await try_send(front, {"type": "error", "id": request_id, "code": "bad_request",
                                    "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        finally:
            self.in_flight -= 1

    async def _serve(self, front: Connection, request: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        request_id = request["id"]
        prompt = [int(t) for t in request["prompt_ids"]]
        sampling = SamplingParams.from_dict(request["sampling"])
        if not sampling.greedy and sampling.seed is None:
            # A seed of our own: a retry on another worker then repeats the tokens already sent.
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        policy = self._policy(request)
        tenant = "shared" if self.shared_pool else str(request.get("tenant") or "anonymous")
        prefix, pool_info = None, None
        pool_control = (request.get("control") or {}).get("pool") or {}
        if self.pool is not None:
            self.pool.check_store_profile(str(pool_control.get("store", "auto")))  # before the prefill, not after the answer
        if self.pool is not None and len(prompt) > 1:
            fetch = str(pool_control.get("fetch", "auto"))
            prefix, pool_info = await loop.run_in_executor(None, self.pool.prefix, prompt, tenant, fetch)
        reused = prefix.seq_len if prefix is not None else 0
        began = time.perf_counter()
        data = await loop.run_in_executor(None, self.engine.prefill, prompt, self.observe_window, prefix)
        prefill_s = time.perf_counter() - began
        if self.pool is not None:
            self.pool.observe_prefill(len(prompt) - 1 - reused, prefill_s)
        decision = self._decide(policy, request, data.nbytes(2))
        config = decision.pipeline or RAW_PIPELINE
        relay = _Relay(front, request_id, decision, data.nbytes(2), prefill_s, pool_info)
        attempts: list[dict[str, Any]] = []
        queue = self._ranked_peers()
        while queue:
            peer = queue.pop(0)
            outcome = await self._transfer(peer, request_id, data, prompt[-1], sampling, config, policy, decision, relay)
            attempts.append(outcome)
            if outcome["status"] == "done":
                break
            if outcome["status"] == "bad_kv" and config is not RAW_PIPELINE:
                config = RAW_PIPELINE  # the damaged transfer is resent uncompressed, to the same worker first
                queue.insert(0, peer)
        else:
            await relay.kv_sent({"peer": "prefill", "kv_bytes_sent": 0}, None)  # no decode worker left: nothing moves
            await self._finish_here(data, prompt[-1], sampling, relay)
            attempts.append({"peer": "prefill", "status": "done"})
        await relay.message({"type": "done", "id": request_id, "tokens": relay.sent, "attempts": attempts,
                             "finish_reason": self._finish_reason(relay, sampling)})  # fmt: skip
        if self.pool is not None:
            self._store_later(prompt, data, tenant, reused, request.get("control") or {})

    def _store_later(self, prompt: list[int], data, tenant: str, reused: int, control: dict[str, Any]) -> None:
        """Put the prompt's new blocks in the pool in a thread; the answer has gone already."""
        store = functools.partial(self.pool.store, prompt, data, tenant, from_tokens=reused,
                                  profile=str((control.get("pool") or {}).get("store", "auto")),
                                  max_ppl_increase=_limit(control.get("max_ppl_increase")),
                                  max_retrieval_drop=_limit(control.get("max_retrieval_drop")))  # fmt: skip
        future = asyncio.get_running_loop().run_in_executor(None, store)
        self._stores.add(future)
        future.add_done_callback(self._stored)

    def _stored(self, future: asyncio.Future) -> None:
        self._stores.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("storing a prompt's blocks in the pool failed: %s", future.exception())

    def _policy(self, request: dict[str, Any]) -> BasePolicy:
        name = (request.get("control") or {}).get("policy") or CONTROLLER
        if name not in self.policies:
            raise ValueError(f"policy {name!r} is not one this worker holds: {', '.join(self.policies)}")
        return self.policies[name]

    def _decide(self, policy: BasePolicy, request: dict[str, Any], kv_bytes: int) -> Decision:
        control = request.get("control") or {}
        forced = control.get("compression", "auto")
        context = RequestContext(kv_bytes=kv_bytes, slo_s=_limit(control.get("slo_s")),
                                 max_ppl_increase=_limit(control.get("max_ppl_increase")),
                                 max_retrieval_drop=_limit(control.get("max_retrieval_drop")),
                                 workload=str(control.get("workload", "default")))  # fmt: skip
        decision = policy.choose(context)
        if forced in ("auto", decision.choice):
            return decision
        return _forced(decision, forced, policy, context)

    def _ranked_peers(self) -> list[Peer]:
        return sorted(self.peers, key=lambda p: (p.failures > 0, p.in_flight))

    async def _transfer(self, peer: Peer, request_id: Any, data, last_token: int, sampling: SamplingParams,
                        config: dict[str, Any], policy: BasePolicy, decision: Decision,
                        relay: _Relay) -> dict[str, Any]:  # fmt: skip
        """One attempt on one decode worker; returns how it ended (``status``: done, bad_kv, failed)."""
        peer.in_flight += 1
        tried = time.perf_counter()
        outcome: dict[str, Any] = {"peer": peer.address, "pipeline": config}
        try:
            conn = await self.connect(peer.host, peer.port)
            try:
                await conn.send_message({"type": "continue", "id": request_id, "last_token": last_token,
                                         "sampling": sampling.to_dict(), "prefix": list(relay.tokens)})  # fmt: skip
                began = time.perf_counter()
                # Token selection (SnapKV scores attention) runs in a thread, off the event loop.
                stream = await asyncio.get_running_loop().run_in_executor(
                    None, Pipeline.from_config(config).encode_stream, data)
                stats = await conn.send_kv(request_id, stream)
                reply = await conn.recv_message()
                if reply.get("type") == "error":
                    outcome.update(status="failed", error=reply.get("message"))
                    return outcome
                latency = time.perf_counter() - began
                # The link speed is learned from the receiver's busy time (the union of each
                # frame's first-to-last byte): the sender's writes return once the socket
                # buffer takes the bytes, and the first-to-last byte of the whole transfer
                # also counts the gaps where the link idled while the sender encoded (an
                # encoder-bound 1 Gbit/s transfer measured 0.2 Gbit/s that way, 0.76 busy).
                sent, span = stats.wire_bytes, reply.get("wire_span_s")
                wire_s = (reply.get("stats") or {}).get("wire_s") or span or stats.wire_s
                # A raw resend of a profile's transfer says nothing about that profile's speed.
                if config is not RAW_PIPELINE or decision.is_raw:
                    policy.observe(decision, observed_latency=latency, bytes_sent=sent, transfer_time=wire_s)
                outcome.update(kv_latency_s=latency, kv_bytes_sent=sent, wire_s=wire_s, wire_span_s=span,
                               decode_kv_s=reply.get("seconds"))
                await relay.kv_sent(outcome, RAW if config is RAW_PIPELINE else decision.choice)
                while True:
                    message = await conn.recv_message()
                    if message.get("type") == "token":
                        if not await relay.send(message.get("token"), message.get("index")):
                            outcome.update(status="failed", error=f"a token out of order: {message!r:.200}")
                            return outcome
                    elif message.get("type") == "done":
                        outcome["status"] = "done"
                        peer.failures = 0
                        return outcome
                    else:
                        outcome.update(status="failed", error=message.get("message"))
                        return outcome
            finally:
                await conn.close()
        except PeerError as exc:
            # The decode worker found the transfer damaged (a frame or a layer failing its
            # checksum): the worker is fine, the bytes were not; resend them raw.
            damaged = exc.code in DAMAGED
            peer.failures += 0 if damaged else 1
            log.warning("decode worker %s refused request %s: %s", peer.address, request_id, exc)
            outcome.update(status="bad_kv" if damaged else "failed", error=str(exc))
            return outcome
        except (OSError, asyncio.TimeoutError, TensorwireError) as exc:
            peer.failures += 1
            log.warning("decode worker %s failed on request %s: %s: %s", peer.address, request_id, type(exc).__name__, exc)
            outcome.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            return outcome
        finally:
            peer.in_flight -= 1
            outcome["seconds"] = time.perf_counter() - tried

    async def _finish_here(self, data, last_token: int, sampling: SamplingParams, relay: _Relay) -> None:
        loop = asyncio.get_running_loop()
        tokens = self.engine.generate(data, last_token, sampling, relay.tokens)
        while (token := await loop.run_in_executor(None, next, tokens, None)) is not None:
            await relay.send(token, relay.sent)

    def _finish_reason(self, relay: _Relay, sampling: SamplingParams) -> str:
        last = relay.tokens[-1] if relay.tokens else None
        return "length" if relay.sent >= sampling.max_tokens and last not in self._stops(sampling) else "stop"

    def _stops(self, sampling: SamplingParams) -> set[int]:
        return {*sampling.stop_token_ids, self.engine.eos_token_id}


class FrontEndGone(Exception):
    """The front end closed its connection: the request ends (not a decode worker's fault)."""


class _Relay:
    """Forwards to the front end, in order: the transfer's outcome once, then each token once."""

    def __init__(self, front: Connection, request_id: Any, decision: Decision, kv_bytes_raw: int, prefill_s: float,
                 pool: dict[str, Any] | None = None):  # fmt: skip
        self.pool = pool
        self.front = front
        self.request_id = request_id
        self.decision = decision
        self.kv_bytes_raw = kv_bytes_raw
        self.prefill_s = prefill_s
        self.told = False
        self.tokens: list[int] = []

    @property
    def sent(self) -> int:
        return len(self.tokens)

    async def message(self, message: dict[str, Any]) -> None:
        try:
            await self.front.send_message(json_safe(message))
        except (OSError, TensorwireError) as exc:
            raise FrontEndGone(str(exc)) from exc

    async def kv_sent(self, outcome: dict[str, Any], profile: str | None) -> None:
        """``profile``: what the cache went through on the wire ("raw" after a raw resend of a
        damaged transfer, whatever the decision chose; None when it did not move)."""
        if self.told:
            return  # a retry after tokens went out: the front end already has the first outcome
        self.told = True
        timings = {"prefill_s": self.prefill_s, **{k: outcome[k] for k in ("kv_latency_s", "wire_s", "wire_span_s", "decode_kv_s")
                                                   if outcome.get(k) is not None}}  # fmt: skip
        await self.message({"type": "kv_sent", "id": self.request_id, "profile": profile,
                            "decision": self.decision.to_dict(), "kv_bytes_raw": self.kv_bytes_raw,
                            "kv_bytes_sent": outcome.get("kv_bytes_sent"), "decode_worker": outcome.get("peer"),
                            "timings": timings, "pool": self.pool})  # fmt: skip

    async def send(self, token: Any, index: Any) -> bool:
        """Relay the token at ``index``; False (nothing sent) when it is not the next one."""
        if isinstance(token, bool) or not isinstance(token, int) or index != self.sent:
            return False
        await self.message({"type": "token", "id": self.request_id, "index": index, "token": token})
        self.tokens.append(token)
        return True


def _forced(decision: Decision, name: str, policy: BasePolicy, context: RequestContext) -> Decision:
    """``decision`` with the choice the request forces: raw, or a profile of the library
    within the request's quality budget.

    The candidates keep the policy's predictions, so ``observe`` learns from a forced
    transfer like from any other. Before the first transfer has measured the link the
    decision lists no candidates (it is raw, "no bandwidth estimate yet"); a profile is
    still the client's to force then.
    """
    profile = None if name == RAW else policy.profiles.get(name)
    if name != RAW and (profile is None or not profile.meets(context.max_ppl_increase, context.max_retrieval_drop)):
        allowed = [p.name for p in policy.profiles.values()
                   if p.meets(context.max_ppl_increase, context.max_retrieval_drop)]  # fmt: skip
        raise ValueError(f"compression {name!r} is not a profile this request may use (unknown, or outside its "
                         f"quality budget); it may use: {', '.join([RAW, *allowed])}")  # fmt: skip
    return dataclasses.replace(decision, choice=name, profile=profile,
                               reason=f"forced by the request; the policy would pick {decision.choice}: {decision.reason}")


def _limit(value: Any) -> float:
    """A bound from the wire: None (JSON for "none") is no bound."""
    return math.inf if value is None else float(value)
