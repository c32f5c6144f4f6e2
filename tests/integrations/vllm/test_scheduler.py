"""SchedulerSide without vLLM: what it answers vLLM's scheduler and what it hands the worker.

The pool is a real Redis (started here); vLLM's request and scheduler-output objects are
stood in for by plain namespaces with the attributes the connector reads.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("redis")

from tensorwire.integrations.vllm.scheduler import SchedulerSide, WorkerReport  # noqa: E402
from tensorwire.kv.presets import PRESETS  # noqa: E402
from tensorwire.kv.stage import KVCacheData, KVLayer  # noqa: E402
from tensorwire.data import SMOLLM2_LIBRARY  # noqa: E402
from tensorwire.kv.profiles import ProfileLibrary  # noqa: E402
from tensorwire.serve.pool import KVPool, RedisServer  # noqa: E402
from tensorwire.serve.pool.session import PoolSession, pool_library  # noqa: E402

SHAPE = {"n_layers": 2, "kv_heads": 1, "head_dim": 4, "max_batch": 1, "max_seq_len": 4096}
VLLM_BLOCK, POOL_BLOCK = 16, 32


@pytest.fixture(scope="module")
def server():
    with RedisServer(maxmemory="64mb") as s:
        yield s


@pytest.fixture
def pool(server):
    p = KVPool(server.client(), model_id="m", tokenizer_id="t", pipelines={"raw": PRESETS["bf16"]}, expect=SHAPE,
               block_tokens=POOL_BLOCK)  # fmt: skip
    p.clear()
    return p


def cache_of(tokens: int) -> KVCacheData:
    rng = np.random.default_rng(0)
    shape = (1, 1, tokens, 4)
    positions = np.broadcast_to(np.arange(tokens), shape[:3]).copy()
    return KVCacheData([KVLayer(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32),
                                positions) for _ in range(2)], seq_len=tokens)  # fmt: skip


def side(pool, initial_bandwidth_bps: float = 1e9, **kwargs) -> SchedulerSide:
    session = PoolSession(pool, pool_library(ProfileLibrary.load(SMOLLM2_LIBRARY)), raw_pipeline=PRESETS["bf16"], raw_decode_bps=1e9,
                          initial_bandwidth_bps=initial_bandwidth_bps, bytes_per_token=2 * 2 * 4 * 2)  # fmt: skip
    return SchedulerSide(block_size=VLLM_BLOCK, session=session, **kwargs)


def matched(s: SchedulerSide, request_id: str, prompt: list[int], computed: int = 0):
    """Ask as vLLM's scheduler does, step after step, until the lookup has answered."""
    deadline = time.monotonic() + 10
    while (answer := s.matched(request_id, prompt, computed, None))[0] is None:
        assert time.monotonic() < deadline, "the lookup never answered"
        time.sleep(0.01)
    return answer


def output(new=(), cached=None, scheduled=None, finished=()):
    cached = cached or SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached, num_scheduled_tokens=scheduled or {},
                           finished_req_ids=set(finished))  # fmt: skip


def test_the_first_answer_is_ask_again_and_a_miss_loads_nothing(pool):
    s = side(pool)
    assert s.matched("r1", list(range(100)), 0, None) == (None, False)  # the lookup runs in a thread
    assert matched(s, "r1", list(range(100))) == (0, False)
    assert pool.stats.decisions == {"miss": 1}


def test_a_stored_prefix_is_loaded_in_whole_vllm_blocks_leaving_the_last_token(pool):
    prompt = list(range(5 * POOL_BLOCK + 1))  # 5 pool blocks and the last token
    pool.store(prompt, cache_of(5 * POOL_BLOCK), "shared", "raw")
    s = side(pool)
    assert matched(s, "r", prompt) == (5 * POOL_BLOCK, False)
    s.allocated("r", prompt, list(range(100, 111)), 5 * POOL_BLOCK, None)
    meta = s.build(output(new=[SimpleNamespace(req_id="r", block_ids=(list(range(100, 111)),), num_computed_tokens=0)],
                          scheduled={"r": 1}))  # fmt: skip
    (load,) = meta.loads
    assert (load.start, load.end, load.block_ids) == (0, 160, list(range(100, 110)))
    assert load.pool.blocks == 5 and load.pool_first == 0
    assert meta.saves == []  # everything but the last token was stored already
    assert meta.prefill_tokens == 1 and meta.prefill_only


