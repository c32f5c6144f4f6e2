"""TensorwireConnector: vLLM's ``KVConnectorBase_V1`` over tensorwire's pool, transport and controller.

Load it with vLLM's ``kv_transfer_config``::

    {"kv_connector": "TensorwireConnector",
     "kv_connector_module_path": "tensorwire.integrations.vllm.connector",
     "kv_role": "kv_both",                      # kv_producer: a prefill instance; kv_consumer: a decode instance
     "kv_load_failure_policy": "recompute",     # a failed load is recomputed, never an error
     "kv_connector_extra_config": {
         "pool": {"url": "redis://127.0.0.1:6379", "password_file": "...", "block_tokens": 256,
                  "tenant": "shared", "store": "auto", "gbps": 1.0},        # optional: the KV pool
         "transfer": {"host": "127.0.0.1", "port": 7100, "gbps": 1.0},      # producer: where its outbox listens
         "secret_file": "...",                  # the transport's shared secret (else TENSORWIRE_SECRET[_FILE])
         "library": "profiles.json",            # default: the shipped SmolLM2 library
         "allow_other_library": false,          # true: use a library measured on another model shape
         "max_ppl_increase": 0.01, "max_retrieval_drop": 2.0}}

Per request, ``kv_transfer_params`` may carry ``{"tenant": ..., "tensorwire": {"max_ppl_increase",
"max_retrieval_drop", "pool_store"}}``; a decode instance's request carries the
``tensorwire_transfer`` its prefill instance returned (the proxy passes it on).

Supported: vLLM's CPU attention backend (one KV-cache group, any kernel ISA whose tiles
:class:`~.layout.TileLayout` can map; float32, bfloat16 or float16 caches), one worker
(no tensor or pipeline parallelism). Other layouts load nothing and say why in the log.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

from ...control.latency_model import gbps
from ...errors import require
from .layout import TileLayout
from .scheduler import ConnectorMetadata, SchedulerSide, WorkerReport

__all__ = ["TensorwireConnector"]

log = logging.getLogger("tensorwire.vllm")


def _log_to_stderr() -> None:
    """vLLM configures only its own loggers: give tensorwire's a handler in vLLM's processes
    (level from ``TENSORWIRE_LOG``, default INFO), so decisions and transfers show in its log."""
    root = logging.getLogger("tensorwire")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(tensorwire pid=%(process)d) %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("TENSORWIRE_LOG", "INFO"))
        root.propagate = False

# vLLM is this module's reason to exist: its base classes are needed to define the connector.
_base = require("vllm.distributed.kv_transfer.kv_connector.v1.base")
KVConnectorBase_V1, KVConnectorMetadata = _base.KVConnectorBase_V1, _base.KVConnectorMetadata
KVConnectorRole, KVConnectorWorkerMetadata = _base.KVConnectorRole, _base.KVConnectorWorkerMetadata


class TensorwireMetadata(ConnectorMetadata, KVConnectorMetadata):
    """:class:`ConnectorMetadata` as vLLM's type."""


class TensorwireWorkerMetadata(KVConnectorWorkerMetadata):
    def __init__(self, report: WorkerReport):
        self.report = report

    def aggregate(self, other: TensorwireWorkerMetadata) -> TensorwireWorkerMetadata:
        return TensorwireWorkerMetadata(self.report.aggregate(other.report))


LOSSLESS = "lossless"  # a pool pipeline beside raw (bf16): bit-exact for vLLM's float32 caches


def _settings(vllm_config: Any) -> dict[str, Any]:
    return dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})


def _shape(vllm_config: Any) -> dict[str, int]:
    hf = vllm_config.model_config.hf_config
    heads = int(getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads)
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    return {"n_layers": int(hf.num_hidden_layers), "kv_heads": heads, "head_dim": head_dim, "max_batch": 1,
            "max_seq_len": int(vllm_config.model_config.max_model_len)}  # fmt: skip


def _library(settings: dict[str, Any]):
    from ...data import SMOLLM2_LIBRARY
    from ...kv.profiles import ProfileLibrary

    return ProfileLibrary.load(Path(settings.get("library") or SMOLLM2_LIBRARY))


