"""The KV pool in a real deployment: worker processes, a real Redis, the offline SmolLM2.

A prompt served once is stored in blocks after its answer; the same prefix asked again is
fetched instead of prefilled (at the right RoPE positions: the answer matches local
generation), another tenant's request finds nothing, and a pool that goes away costs only
the prefill it would have saved.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tensorwire.data import SAMPLE_TEXT
from tensorwire.demo import KV_QUESTION
from tensorwire.serve.auth import tenant_tag
from tensorwire.serve.cluster import Cluster, ClusterConfig
from tensorwire.serve.engine import Engine, SamplingParams
from tensorwire.serve.http.backend import GenerationRequest, KVOptions, Prefilled, Tokens

pytestmark = pytest.mark.timeout(600)

BLOCK = 128
SAMPLING = SamplingParams(max_tokens=8, temperature=0)
LOSSLESS_BUDGET = KVOptions(compression="raw", max_ppl_increase=0.0, max_retrieval_drop=0.0)


@pytest.fixture(scope="module")
def cluster(smollm2):
    config = ClusterConfig(gbps=None, shaper="none", pool=True, pool_block_tokens=BLOCK, pool_gbps=10.0,
                           pool_maxmemory="256mb", start_timeout_s=400)  # fmt: skip
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine(*smollm2)


def serve(cluster, engine, ids, tenant: str, request_id: str):
    async def collect():
        request = GenerationRequest(request_id, tuple(ids), SAMPLING, LOSSLESS_BUDGET, tenant=tenant)
        return [e async for e in cluster.backend(engine.tokenizer).generate(request)]

    events = asyncio.run(collect())
    prefilled = next(e for e in events if isinstance(e, Prefilled))
    return prefilled, [t for e in events if isinstance(e, Tokens) for t in e.token_ids]


def wait_for_blocks(client, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = len(list(client.scan_iter(match="tw:pool:*")))
        if n >= at_least:
            return n
        time.sleep(0.2)
    return len(list(client.scan_iter(match="tw:pool:*")))


def test_a_stored_prefix_is_fetched_not_prefilled_and_the_answer_is_unchanged(cluster, engine):
    ids = engine.tokenizer(SAMPLE_TEXT.read_text() + KV_QUESTION).input_ids
    blocks = (len(ids) - 1) // BLOCK
    assert blocks >= 4
    local = list(engine.generate(engine.prefill(ids), ids[-1], SAMPLING))
    alice = tenant_tag("sk-alice")

    first, cold = serve(cluster, engine, ids, alice, "pool-1")
    assert first.pool["decision"] == "miss" and first.pool["hit_tokens"] == 0
    assert wait_for_blocks(cluster.pool_client(), blocks) >= blocks  # stored after the answer, off the request path

    second, warm = serve(cluster, engine, ids, alice, "pool-2")
    assert second.pool["decision"] == "fetch", second.pool
    assert second.pool["fetched_tokens"] == blocks * BLOCK and second.pool["fetched_bytes"] > 0
    assert second.timings["prefill_s"] < first.timings["prefill_s"] / 2
    assert cold == local and warm == local

    other, _ = serve(cluster, engine, ids, tenant_tag("sk-bob"), "pool-3")
    assert other.pool["hit_tokens"] == 0  # another tenant: no hit on alice's prefix


def test_a_pool_that_went_away_costs_only_the_prefill(cluster, engine):
    ids = engine.tokenizer(SAMPLE_TEXT.read_text()[:2000] + KV_QUESTION).input_ids
    local = list(engine.generate(engine.prefill(ids), ids[-1], SAMPLING))
    cluster.redis.stop()
    prefilled, tokens = serve(cluster, engine, ids, "anonymous", "pool-down")
    assert prefilled.pool["hit_tokens"] == 0 and tokens == local
