"""A real deployment: a prefill worker and two decode workers, each its own process, on a shaped link.

The model is the offline SmolLM2; requests come through the workers' own backend and
through the OpenAI HTTP API with the official client. Faults are real too: a decode
worker killed while requests run, a peer without the secret, SIGTERM.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tensorwire.data import SAMPLE_TEXT
from tensorwire.demo import KV_QUESTION
from tensorwire.errors import AuthenticationFailed
from tensorwire.serve.cluster import Cluster, ClusterConfig
from tensorwire.serve.engine import Engine, SamplingParams
from tensorwire.serve.http.backend import Finished, GenerationRequest, KVOptions, Prefilled, Tokens
from tensorwire.serve.transport import connect

PROMPT = "The river town had one stone bridge. It was designed by Ada Fenwick and it has seven arches. " * 6
QUESTION = "\nQuestion: Who designed the stone bridge?\nAnswer:"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(smollm2):
    with Cluster(ClusterConfig(decode_workers=2, gbps=0.5, start_timeout_s=400)) as running:
        yield running


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine(*smollm2)


def _run(backend, ids, sampling, compression="auto", request_id="r"):
    async def collect():
        events = [e async for e in backend.generate(GenerationRequest(request_id, tuple(ids), sampling,
                                                                          KVOptions(compression=compression)))]  # fmt: skip
        return events

    return asyncio.run(collect())


def _tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, Tokens) for t in e.token_ids]


def test_raw_and_compressed_requests_match_local_generation(cluster, engine):
    backend = cluster.backend(engine.tokenizer)
    ids = engine.tokenizer(PROMPT + QUESTION).input_ids
    sampling = SamplingParams(max_tokens=8, temperature=0)
    local = list(engine.generate(engine.prefill(ids), ids[-1], sampling))
    for compression in ("raw", "uniform:bits=8/raw"):
        events = _run(backend, ids, sampling, compression, request_id=f"match-{compression}")
        prefilled = next(e for e in events if isinstance(e, Prefilled))
        assert isinstance(events[-1], Finished)
        assert prefilled.profile == compression and prefilled.kv_bytes_raw > 0 and prefilled.kv_bytes_sent > 0
        # bf16 (raw) and 8-bit codes change the cache by ~1e-3: the greedy answer holds on this prompt.
        tokens = _tokens(events)
        assert tokens == local, (compression, engine.tokenizer.decode(tokens), engine.tokenizer.decode(local))
    assert cluster.shaper in ("tbf", "token-bucket")


def test_the_controller_compresses_on_a_slow_link_and_the_answer_keeps_the_fact(cluster, engine):
    ids = engine.tokenizer(SAMPLE_TEXT.read_text() + KV_QUESTION).input_ids
    events = _run(cluster.backend(engine.tokenizer), ids, SamplingParams(max_tokens=12, temperature=0), "auto", "auto")
    prefilled = next(e for e in events if isinstance(e, Prefilled))
    assert prefilled.profile != "raw", prefilled.decision["reason"]
    assert prefilled.kv_bytes_sent < prefilled.kv_bytes_raw / 1.5
    assert "Elias Wren" in engine.tokenizer.decode(_tokens(events))


def test_compression_moves_fewer_bytes(cluster, engine):
    backend = cluster.backend(engine.tokenizer)
    ids = engine.tokenizer(SAMPLE_TEXT.read_text()).input_ids  # long enough that KIVI's residual window is small
    sampling = SamplingParams(max_tokens=2, temperature=0)
    raw = next(e for e in _run(backend, ids, sampling, "raw", "bytes-raw") if isinstance(e, Prefilled))
    packed = next(e for e in _run(backend, ids, sampling, "kivi:k_bits=6,v_bits=4,residual=32/raw", "bytes-kivi")
                  if isinstance(e, Prefilled))  # fmt: skip
    assert packed.kv_bytes_sent < 0.6 * raw.kv_bytes_sent


def test_seeded_sampling_is_the_same_on_every_worker(cluster, engine):
    backend = cluster.backend(engine.tokenizer)
    ids = engine.tokenizer(PROMPT).input_ids
    sampling = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.95, seed=11)
    first, second = (_tokens(_run(backend, ids, sampling, "raw", f"seed-{i}")) for i in range(2))
    assert first == second


def test_a_peer_without_the_secret_is_refused_and_the_worker_keeps_serving(cluster, engine):
    async def intrude():
        with pytest.raises(AuthenticationFailed):
            await connect(cluster.prefill.host, cluster.prefill.port, secret=b"not the secret" * 3)

    asyncio.run(intrude())
    with socket.create_connection((cluster.prefill.host, cluster.prefill.port), timeout=5) as sock:
        sock.sendall(b"\xff" * 64)  # garbage instead of a handshake
    ids = engine.tokenizer(PROMPT).input_ids
    assert len(_tokens(_run(cluster.backend(engine.tokenizer), ids, SamplingParams(max_tokens=2, temperature=0)))) == 2


def test_a_killed_decode_worker_loses_no_request(cluster, engine):
    """Kill one decode worker while requests run: each finishes with the tokens local generation gives."""
    backend = cluster.backend(engine.tokenizer)
    ids = engine.tokenizer(PROMPT + QUESTION).input_ids
    sampling = SamplingParams(max_tokens=12, temperature=0)
    local = list(engine.generate(engine.prefill(ids), ids[-1], sampling))

    async def requests():
        async def one(i):
            return [e async for e in backend.generate(GenerationRequest(f"kill-{i}", tuple(ids), sampling,
                                                                        KVOptions(compression="raw")))]  # fmt: skip

        tasks = [asyncio.create_task(one(i)) for i in range(4)]
        await asyncio.sleep(1.0)
        cluster.decode[0].kill()
        return await asyncio.gather(*tasks)

    started = time.perf_counter()
    for events in asyncio.run(requests()):
        assert isinstance(events[-1], Finished)
        assert _tokens(events) == local
    assert time.perf_counter() - started < 300


def test_sigterm_stops_every_process_and_frees_the_ports(smollm2):
    cluster = Cluster(ClusterConfig(decode_workers=1, gbps=1.0, calibrate=False, start_timeout_s=400)).start()
    ports = [cluster.prefill.port, cluster.decode[0].port]
    codes = cluster.stop()
    assert codes == {"prefill": 0, "decode-0": 0}
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free again
