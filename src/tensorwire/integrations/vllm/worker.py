"""The connector's worker side: moves KV between vLLM's paged cache and the pool or a transfer.

It runs in vLLM's worker process, around the model's forward pass:

* loads from the pool are synchronous for vLLM (the request's blocks must be filled before
  its attention runs) but overlapped per layer: a thread fetches the blocks (one MGET) and
  decodes and writes them one layer at a time, and :meth:`WorkerSide.wait_layer` waits only
  for the layer about to run;
* loads of a transfer (a decode instance pulling what a prefill instance computed) are
  asynchronous: a thread pulls the payload over tensorwire's transport (decoding layer ``i``
  while ``i + 1`` arrives), writes it, and the request is reported finished receiving;
* saves copy a finished prompt's blocks out of the paged cache after the step (the only
  part on the request path) and then, in a thread, store them in the pool with the profile
  the pool's controller picks, or keep them for the decode instance to pull
  (:class:`~.transfer.Outbox`).

A load that fails (pool gone, block evicted or damaged, transfer cut) reports its vLLM
blocks as failed: with ``kv_load_failure_policy="recompute"`` vLLM recomputes them and
the request succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ...errors import require
from ...kv.stage import KVCacheData, KVLayer
from ...serve.pool.session import PoolSession
from .layout import TileLayout
from .scheduler import ConnectorMetadata, Load, Save, WorkerReport

__all__ = ["WorkerSide"]

log = logging.getLogger("tensorwire.vllm")


class _LayerLoads:
    """Synchronous loads of one step: an event per layer, set once every load has written it."""

    def __init__(self, n_layers: int):
        self.ready = [threading.Event() for _ in range(n_layers)]
        self.failed: set[int] = set()


class WorkerSide:
    """See the module docstring.

    Parameters
    ----------
    layer_names : list of str
        vLLM's attention layer names in model order (``model.layers.{i}.self_attn.attn``).
    session : PoolSession, optional
        The pool (its own Redis client in this process) and the controller that picks what
        to store with.
    outbox : Outbox, optional
        A prefill instance's transfers waiting for their decode instance.
    pull : callable, optional
        ``pull(transfer) -> KVCacheData``: fetches a transfer from its prefill instance.
    """

    def __init__(self, layer_names: list[str], *, session: PoolSession | None = None, outbox: Any = None,
                 pull: Callable[[Mapping[str, Any]], KVCacheData] | None = None, cache_dtype: str = "F32"):  # fmt: skip
        self.layer_names = list(layer_names)
        self.index = {name: i for i, name in enumerate(self.layer_names)}
        self.session = session
        self.outbox = outbox
        self.pull = pull
        self.cache_dtype = cache_dtype
        self.caches: dict[str, Any] = {}
        self.layout: TileLayout | None = None
        self._step: _LayerLoads | None = None
        self._errors: set[int] = set()
        self._received: set[str] = set()
        self._transfer_failed: dict[str, list[int]] = {}  # reported with the request's finished-receiving step
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(2, thread_name_prefix="tensorwire-kv")
        self._report = WorkerReport()
        self._step_began: float | None = None

    def register(self, caches: Mapping[str, Any], layout: TileLayout) -> None:
        self.caches = dict(caches)
        self.layout = layout
        missing = set(self.layer_names) - set(self.caches)
        if missing:
            raise ValueError(f"vLLM registered no KV cache for layers {sorted(missing)[:3]}...")

    # -- loads -------------------------------------------------------------------------------------
    def step_started(self) -> None:
        self._step_began = time.perf_counter()

    def start_loads(self, meta: ConnectorMetadata) -> None:
        sync = [load for load in meta.loads if load.pool is not None]
        self._step = _LayerLoads(len(self.layer_names)) if sync else None
        if sync:
            self._io.submit(self._load_pool, sync, self._step)
        for load in meta.loads:
            if load.transfer is not None:
                self._io.submit(self._load_transfer, load)

    def _load_pool(self, loads: list[Load], step: _LayerLoads) -> None:
        streams = []
        for load in loads:
            began = time.perf_counter()
            stream, kept = self.session.pool.stream(load.pool, load.pool_first)
            seconds = time.perf_counter() - began
            if kept.blocks:
                with self._lock:
                    self._report.fetched_bytes += kept.nbytes
                    self._report.fetch_s += seconds
            if kept.blocks < load.pool.blocks:  # gone, damaged or unreachable: vLLM recomputes what is missing
                covered = (load.pool_first + kept.blocks) * load.pool.block_tokens
                step.failed.update(load.block_ids[max(0, covered - load.start) // self.layout.block_size:])
            streams.append((load, stream, kept))
        iterators = [(load, stream.layers() if stream else None, kept) for load, stream, kept in streams]
        try:
            for i, name in enumerate(self.layer_names):
                for load, layers, kept in iterators:
                    if layers is None or load.block_ids[0] in step.failed:
                        continue
                    try:
                        layer = next(layers)
                    except Exception as exc:  # a damaged layer: every block of this load is recomputed
                        log.warning("pool load of %s failed at layer %d: %s", load.request_id, i, exc)
                        step.failed.update(load.block_ids)
                        continue
                    self._write(name, load, layer, load.pool_first * load.pool.block_tokens,
                                (load.pool_first + kept.blocks) * load.pool.block_tokens)  # fmt: skip
                step.ready[i].set()
        finally:
            for event in step.ready:
                event.set()

    def _write(self, name: str, load: Load, layer: KVLayer, first_token: int, last_token: int) -> None:
        """Write tokens ``[load.start, min(load.end, last_token))`` of ``layer`` (which starts at ``first_token``)."""
        torch = require("torch")
        end = min(load.end, last_token)
        blocks = (end - load.start) // self.layout.block_size
        if blocks <= 0:
            return
        lo, hi = load.start - first_token, load.start - first_token + blocks * self.layout.block_size
        keys = torch.from_numpy(np.ascontiguousarray(layer.keys[0, :, lo:hi]))
        values = torch.from_numpy(np.ascontiguousarray(layer.values[0, :, lo:hi]))
        self.layout.write(self.caches[name], load.block_ids[:blocks], keys, values)

    def wait_layer(self, layer_name: str) -> None:
        step = self._step
        if step is not None:
            step.ready[self.index[layer_name]].wait()

    def _load_transfer(self, load: Load) -> None:
        try:
            data = self.pull(load.transfer)
            if data.seq_len < load.end or any(layer.keys.shape[2] < load.end for layer in data.layers):
                raise ValueError(f"the transfer holds {data.seq_len} tokens, {load.end} were announced")
            for name, layer in zip(self.layer_names, data.layers):
                self._write(name, load, layer, 0, load.end)
            with self._lock:
                self._received.add(load.request_id)
        except Exception as exc:  # any failure: vLLM recomputes the prompt
            log.warning("transfer for %s failed (%s: %s); vLLM recomputes it", load.request_id, type(exc).__name__, exc)
            with self._lock:
                self._transfer_failed[load.request_id] = list(load.block_ids)
                self._received.add(load.request_id)

    # -- saves ---------------------------------------------------------------------------------
    def finish_step(self, meta: ConnectorMetadata) -> None:
        """After the forward pass: collect failed loads, measure the step, copy out the saves."""
        step = self._step
        if step is not None:
            with self._lock:
                self._errors.update(step.failed)
            self._step = None
        if self._step_began is not None and meta.prefill_only and meta.prefill_tokens:
            with self._lock:
                self._report.prefill_tokens += meta.prefill_tokens
                self._report.prefill_s += time.perf_counter() - self._step_began
        self._step_began = None
        for save in meta.saves:
            data = self._copy(save)
            self._io.submit(self._save, save, data)

    def _copy(self, save: Save) -> KVCacheData:
        layers = []
        for name in self.layer_names:
            keys, values = self.layout.read(self.caches[name], save.block_ids)
            keys, values = keys[:, :save.end].float().numpy()[None], values[:, :save.end].float().numpy()[None]
            positions = np.broadcast_to(np.arange(save.end), keys.shape[:3]).copy()
            layers.append(KVLayer(keys, values, positions))
        return KVCacheData(layers, seq_len=save.end, dtype=self.cache_dtype)

    def _save(self, save: Save, data: KVCacheData) -> None:
        try:
            if save.store == "transfer":
                self.outbox.put(save.request_id, data, save.budget, save.compression)
            elif self.session is not None:
                self.session.store(save.prompt, data, save.tenant, from_tokens=save.start, profile=save.store,
                                   max_ppl_increase=save.budget[0], max_retrieval_drop=save.budget[1])  # fmt: skip
        except Exception as exc:  # a save never fails a request
            log.warning("saving the KV of %s failed: %s: %s", save.request_id, type(exc).__name__, exc)

    # -- reports -------------------------------------------------------------------------------
    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def finished_receiving(self) -> set[str]:
        """Requests whose transfer ended (vLLM asks this before :meth:`load_errors`, in the same step:
        a failed transfer's blocks are reported then, with the request)."""
        with self._lock:
            done, self._received = self._received, set()
            for request_id in done:
                self._errors.update(self._transfer_failed.pop(request_id, ()))
        return done

    def report(self) -> WorkerReport | None:
        with self._lock:
            report, self._report = self._report, WorkerReport()
        return report if (report.prefill_tokens or report.fetched_bytes) else None

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