def _pool(settings: dict[str, Any], vllm_config: Any, library):
    """A KVPool on the configured Redis (raw plus the library's selector-free profiles), or None."""
    pool = settings.get("pool")
    if not pool:
        return None, None
    from ...kv.presets import PRESETS
    from ...serve.pool import KVPool, redis_client
    from ...serve.pool.session import pool_library
    from ...serve.workers.prefill import RAW, RAW_PIPELINE

    redis = require("redis")
    url = redis.connection.parse_url(pool["url"])
    password = Path(pool["password_file"]).read_text().strip() if pool.get("password_file") else pool.get("password")
    profiles = pool_library(library)
    model = vllm_config.model_config
    store = KVPool(redis_client(url.get("host", "127.0.0.1"), int(url.get("port", 6379)), password, netns=pool.get("netns")),
                   model_id=f"vllm:{model.served_model_name or model.model}", tokenizer_id=str(model.tokenizer),
                   pipelines={RAW: RAW_PIPELINE, LOSSLESS: PRESETS[LOSSLESS], **{p.name: p.pipeline for p in profiles}},
                   expect=_shape(vllm_config),
                   block_tokens=int(pool.get("block_tokens", 256)))  # fmt: skip
    return store, profiles


def _bf16_bytes_per_token(shape: dict[str, int]) -> int:
    return shape["n_layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * 2


class TensorwireConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_to_stderr()
        settings = _settings(vllm_config)
        transfer_config = vllm_config.kv_transfer_config
        self.kv_role = {"kv_producer": "producer", "kv_consumer": "consumer"}.get(transfer_config.kv_role, "both")
        self.block_size = int(vllm_config.cache_config.block_size)
        self.shape = _shape(vllm_config)
        library = _library(settings).for_model(self.shape, allow_other=bool(settings.get("allow_other_library")))
        budget = (float(settings.get("max_ppl_increase", math.inf)), float(settings.get("max_retrieval_drop", math.inf)))
        pool, profiles = _pool(settings, vllm_config, library)
        transfer = dict(settings.get("transfer") or {})
        self.transfer_address = (transfer.get("host", "127.0.0.1"), int(transfer.get("port", 0)))
        if self.kv_role == "producer" and not self.transfer_address[1]:
            raise ValueError("a kv_producer's kv_connector_extra_config needs transfer.port: where its outbox listens "
                             "for the decode instances (e.g. {\"transfer\": {\"host\": \"127.0.0.1\", \"port\": 7100}})")
        self._scheduler: SchedulerSide | None = None
        self._worker = None
        session = _session(settings, pool, profiles, self.shape)
        if role == KVConnectorRole.SCHEDULER:
            pool_settings = settings.get("pool") or {}
            self._scheduler = SchedulerSide(block_size=self.block_size, session=session, role=self.kv_role,
                                            tenant=str(pool_settings.get("tenant", "shared")),
                                            store=str(pool_settings.get("store", "auto")), budget=budget)  # fmt: skip
        else:
            self._worker = _worker_side(settings, vllm_config, session, library, self.kv_role, self.shape)

    # -- scheduler side --------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.matched(request.request_id, list(request.prompt_token_ids or []), num_computed_tokens,
                                       request.kv_transfer_params)  # fmt: skip

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if blocks is not None else []
        self._scheduler.allocated(request.request_id, list(request.prompt_token_ids or []), list(block_ids),
                                  num_external_tokens, request.kv_transfer_params)  # fmt: skip

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = self._scheduler.build(scheduler_output)
        return TensorwireMetadata(**vars(meta))

    def update_connector_output(self, connector_output: Any) -> None:
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(worker_meta, TensorwireWorkerMetadata):
            self._scheduler.observe(worker_meta.report)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.finished(request.request_id)
        if self.kv_role != "producer":
            return False, None
        tokens = (len(request.prompt_token_ids or []) - 1) // self.block_size * self.block_size
        if tokens <= 0:
            return False, None
        host, port = self.transfer_address
        return False, {"tensorwire_transfer": {"host": host, "port": port, "id": request.request_id, "tokens": tokens}}

    # -- worker side -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if self._worker is None:
            return
        first = next(iter(kv_caches.values()))
        try:
            layout = TileLayout.probe(_vllm_cache_writer(first), block_size=first.shape[2], kv_heads=first.shape[1],
                                      head_dim=first.shape[3] // 2, dtype=first.dtype)  # fmt: skip
        except Exception as exc:
            log.error("tensorwire cannot map vLLM's KV-cache layout (%s); the connector loads and saves nothing", exc)
            self._worker = None
            return
        self._worker.register(kv_caches, layout)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:  # before the forward pass, whether or not a load comes first
            self._worker.step_started()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, TensorwireMetadata):
            self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # saves copy whole blocks after the step (wait_for_save), once a prompt is complete

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, TensorwireMetadata):
            self._worker.finish_step(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, (self._worker.finished_receiving() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        report = self._worker.report() if self._worker is not None else None
        return TensorwireWorkerMetadata(report) if report is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()


def _session(settings: dict[str, Any], pool, profiles, shape: dict[str, int]):
    """The pool's PoolSession (what plans fetches and picks what to store with), or None without a pool."""
    if pool is None:
        return None
    from ...kv.presets import PRESETS
    from ...serve.pool.session import PoolSession
    from ...serve.pool.store import pipeline_tag
    from ...serve.workers.prefill import RAW_PIPELINE

    # raw and lossless decode at memory speed next to a network fetch (measured: >= 1 GB/s per thread)
    return PoolSession(pool, profiles, raw_pipeline=RAW_PIPELINE, raw_decode_bps=2e9,
                       other_decode_bps={pipeline_tag(PRESETS[LOSSLESS]): 1e9},
                       initial_bandwidth_bps=gbps(float(settings["pool"].get("gbps", 1.0))),
                       bytes_per_token=_bf16_bytes_per_token(shape))  # fmt: skip


def _worker_side(settings, vllm_config, session, library, kv_role: str, shape: dict[str, int]):
    from ...kv.presets import PRESETS
    from ...serve.auth import load_secret
    from ...serve.workers.prefill import RAW_PIPELINE
    from .transfer import Outbox, pull
    from .worker import WorkerSide

    names = [f"model.layers.{i}.self_attn.attn" for i in range(shape["n_layers"])]
    layer_names = _layer_names(vllm_config) or names
    transfer = dict(settings.get("transfer") or {})
    secret = None
    if kv_role in ("producer", "consumer"):
        secret = load_secret(settings.get("secret_file"))
    outbox = None
    if kv_role == "producer":
        rate = gbps(float(transfer["gbps"])) if transfer.get("gbps") else None
        outbox = Outbox(library, host=transfer.get("host", "127.0.0.1"), port=int(transfer.get("port", 0)), secret=secret,
                        rate_bps=rate)  # fmt: skip
        log.info("tensorwire outbox on %s:%d", outbox.host, outbox.port)
    dtype = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}.get(
        str(vllm_config.model_config.dtype), "F32")

    def pull_transfer(t):
        return pull(t, secret=secret, expect=shape)

    pipelines = [RAW_PIPELINE, PRESETS[LOSSLESS], *(p.pipeline for p in library)]
    threading.Thread(target=_warm, args=(pipelines, shape), name="tensorwire-warm", daemon=True).start()

    return WorkerSide(layer_names, session=session, outbox=outbox, pull=pull_transfer if secret else None, cache_dtype=dtype)


def _warm(pipelines: list[dict[str, Any]], shape: dict[str, int]) -> None:
    """Encode and decode a small cache with every pipeline once, at start: the first use of a
    pipeline compiles (or loads) its numba kernels, which must not land on a request's path.
    The values are random: this warms code, it measures nothing."""
    from ...kv.warmup import synthetic_cache, warm_up

    cache = synthetic_cache(n_layers=shape["n_layers"], kv_heads=shape["kv_heads"], tokens=256, head_dim=shape["head_dim"])
    for config in pipelines:
        try:
            warm_up([config], cache)
        except Exception as exc:  # a pipeline that cannot warm on random values still works on real ones
            log.warning("warming %s failed: %s: %s", config, type(exc).__name__, exc)


def _layer_names(vllm_config: Any) -> list[str] | None:
    """The attention layers in model order, as vLLM names them."""
    try:
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention import Attention

        names = list(get_layers_from_vllm_config(vllm_config, Attention))
    except Exception:
        return None
    return sorted(names, key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)]) or None


def _vllm_cache_writer(cache: Any):
    """vLLM's CPU cache-write kernel for caches like ``cache`` (the probe's ``write``)."""
    from vllm._custom_ops import cpu_attn_reshape_and_cache
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block_size, head_dim = cache.shape[2], cache.shape[3] // 2
    isa = _get_attn_isa(cache.dtype, block_size, head_dim)

    def write(keys, values, scratch, slots):
        n, heads = scratch.shape[:2]
        key_cache, value_cache = scratch.view(n, heads, 2 * block_size, head_dim).chunk(2, dim=2)
        cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)

    return write
