"""The KV pool on a real Redis server (started and stopped here): keys, hits, integrity, tenants, faults.

The caches are synthetic (shape and positions are what is checked, not compression ratios).
"""

from __future__ import annotations

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from tensorwire.kv.presets import PRESETS  # noqa: E402
from tensorwire.kv.stage import KVCacheData, KVLayer  # noqa: E402
from tensorwire.serve.pool import KVPool, RedisServer, pipeline_tag, tenant_tag  # noqa: E402

SHAPE = {"n_layers": 2, "kv_heads": 3, "head_dim": 8, "max_batch": 1, "max_seq_len": 4096}
BLOCK = 16
PIPELINES = {"lossless": PRESETS["lossless"], "kivi-4": PRESETS["kivi-4"]}


def cache_of(tokens: int, seed: int = 0) -> KVCacheData:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(SHAPE["n_layers"]):
        shape = (1, SHAPE["kv_heads"], tokens, SHAPE["head_dim"])
        positions = np.broadcast_to(np.arange(tokens), shape[:3]).copy()
        layers.append(KVLayer(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32),
                              positions))  # fmt: skip
    return KVCacheData(layers, seq_len=tokens)


@pytest.fixture(scope="module")
def server():
    with RedisServer(maxmemory="64mb") as s:
        yield s


@pytest.fixture
def pool(server):
    p = KVPool(server.client(), model_id="test-model", tokenizer_id="test-tok", pipelines=PIPELINES, expect=SHAPE,
               block_tokens=BLOCK)  # fmt: skip
    p.clear()
    return p


def test_server_needs_its_password_and_is_configured_as_a_cache(server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=server.host, port=server.port).ping()
    client = server.client()
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    assert int(client.config_get("maxmemory")["maxmemory"]) == 64 << 20
    assert client.config_get("save")["save"] == "" and client.config_get("bind")["bind"] == "127.0.0.1"


def test_the_longest_stored_prefix_is_found_and_fetched_bit_exactly(pool):
    ids = list(range(1000, 1000 + 5 * BLOCK + 7))  # 5 full blocks and a partial one
    cache = cache_of(len(ids))
    assert pool.lookup(ids, "t").blocks == 0
    written = pool.store(ids, cache, "t", "lossless")
    assert written > 0 and pool.stats.stored_blocks == 5
    hit = pool.lookup(ids, "t")
    assert hit.blocks == 5 and hit.tokens == 5 * BLOCK and all(n > 0 for n in hit.sizes)
    data, kept = pool.fetch(hit)
    assert kept == hit and data.seq_len == 5 * BLOCK
    for got, want in zip(data.layers, cache.layers):
        np.testing.assert_array_equal(got.keys, want.keys[:, :, : 5 * BLOCK])
        np.testing.assert_array_equal(got.values, want.values[:, :, : 5 * BLOCK])
        np.testing.assert_array_equal(got.positions, want.positions[:, :, : 5 * BLOCK])


