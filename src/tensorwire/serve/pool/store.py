"""The KV pool: prefix blocks of compressed KV cache in Redis, found by a hash chain.

A prompt is cut into blocks of ``block_tokens`` tokens. Block ``i``'s identity is a hash
chain: ``h_0`` covers the pool's format, the model, the tokenizer and the tenant;
``h_i = sha256(h_{i-1} || token ids of block i)``, so it names the whole prefix up to and
including the block. Its key adds the pipeline that encoded it:
``tw:pool:<tenant tag>:<h_i>:<pipeline tag>``. Its value is the self-describing KV payload
(docs/FORMAT.md section 6) of that block's cache, all layers, with the tokens' original
positions, so the per-layer checksums guard it and a reused block continues at the right
RoPE positions.

* :meth:`KVPool.lookup` finds the longest stored prefix in one round trip (a pipelined
  STRLEN of every block under every pipeline the pool stores with) and returns the keys
  and their sizes, which is what the fetch-or-recompute decision needs.
* :meth:`KVPool.fetch` gets them in one MGET and decodes them into one cache. A value
  that is gone (evicted since the lookup), damaged, or not the block its key names ends the
  prefix there; a bad value's key is deleted. It never returns a wrong cache.
* :meth:`KVPool.store` writes blocks with ``SET NX`` (atomic: two writers of one block
  leave one whole value, never a mixed one) and a TTL.

Pipelines with a token selector are not pool pipelines: a selector decides what matters in
a whole context, and a block stored by itself would keep its own "sinks" and windows.

Tenants: ``tenant`` (a tag derived from the client's API key, or ``"shared"`` where the
deployment shares prefixes across tenants) is part of both the chain and the key, so one
tenant's prefix never serves another's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import TensorwireError, require
from ...kv import payload as kv_payload
from ...kv.pipeline import Pipeline, StreamDecoder
from ...kv.stage import KVCacheData, KVLayer
from ..auth import tenant_tag

__all__ = ["BlockStream", "KVPool", "PoolHit", "PoolStats", "clear_pool", "pipeline_tag", "pool_stats", "tenant_tag"]

log = logging.getLogger("tensorwire.serve.pool")

FORMAT = b"tensorwire-pool/1"
KEY_PREFIX = "tw:pool:"


def pipeline_tag(config: Mapping[str, Any]) -> str:
    """A short, stable name of a pipeline config (its canonical JSON, hashed)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:12]


@dataclass(frozen=True)
class PoolHit:
    """The longest stored prefix of a prompt: ``keys[i]`` holds block ``i``, ``sizes[i]`` its bytes."""

    block_tokens: int
    keys: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    pipelines: tuple[str, ...] = ()  # each block's pipeline tag

    @property
    def blocks(self) -> int:
        return len(self.keys)

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_tokens

    @property
    def nbytes(self) -> int:
        return int(sum(self.sizes))

    def truncated(self, blocks: int) -> PoolHit:
        return PoolHit(self.block_tokens, self.keys[:blocks], self.sizes[:blocks], self.pipelines[:blocks])

    def tail(self, first: int) -> PoolHit:
        """The blocks from block ``first`` on."""
        return PoolHit(self.block_tokens, self.keys[first:], self.sizes[first:], self.pipelines[first:])


@dataclass
class PoolStats:
    """Counters of one pool client (the worker's ``/metrics`` and ``tensorwire pool stats`` read them)."""

    lookups: int = 0
    hit_blocks: int = 0
    missed_blocks: int = 0
    fetched_bytes: int = 0
    stored_blocks: int = 0
    stored_bytes: int = 0
    stored_tokens: int = 0
    already_stored: int = 0
    bad_values: int = 0
    evicted_before_fetch: int = 0
    errors: int = 0
    decisions: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hit_blocks + self.missed_blocks
        return self.hit_blocks / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.stored_bytes / self.stored_tokens if self.stored_tokens else 0.0


