"""TensorwireConnector inside a real vLLM engine (the CPU build), with a real Redis pool.

Runs in the vLLM environment (``scripts/setup-vllm.sh`` makes ``.venv-vllm``; ``.ci/run``
runs this folder there). Elsewhere it is skipped, saying so.

A prompt served once is stored in the pool after its prefill; the same prompt again is
loaded from the pool (vLLM computes only its last tokens) and, stored losslessly, the
greedy answer is token-identical to the first; a damaged stored block or a pool that went away is
recomputed by vLLM and the answer is still the same.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("vllm", reason="vLLM lives in its own environment: bash scripts/setup-vllm.sh, then "
                    ".venv-vllm/bin/python -m pytest tests/integrations/vllm")  # fmt: skip

from tensorwire.data import SAMPLE_TEXT  # noqa: E402
from tensorwire.serve.pool import RedisServer, pool_stats  # noqa: E402

pytestmark = pytest.mark.timeout(900)

POOL_BLOCK = 256
QUESTION = "\n\nQuestion: in one sentence, what is this text about?\nAnswer: The text is about"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer(maxmemory="1gb") as server:
        yield server


@pytest.fixture(scope="module")
def llm(redis_server, tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from tensorwire.models import smollm2_folder

    password = tmp_path_factory.mktemp("pool") / "password"
    password.write_text(redis_server.password)
    engine = LLM(model=str(smollm2_folder()), dtype="float32", enforce_eager=True, max_model_len=4096,
                 enable_prefix_caching=False,  # every reuse must come through the connector
                 kv_transfer_config={"kv_connector": "TensorwireConnector",
                                     "kv_connector_module_path": "tensorwire.integrations.vllm.connector",
                                     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                     "kv_connector_extra_config": {"pool": {
                                         "url": f"redis://127.0.0.1:{redis_server.port}", "password_file": str(password),
                                         "block_tokens": POOL_BLOCK, "store": "lossless"}}})  # fmt: skip
    yield engine
    engine.llm_engine.engine_core.shutdown()


def generate(llm, prompt: str, store: str | None = None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=16,
                            extra_args={"kv_transfer_params": {"tensorwire": {"pool_store": store}}} if store else None)
    began = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out, time.perf_counter() - began


def wait_for_blocks(client, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = pool_stats(client)["blocks"]
        if n >= at_least:
            return n
        time.sleep(0.2)
    return pool_stats(client)["blocks"]


def test_the_real_kernel_layout_is_mapped():
    import torch

    from tensorwire.integrations.vllm.connector import _vllm_cache_writer
    from tensorwire.integrations.vllm.layout import TileLayout

    cache = torch.zeros((4, 3, 128, 128), dtype=torch.float32)
    layout = TileLayout.probe(_vllm_cache_writer(cache), block_size=128, kv_heads=3, head_dim=64, dtype=torch.float32)
    keys, values = torch.randn(256, 3, 64), torch.randn(256, 3, 64)
    writer = _vllm_cache_writer(cache)
    writer(keys, values, cache, torch.tensor([3 * 128 + t for t in range(128)] + [1 * 128 + t for t in range(128)]))
    got_k, got_v = layout.read(cache, [3, 1])
    assert torch.equal(got_k, keys.permute(1, 0, 2)) and torch.equal(got_v, values.permute(1, 0, 2))


def test_a_stored_prompt_is_loaded_from_the_pool_and_the_answer_is_token_identical(llm, redis_server):
    client = redis_server.client()
    client.flushdb()
    prompt = SAMPLE_TEXT.read_text()[:4000] + QUESTION
    first, out1, cold_s = generate(llm, prompt)
    blocks = (len(out1.prompt_token_ids) - 1) // POOL_BLOCK
    assert blocks >= 2 and wait_for_blocks(client, blocks) == blocks
    stats = pool_stats(client, POOL_BLOCK)
    assert 0 < stats["bytes_per_token"] < 30 * 2 * 3 * 64 * 4  # bit-exact, smaller than vLLM's float32 cache

    hits = int(client.info("stats")["keyspace_hits"])
    second, out2, warm_s = generate(llm, prompt)
    assert int(client.info("stats")["keyspace_hits"]) > hits  # the blocks were read
    assert second == first, "a lossless pool load must not change the greedy answer"
    print(f"\ncold {cold_s:.2f} s, from the pool {warm_s:.2f} s, {blocks * POOL_BLOCK} of "
          f"{len(out1.prompt_token_ids)} tokens loaded; cached tokens reported by vLLM: {out2.num_cached_tokens}")


def test_a_damaged_block_and_a_pool_that_went_away_are_recomputed(llm, redis_server):
    client = redis_server.client()
    client.flushdb()
    prompt = SAMPLE_TEXT.read_text()[2000:5500] + QUESTION
    reference, out, _ = generate(llm, prompt)
    blocks = (len(out.prompt_token_ids) - 1) // POOL_BLOCK
    assert wait_for_blocks(client, blocks) == blocks
    key = sorted(client.scan_iter(match="tw:pool:*"))[0]
    value = bytearray(client.get(key))
    value[-100] ^= 0x10  # inside a layer body: the header reads, the layer's checksum fails
    client.set(key, bytes(value))
    damaged, _, _ = generate(llm, prompt)
    assert damaged == reference
    assert not any(k == key and client.get(k) == bytes(value) for k in client.scan_iter(match="tw:pool:*"))

    redis_server.stop()
    try:
        gone, _, _ = generate(llm, prompt)
        assert gone == reference
    finally:
        redis_server.start()


def test_a_lossy_profile_stores_a_quarter_to_a_half_of_the_bytes(llm, redis_server):
    client = redis_server.client()
    client.flushdb()
    prompt = SAMPLE_TEXT.read_text()[1000:4500] + QUESTION
    profile = "kivi:k_bits=6,v_bits=4,group_size=64,residual=32/raw/zstd"
    reference, out, _ = generate(llm, prompt, store=profile)
    blocks = (len(out.prompt_token_ids) - 1) // POOL_BLOCK
    assert wait_for_blocks(client, blocks) == blocks
    stats = pool_stats(client, POOL_BLOCK)
    assert stats["bytes_per_token"] < 0.5 * 30 * 2 * 3 * 64 * 2
    lossy, _, _ = generate(llm, prompt)
    agreement = sum(a == b for a, b in zip(lossy, reference)) / len(reference)
    print(f"\n{profile}: {stats['bytes_per_token']:.0f} bytes per token, greedy agreement {agreement:.0%}")
    assert lossy[:1] == reference[:1]