def test_a_local_prefix_hit_loads_only_the_rest(pool):
    prompt = list(range(4 * POOL_BLOCK + 3))
    pool.store(prompt, cache_of(4 * POOL_BLOCK), "shared", "raw")
    s = side(pool)
    assert matched(s, "r", prompt, computed=48) == (128 - 48, False)  # vLLM holds 3 of its blocks already
    s.allocated("r", prompt, list(range(20)), 128 - 48, None)
    (load,) = s.build(output(scheduled={})).loads
    assert (load.start, load.end, load.block_ids, load.pool_first) == (48, 128, [3, 4, 5, 6, 7], 1)
    assert load.pool.blocks == 3


def test_a_finished_prompt_is_saved_once_with_its_blocks_and_tenant(pool):
    s = side(pool, store="raw")
    prompt = list(range(3 * POOL_BLOCK + 5))
    assert matched(s, "r", prompt) == (0, False)
    s.allocated("r", prompt, [7, 8, 9, 10, 11, 12, 13], 0, {"tenant": "alice", "tensorwire": {"max_ppl_increase": 0.01}})
    new = SimpleNamespace(req_id="r", block_ids=([7, 8, 9, 10],), num_computed_tokens=0)
    first = s.build(output(new=[new], scheduled={"r": 64}))  # chunked prefill: not done yet
    assert first.saves == [] and first.prefill_tokens == 64
    cached = SimpleNamespace(req_ids=["r"], new_block_ids=[([11, 12, 13],)], num_computed_tokens=[64], resumed_req_ids=set())
    (save,) = s.build(output(cached=cached, scheduled={"r": len(prompt) - 64})).saves
    assert (save.start, save.end, save.tenant, save.store) == (0, 3 * POOL_BLOCK, "alice", "raw")
    assert save.block_ids == [7, 8, 9, 10, 11, 12] and save.budget[0] == 0.01
    decode = SimpleNamespace(req_ids=["r"], new_block_ids=[None], num_computed_tokens=[len(prompt)], resumed_req_ids=set())
    later = s.build(output(cached=decode, scheduled={"r": 1}))
    assert later.saves == [] and not later.prefill_only  # a decode step does not measure prefill


def test_a_producer_saves_for_its_decode_instance_and_a_consumer_loads_asynchronously():
    producer = SchedulerSide(block_size=VLLM_BLOCK, role="producer")
    prompt = list(range(50))
    assert producer.matched("r", prompt, 0, None) == (0, False)
    producer.allocated("r", prompt, [1, 2, 3, 4], 0, {"tensorwire": {"compression": "lossless"}})
    (save,) = producer.build(output(new=[SimpleNamespace(req_id="r", block_ids=([1, 2, 3, 4],), num_computed_tokens=0)],
                                    scheduled={"r": 50})).saves  # fmt: skip
    assert (save.store, save.end, save.block_ids, save.compression) == ("transfer", 48, [1, 2, 3], "lossless")

    consumer = SchedulerSide(block_size=VLLM_BLOCK, role="consumer")
    transfer = {"host": "127.0.0.1", "port": 1, "id": "r", "tokens": 48}
    assert consumer.matched("d", prompt, 0, {"tensorwire_transfer": transfer}) == (48, True)
    consumer.allocated("d", prompt, [5, 6, 7, 8], 48, {"tensorwire_transfer": transfer})
    (load,) = consumer.build(output()).loads
    assert (load.transfer, load.block_ids, load.start, load.end) == (transfer, [5, 6, 7], 0, 48)
    # vLLM asks again only when the load failed and it recomputes: no second load, no retry loop
    assert consumer.matched("d", prompt, 0, {"tensorwire_transfer": transfer}) == (0, False)


def test_the_plan_learns_the_prefill_speed_and_recomputes_when_fetching_would_be_slower(pool):
    prompt = list(range(2 * POOL_BLOCK + 1))
    pool.store(prompt, cache_of(2 * POOL_BLOCK), "shared", "raw")
    s = side(pool, initial_bandwidth_bps=1.0)  # a pool link of 1 byte/s: recomputing is faster
    s.observe(WorkerReport(prefill_tokens=1000, prefill_s=0.5))
    assert matched(s, "r", prompt) == (0, False) and pool.stats.decisions == {"recompute": 1}