class KVPool:
    """Prefix blocks of one model in one Redis (see the module docstring).

    Parameters
    ----------
    client : redis.Redis
        With its connection pool (``RedisServer.client()``).
    model_id, tokenizer_id : str
        What the chain's root covers: a block of another model or tokenizer is another key.
    pipelines : mapping of name to pipeline config
        What the pool stores with and looks up (selector-free; raw included as the caller wishes).
    expect : mapping
        The cache shape a stored value must have (``Engine.expect``).
    block_tokens : int
        Tokens per block.
    ttl_s : int
        Seconds a stored block lives (refreshed by nothing; Redis's eviction may end it sooner).
    """

    def __init__(self, client: Any, *, model_id: str, tokenizer_id: str, pipelines: Mapping[str, Mapping[str, Any]],
                 expect: Mapping[str, int], block_tokens: int = 256, ttl_s: int = 24 * 3600):  # fmt: skip
        if int(block_tokens) < 1:
            raise ValueError(f"block_tokens is >= 1, got {block_tokens!r}")
        for name, config in pipelines.items():
            if Pipeline.from_config(dict(config)).selector is not None:
                raise ValueError(f"pipeline {name!r} selects tokens; a pool block must keep all of its tokens")
        self.client = client
        self.model_id, self.tokenizer_id = model_id, tokenizer_id
        self.block_tokens = int(block_tokens)
        self.ttl_s = int(ttl_s)
        self.expect = dict(expect)
        self.pipelines = {name: dict(config) for name, config in pipelines.items()}
        self._tags = {pipeline_tag(config): name for name, config in self.pipelines.items()}
        self.stats = PoolStats()
        self._redis_errors = require("redis").RedisError

    # -- keys --------------------------------------------------------------------------------
    def chain(self, token_ids: Sequence[int], tenant: str) -> list[str]:
        """The hash of every full block of ``token_ids`` (block ``i``: the prefix through it)."""
        h = hashlib.sha256(b"\0".join([FORMAT, self.model_id.encode(), self.tokenizer_id.encode(), tenant.encode()]))
        digest = h.digest()
        out = []
        ids = np.asarray(token_ids, dtype="<i4")
        for i in range(len(ids) // self.block_tokens):
            digest = hashlib.sha256(digest + ids[i * self.block_tokens:(i + 1) * self.block_tokens].tobytes()).digest()
            out.append(digest.hex()[:40])
        return out

    def key(self, tenant: str, block_hash: str, tag: str) -> str:
        return f"{KEY_PREFIX}{tenant}:{block_hash}:{tag}"

    # -- lookup and fetch --------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int], tenant: str) -> PoolHit:
        """The longest prefix of full blocks stored under any pool pipeline (one round trip);
        no hit when Redis cannot be reached (the request prefills, as without a pool)."""
        try:
            return self._lookup(token_ids, tenant)
        except self._redis_errors as exc:
            self._failed("lookup", exc)
            return PoolHit(self.block_tokens)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        log.warning("pool %s failed (%s: %s); going on without the pool", what, type(exc).__name__, exc)

    def _lookup(self, token_ids: Sequence[int], tenant: str) -> PoolHit:
        self.stats.lookups += 1
        hashes = self.chain(token_ids, tenant)
        tags = list(self._tags)
        if not hashes or not tags:
            return PoolHit(self.block_tokens)
        pipe = self.client.pipeline(transaction=False)
        for h in hashes:
            for tag in tags:
                pipe.strlen(self.key(tenant, h, tag))
        sizes = pipe.execute()
        keys, found, used = [], [], []
        for i, h in enumerate(hashes):
            row = sizes[i * len(tags):(i + 1) * len(tags)]
            stored = [(int(n), tag) for n, tag in zip(row, tags) if int(n) > 0]
            if not stored:
                break
            n, tag = min(stored)  # the smallest copy: the fastest to fetch
            keys.append(self.key(tenant, h, tag))
            found.append(n)
            used.append(tag)
        self.stats.hit_blocks += len(keys)
        self.stats.missed_blocks += len(hashes) - len(keys)
        return PoolHit(self.block_tokens, tuple(keys), tuple(found), tuple(used))

    def fetch(self, hit: PoolHit) -> tuple[KVCacheData | None, PoolHit]:
        """The cache of ``hit``'s blocks (one MGET), and the part of ``hit`` it covers.

        The prefix ends at the first block that is gone, damaged, or not the block its key
        names (a damaged one's key is deleted): the caller prefills from there.
        """
        blocks, kept = self._read(hit, self._decode_block)
        return (concat(blocks) if blocks else None), kept

    def stream(self, hit: PoolHit, first_block: int = 0) -> tuple[BlockStream | None, PoolHit]:
        """Like :meth:`fetch`, but decoded layer by layer (:meth:`BlockStream.layers`), so that a
        consumer uses layer ``i`` while layer ``i + 1`` decodes. ``hit``'s first block is block
        ``first_block`` of the prompt. The prefix ends at the first block that is gone or whose
        header is bad; a layer that fails its checks later raises (and its key is deleted).
        """
        readers, kept = self._read(hit, lambda value, i: _BlockReader(value, first_block + i, self.block_tokens,
                                                                      self.expect))  # fmt: skip
        return (BlockStream(self, readers, kept) if readers else None), kept

    def _read(self, hit: PoolHit, read) -> tuple[list, PoolHit]:
        """``read(value, i)`` of each of ``hit``'s values (one MGET), up to the first that is gone or
        that ``read`` refuses (its key deleted); and the part of ``hit`` read."""
        if not hit.blocks:
            return [], hit
        try:
            values = self.client.mget(list(hit.keys))
        except self._redis_errors as exc:
            self._failed("fetch", exc)
            return [], hit.truncated(0)
        out = []
        for i, value in enumerate(values):
            if value is None:
                self.stats.evicted_before_fetch += 1
                break
            try:
                out.append(read(value, i))
            except (TensorwireError, ValueError) as exc:
                self._bad(hit.keys[i], exc)
                break
        kept = hit.truncated(len(out))
        self.stats.fetched_bytes += kept.nbytes
        return out, kept

    def _bad(self, key: str, exc: BaseException) -> None:
        self.stats.bad_values += 1
        log.warning("pool block %s is unusable (%s: %s); deleted, recomputed", key, type(exc).__name__, exc)
        try:
            self.client.delete(key)
        except self._redis_errors as gone:
            self._failed("delete", gone)

    def _decode_block(self, value: bytes, index: int) -> KVCacheData:
        data = Pipeline.decode_data(value, expect=self.expect)
        start, end = index * self.block_tokens, (index + 1) * self.block_tokens
        want = np.arange(start, end)
        for layer in data.layers:
            positions = layer.positions
            if positions.shape[-1] != self.block_tokens or not np.array_equal(positions[0, 0], want):
                raise ValueError(f"the value holds positions {positions[0, 0, :1].tolist()}..{positions.shape[-1]} tokens, "
                                 f"not block {index} (tokens {start}..{end - 1})")  # fmt: skip
        if data.seq_len != end:
            raise ValueError(f"the value continues at position {data.seq_len}, block {index} ends at {end}")
        return data

    # -- store ---------------------------------------------------------------------------------
    def store(self, token_ids: Sequence[int], cache: KVCacheData, tenant: str, pipeline: str,
              start_block: int = 0) -> int:  # fmt: skip
        """Store the full blocks of ``cache`` (the cache of ``token_ids``) from ``start_block``
        on, encoded with the pool pipeline ``pipeline``; returns the bytes written.

        A block already stored under that pipeline is left as it is (``SET NX``)."""
        config = self.pipelines[pipeline]
        tag = pipeline_tag(config)
        codec = Pipeline.from_config(config)
        hashes = self.chain(token_ids[:cache.seq_len], tenant)
        written = 0
        pipe = self.client.pipeline(transaction=False)
        sizes = []
        for i in range(start_block, len(hashes)):
            value = codec.encode(block_of(cache, i, self.block_tokens))
            pipe.set(self.key(tenant, hashes[i], tag), value, nx=True, ex=self.ttl_s)
            sizes.append(len(value))
        try:
            results = pipe.execute(raise_on_error=False)
        except self._redis_errors as exc:
            self._failed("store", exc)
            return 0
        for ok, size in zip(results, sizes):
            if isinstance(ok, Exception):  # e.g. OOM under a noeviction policy: the block is not stored
                self._failed("store", ok)
            elif ok:
                written += size
                self.stats.stored_blocks += 1
                self.stats.stored_tokens += self.block_tokens
                self.stats.stored_bytes += size
            else:
                self.stats.already_stored += 1
        return written

    def clear(self, tenant: str | None = None) -> int:
        """Delete every block (of ``tenant`` only, when given); returns how many."""
        return clear_pool(self.client, tenant)


class _BlockReader:
    """One stored block, its header checked, its layers decoded on demand."""

    def __init__(self, value: bytes, index: int, block_tokens: int, expect: Mapping[str, int]):
        view = memoryview(value).cast("B")
        header, at = kv_payload.read_header(view)
        end = (index + 1) * block_tokens
        if header["cache"]["seq_len"] != end or header["cache"]["kept"] != block_tokens:
            raise ValueError(f"the value holds {header['cache']['kept']} tokens up to position {header['cache']['seq_len']}, "
                             f"not block {index} (tokens {end - block_tokens}..{end - 1})")  # fmt: skip
        size = kv_payload.positions_size(header)
        self.decoder = StreamDecoder(header, view[at:at + size], dict(expect))
        self.bodies = kv_payload.layer_bodies(header, view, at + size)
        self.want = np.arange(end - block_tokens, end)

    def next_layer(self) -> KVLayer:
        _, table, body = next(self.bodies)
        layer = self.decoder.add_layer(table, body)
        if not np.array_equal(layer.positions[0, 0], self.want):
            raise ValueError(f"the value holds positions {layer.positions[0, 0, :1].tolist()}.., not {self.want[0]}..")
        return layer


class BlockStream:
    """Consecutive stored blocks, decoded one layer (of every block) at a time (:meth:`KVPool.stream`)."""

    def __init__(self, pool: KVPool, readers: list[_BlockReader], hit: PoolHit):
        self.pool, self.readers, self.hit = pool, readers, hit

    def layers(self) -> Iterator[KVLayer]:
        """Each layer of the blocks as one :class:`KVLayer`; a damaged block raises (its key deleted)."""
        for _ in range(self.readers[0].decoder.header["cache"]["n_layers"]):
            parts = []
            for reader, key in zip(self.readers, self.hit.keys):
                try:
                    parts.append(reader.next_layer())
                except (TensorwireError, ValueError) as exc:
                    self.pool._bad(key, exc)
                    raise
            yield KVLayer(np.concatenate([p.keys for p in parts], axis=2), np.concatenate([p.values for p in parts], axis=2),
                          np.concatenate([p.positions for p in parts], axis=2))  # fmt: skip


def _pool_keys(client: Any, tenant: str | None = None):
    return client.scan_iter(match=f"{KEY_PREFIX}{tenant}:*" if tenant else f"{KEY_PREFIX}*", count=1000)


def clear_pool(client: Any, tenant: str | None = None) -> int:
    """Delete every pool block in ``client``'s Redis (of ``tenant`` only, when given); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in _pool_keys(client, tenant):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch.clear()
    if batch:
        deleted += client.delete(*batch)
    return deleted


def pool_stats(client: Any, block_tokens: int | None = None) -> dict[str, Any]:
    """What the pool's Redis holds: blocks and their bytes (in all and per pipeline tag),
    tenants, memory, evictions, hits."""
    tenants: set[str] = set()
    by_pipeline: dict[str, dict[str, int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.strlen(key)
        for key, n in zip(batch, pipe.execute()):
            tag = by_pipeline.setdefault(key.decode().rsplit(":", 1)[1], {"blocks": 0, "stored_bytes": 0})
            tag["blocks"] += 1
            tag["stored_bytes"] += int(n)
        batch.clear()

    for key in _pool_keys(client):
        tenants.add(key.decode().split(":")[2])
        batch.append(key)
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    blocks = sum(t["blocks"] for t in by_pipeline.values())
    stored = sum(t["stored_bytes"] for t in by_pipeline.values())
    memory, stats = client.info("memory"), client.info("stats")
    out = {"blocks": blocks, "stored_bytes": stored, "tenants": len(tenants), "by_pipeline": by_pipeline,
           "used_memory": int(memory["used_memory"]), "maxmemory": int(memory.get("maxmemory", 0)),
           "maxmemory_policy": memory.get("maxmemory_policy"), "evicted_keys": int(stats.get("evicted_keys", 0)),
           "keyspace_hits": int(stats.get("keyspace_hits", 0)), "keyspace_misses": int(stats.get("keyspace_misses", 0))}  # fmt: skip
    if block_tokens and blocks:
        out["bytes_per_token"] = stored / (blocks * block_tokens)
    return out


def block_of(cache: KVCacheData, index: int, block_tokens: int) -> KVCacheData:
    """Block ``index`` of a full (unselected) cache: its tokens' keys, values and positions."""
    lo, hi = index * block_tokens, (index + 1) * block_tokens
    layers = [KVLayer(np.ascontiguousarray(layer.keys[:, :, lo:hi]), np.ascontiguousarray(layer.values[:, :, lo:hi]),
                      np.ascontiguousarray(layer.positions[:, :, lo:hi])) for layer in cache.layers]  # fmt: skip
    return KVCacheData(layers, seq_len=hi, dtype=cache.dtype)


def concat(blocks: Sequence[KVCacheData]) -> KVCacheData:
    """Consecutive blocks as one cache."""
    layers = []
    for parts in zip(*(b.layers for b in blocks)):
        layers.append(KVLayer(np.concatenate([p.keys for p in parts], axis=2), np.concatenate([p.values for p in parts], axis=2),
                              np.concatenate([p.positions for p in parts], axis=2)))  # fmt: skip
    return KVCacheData(layers, seq_len=blocks[-1].seq_len, dtype=blocks[0].dtype)