def test_a_prompt_that_diverges_hits_only_the_blocks_before(pool):
    ids = list(range(4 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    other = list(ids)
    other[2 * BLOCK + 3] += 1  # block 2 differs: blocks 2 and 3 are another prefix
    assert pool.lookup(other, "t").blocks == 2
    assert pool.lookup(ids[: 3 * BLOCK - 1], "t").blocks == 2  # only full blocks count


def test_another_tenant_gets_no_hit(pool):
    ids = list(range(3 * BLOCK))
    alice, bob = tenant_tag("sk-alice"), tenant_tag("sk-bob")
    assert alice != bob and "sk-alice" not in alice
    pool.store(ids, cache_of(len(ids)), alice, "lossless")
    assert pool.lookup(ids, alice).blocks == 3
    assert pool.lookup(ids, bob).blocks == 0


def test_the_smallest_copy_is_chosen_and_a_second_store_changes_nothing(pool):
    ids = list(range(2 * BLOCK))
    cache = cache_of(len(ids))
    pool.store(ids, cache, "t", "lossless")
    pool.store(ids, cache, "t", "kivi-4")
    hit = pool.lookup(ids, "t")
    for h, size, key in zip(pool.chain(ids, "t"), hit.sizes, hit.keys):
        copies = {pool.key("t", h, pipeline_tag(c)): pool.client.strlen(pool.key("t", h, pipeline_tag(c)))
                  for c in PIPELINES.values()}  # fmt: skip
        assert len(copies) == 2 and size == min(copies.values()) == copies[key]
    assert set(hit.pipelines) == {pipeline_tag(PIPELINES["kivi-4"])}  # 4-bit codes are the smaller copy
    before = pool.stats.stored_blocks
    assert pool.store(ids, cache, "t", "kivi-4") == 0  # SET NX: already there
    assert pool.stats.stored_blocks == before and pool.stats.already_stored == 2


def test_a_damaged_value_ends_the_prefix_and_is_deleted(pool):
    ids = list(range(4 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    value = bytearray(pool.client.get(hit.keys[2]))
    value[len(value) // 2] ^= 0x40
    pool.client.set(hit.keys[2], bytes(value))
    data, kept = pool.fetch(hit)
    assert kept.blocks == 2 and data.seq_len == 2 * BLOCK
    assert pool.client.exists(hit.keys[2]) == 0 and pool.stats.bad_values == 1


def test_a_truncated_value_or_another_blocks_value_is_refused(pool):
    ids = list(range(3 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    pool.client.set(hit.keys[0], pool.client.get(hit.keys[0])[:-10])
    assert pool.fetch(hit)[1].blocks == 0
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    pool.client.set(hit.keys[1], pool.client.get(hit.keys[2]))  # a valid payload, of block 2
    data, kept = pool.fetch(hit)
    assert kept.blocks == 1 and data.seq_len == BLOCK


def test_a_block_evicted_between_lookup_and_fetch_ends_the_prefix(pool):
    ids = list(range(3 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    pool.client.delete(hit.keys[1])
    data, kept = pool.fetch(hit)
    assert kept.blocks == 1 and pool.stats.evicted_before_fetch == 1


def test_a_full_pool_evicts_and_never_fails_a_store():
    with RedisServer(maxmemory="3mb") as small:
        pool = KVPool(small.client(), model_id="m", tokenizer_id="t", pipelines=PIPELINES, expect=SHAPE, block_tokens=256)
        for seed in range(12):  # about 0.75 MB per prompt: three times the memory in all
            ids = list(range(seed * 10_000, seed * 10_000 + 2048))
            pool.store(ids, cache_of(2048, seed), "t", "lossless")
        assert pool.stats.errors == 0 and pool.stats.stored_blocks == 12 * 8
        assert pool.lookup(list(range(110_000, 112_048)), "t").blocks == 8  # the newest is kept
        assert int(small.client().info("stats")["evicted_keys"]) > 0


def test_redis_down_means_no_hit_and_no_error():
    server = RedisServer().start()
    pool = KVPool(server.client(), model_id="m", tokenizer_id="t", pipelines=PIPELINES, expect=SHAPE, block_tokens=BLOCK)
    ids = list(range(2 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    server.stop()
    assert pool.lookup(ids, "t").blocks == 0
    assert pool.fetch(hit) == (None, hit.truncated(0))
    assert pool.store(ids, cache_of(len(ids)), "t", "lossless") == 0
    assert pool.stats.errors == 3


def test_a_pipeline_that_selects_tokens_is_not_a_pool_pipeline(server):
    with pytest.raises(ValueError, match="selects tokens"):
        KVPool(server.client(), model_id="m", tokenizer_id="t", pipelines={"s": PRESETS["streaming-0.5"]}, expect=SHAPE)


def test_the_pool_command_reports_and_clears(server, pool, tmp_path, capsys):
    import json

    from tensorwire.cli import main

    ids = list(range(3 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    secret = tmp_path / "pool-password"
    secret.write_text(server.password)
    url = f"redis://{server.host}:{server.port}"
    assert main(["pool", "stats", "--url", url, "--password-file", str(secret), "--block-tokens", str(BLOCK), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["blocks"] == 3 and stats["tenants"] == 1 and stats["stored_bytes"] == pool.stats.stored_bytes
    assert stats["by_pipeline"] == {pipeline_tag(PIPELINES["lossless"]): {"blocks": 3, "stored_bytes": pool.stats.stored_bytes}}
    assert stats["bytes_per_token"] == pytest.approx(pool.stats.stored_bytes / (3 * BLOCK))
    assert main(["pool", "clear", "--url", url, "--password-file", str(secret)]) == 0
    assert "deleted 3 blocks" in capsys.readouterr().out and pool.lookup(ids, "t").blocks == 0
    assert main(["pool", "stats", "--url", url]) == 1  # no password: a named error, not a traceback
    assert "BackendUnavailable" in capsys.readouterr().err


def test_a_redis_in_a_shaped_namespace_is_read_at_the_link_rate():
    from tensorwire.control.latency_model import gbps
    from tensorwire.serve.transport import Netns, kernel_shaping_status

    allowed, why = kernel_shaping_status()
    if not allowed:
        pytest.skip(f"tc tbf is not allowed here: {why}")
    import time

    with Netns() as ns:
        ns.shape(gbps(0.1))
        with RedisServer(netns=ns.name) as shaped:
            client = shaped.client()
            client.set("k", b"x" * 2_000_000)
            began = time.perf_counter()
            assert len(client.get("k")) == 2_000_000
            seconds = time.perf_counter() - began
    assert seconds > 0.5 * 2_000_000 / gbps(0.1)  # never faster than the link allows (0.16 s at 0.1 Gbit/s)


def test_a_session_refuses_unknown_pool_controls(pool):
    from tensorwire.data import SMOLLM2_LIBRARY
    from tensorwire.kv.profiles import ProfileLibrary
    from tensorwire.serve.pool.session import PoolSession, pool_library

    session = PoolSession(pool, pool_library(ProfileLibrary.load(SMOLLM2_LIBRARY)), raw_pipeline=PRESETS["bf16"],
                          raw_decode_bps=1e9, initial_bandwidth_bps=1e9, bytes_per_token=96)  # fmt: skip
    for ok in ("auto", "none", "lossless", "kivi-4"):
        session.check_store_profile(ok)
    with pytest.raises(ValueError, match="pool store 'zip' is not auto, none or one of the pool's"):
        session.check_store_profile("zip")
    with pytest.raises(ValueError, match="pool fetch is one of"):
        session.prefix(list(range(100)), "t", fetch="sometimes")
    assert session.prefix(list(range(100)), "t", fetch="never") == (None, {"hit_tokens": 0, "decision": "off",
                                                                           "reason": "the request does not read the pool"})  # fmt: skip


def test_a_payload_of_another_format_version_is_refused_and_deleted(pool):
    ids = list(range(2 * BLOCK))
    pool.store(ids, cache_of(len(ids)), "t", "lossless")
    hit = pool.lookup(ids, "t")
    value = bytearray(pool.client.get(hit.keys[1]))
    value[8:10] = (99).to_bytes(2, "little")  # the payload's version field (docs/FORMAT.md section 6)
    pool.client.set(hit.keys[1], bytes(value))
    data, kept = pool.fetch(hit)
    assert kept.blocks == 1 and data.seq_len == BLOCK
    assert pool.client.exists(hit.keys[1]) == 0 and pool.stats.bad_values == 1


def test_redis_down_at_start_killed_and_restarted_is_used_again_once_back():
    from tensorwire.serve.pool.server import _free_port, redis_client

    port, password = _free_port("127.0.0.1", None), "pool-restart-test"
    client = redis_client("127.0.0.1", port, password)  # one client (and its connection pool) throughout
    pool = KVPool(client, model_id="m", tokenizer_id="t", pipelines=PIPELINES, expect=SHAPE, block_tokens=BLOCK)
    ids = list(range(3 * BLOCK))
    cache = cache_of(len(ids))
    assert pool.lookup(ids, "t").blocks == 0 and pool.store(ids, cache, "t", "lossless") == 0  # down at start
    for life in range(2):
        server = RedisServer(port=port, password=password).start()
        try:
            assert pool.lookup(ids, "t").blocks == 0  # no persistence: a restarted pool is empty
            assert pool.store(ids, cache, "t", "lossless") > 0
            data, kept = pool.fetch(pool.lookup(ids, "t"))
            assert kept.blocks == 3 and np.array_equal(data.layers[1].values, cache.layers[1].values)
        finally:
            server.proc.kill()  # SIGKILL mid-run, as a crash would
            server.stop()
        assert pool.lookup(ids, "t").blocks == 0 and pool.fetch(kept) == (None, kept.truncated(0))
    assert pool.stats.errors == 2 + 2 * 2


def _store_concurrently(port: int, password: str, barrier, results) -> None:
    from tensorwire.serve.pool.server import redis_client

    pool = KVPool(redis_client("127.0.0.1", port, password), model_id="m", tokenizer_id="t", pipelines=PIPELINES,
                  expect=SHAPE, block_tokens=BLOCK)  # fmt: skip
    ids = list(range(8 * BLOCK))
    cache = cache_of(len(ids), seed=7)
    barrier.wait()
    pool.store(ids, cache, "t", "lossless")
    results.put((pool.stats.stored_blocks, pool.stats.already_stored, pool.stats.errors))


def test_two_processes_storing_the_same_blocks_leave_one_whole_value_each(server):
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # the workers are separate processes with their own clients
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_store_concurrently, args=(server.port, server.password, barrier, results))
               for _ in range(2)]  # fmt: skip
    server.client().flushdb()
    for w in workers:
        w.start()
    counts = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    assert all(errors == 0 for _, _, errors in counts)
    assert sum(stored for stored, _, _ in counts) == 8 and sum(already for _, already, _ in counts) == 8  # each block won once
    pool = KVPool(server.client(), model_id="m", tokenizer_id="t", pipelines=PIPELINES, expect=SHAPE, block_tokens=BLOCK)
    ids, cache = list(range(8 * BLOCK)), cache_of(8 * BLOCK, seed=7)
    data, kept = pool.fetch(pool.lookup(ids, "t"))
    assert kept.blocks == 8 and pool.stats.bad_values == 0
    for got, want in zip(data.layers, cache.layers):
        assert np.array_equal(got.keys, want.keys) and np.array_equal(got.values, want.values)


def test_a_stream_yields_each_layer_of_the_blocks_and_a_damaged_layer_raises_and_is_deleted(pool):
    from tensorwire.errors import TensorwireError

    ids = list(range(4 * BLOCK))
    cache = cache_of(len(ids))
    pool.store(ids, cache, "t", "lossless")
    hit = pool.lookup(ids, "t")
    stream, kept = pool.stream(hit.tail(1), first_block=1)
    layers = list(stream.layers())
    assert kept.blocks == 3 and len(layers) == SHAPE["n_layers"]
    for got, want in zip(layers, cache.layers):
        assert np.array_equal(got.keys, want.keys[:, :, BLOCK:]) and np.array_equal(got.positions[0, 0], np.arange(BLOCK, 4 * BLOCK))

    value = bytearray(pool.client.get(hit.keys[2]))
    value[-5] ^= 0x01  # inside the last layer's body: the header reads, the layer's checksum does not
    pool.client.set(hit.keys[2], bytes(value))
    stream, kept = pool.stream(hit)
    assert kept.blocks == 4
    with pytest.raises(TensorwireError):
        list(stream.layers())
    assert pool.client.exists(hit.keys[2]) == 0 and pool.stats.bad_values == 1
    assert pool.stream(hit)[1].blocks == 2  # the block is gone now: the prefix ends before it

