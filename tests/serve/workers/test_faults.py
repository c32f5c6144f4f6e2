"""Faults on the path between the prefill worker and the decode workers, with real processes and sockets.

A deployment of one prefill worker and two decode workers (each its own process, the
real SmolLM2), with a frame-aware TCP proxy in front of each decode worker: the prefill
worker is pointed at the proxies (``Cluster.start_decode`` / ``Cluster.start_prefill``).
Each test arms the proxies with a fault for the next transfer they relay:

* a bit flipped in a KV layer frame: the decode worker's checksum catches it and the
  prefill worker resends the cache raw (the answer is the raw one, never the damaged one);
* the connection cut in the middle of the KV transfer or of the token stream: the request
  is retried on the other decode worker, or finished by the prefill worker when none is
  left, each token index exactly once;
* a decode worker stopped (SIGSTOP) in the middle of its tokens, or before its handshake:
  the prefill worker gives it up after ``peer_timeout_s`` and the request completes.

After each fault the workers serve the next request. Greedy decoding throughout; the
prompt is the sample text and a question whose answer is in it (~800 tokens: a cache that
compression is worth it for). ``tests/serve/workers/test_cluster.py`` covers a killed
decode worker, a peer without the secret, garbage bytes and SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import tensorwire
from tensorwire.data import SAMPLE_TEXT
from tensorwire.demo import KV_QUESTION
from tensorwire.kv.pipeline import Pipeline
from tensorwire.serve import auth
from tensorwire.serve import protocol as P
from tensorwire.serve.cluster import Cluster, ClusterConfig
from tensorwire.serve.engine import Engine, SamplingParams
from tensorwire.serve.http.backend import Finished, GenerationRequest, KVOptions, Prefilled, Tokens
from tensorwire.serve.transport import connect
from tensorwire.serve.workers.__main__ import _parser
from tensorwire.serve.workers.prefill import RAW_PIPELINE

# Long enough to ride out a busy decode worker's pause between two tokens on 2 shared
# cores, short enough that a stalled one costs little.
PEER_TIMEOUT_S = 4.0
# A profile whose answer on this prompt differs from the raw one (checked below): a damaged
# transfer that were resent with it, rather than raw, would show in the tokens.
LOSSY = "layerwise:late_bits=4/raw"
SAMPLING = SamplingParams(max_tokens=24, temperature=0)
SHORT = "The river town had one stone bridge. It was designed by Ada Fenwick and it has seven arches. " * 3
SHORT_QUESTION = "\nQuestion: Who designed the stone bridge?\nAnswer:"
SRC = Path(tensorwire.__file__).resolve().parents[1]  # the workers import the code under test

pytestmark = pytest.mark.timeout(300)


# -- a proxy that damages, cuts or stalls the transfers it relays -------------------------------
@dataclass(frozen=True)
class Fault:
    """What a proxy does to one connection.

    ``flip``: flip bits in the body of KV layer ``at`` (the frame checksum catches it);
    ``flip-rechecksum``: the same, with the frame's checksum recomputed over the damaged
    bytes (as a bug before framing would), so that only the layer's own XXH3 catches it;
    ``cut-kv``: forward half of KV layer ``at``'s frame, then close both sides;
    ``cut-tokens``: close both sides after relaying ``at`` token messages;
    ``stop-after-tokens``: SIGSTOP the decode worker after relaying ``at`` token messages.
    """

    kind: str
    at: int


class FaultyProxies:
    """One TCP proxy per decode worker, on 127.0.0.1, in a thread with its own event loop.

    It relays frame by frame (docs/PROTOCOL.md section 1: a 20-byte header, then the
    payload). Each connection takes the next armed :class:`Fault`, whichever proxy it
    goes through; with none armed it relays faithfully. ``fired`` lists the faults done.
    """

    def __init__(self, targets: list[tuple[str, int, int]]):
        self._faults: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self.fired: list[tuple[Fault, str, float]] = []  # (fault, proxy address, when)
        self._writers: set[asyncio.StreamWriter] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faulty-proxies", daemon=True)
        self._thread.start()
        self.addresses = [self._call(self._listen(host, port, pid)) for host, port, pid in targets]

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def arm(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.clear()
            self._faults.extend(faults)
            self.fired.clear()

    def disarm(self) -> list[Fault]:
        """Drop the faults not yet taken; returns them."""
        with self._lock:
            left = list(self._faults)
            self._faults.clear()
            return left

    def _take(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _fired(self, fault: Fault, address: str) -> None:
        with self._lock:
            self.fired.append((fault, address, time.monotonic()))

    async def _listen(self, host: str, port: int, pid: int) -> str:
        server = await asyncio.start_server(functools.partial(self._relay, host, port, pid), "127.0.0.1", 0)
        self._servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _relay(self, host, port, pid, c_reader, c_writer) -> None:
        fault = self._take()
        address = f"127.0.0.1:{c_writer.get_extra_info('sockname')[1]}"
        try:
            s_reader, s_writer = await asyncio.open_connection(host, port)
        except OSError:
            c_writer.close()
            return
        both = (c_writer, s_writer)
        self._writers.update(both)

        def cut() -> None:
            for w in both:
                w.close()

        async def pump(reader, writer, upstream: bool) -> None:
            layers = tokens = 0
            try:
                while True:
                    head = b""
                    try:
                        head = await reader.readexactly(P.HEADER_SIZE)
                        payload = await reader.readexactly(int.from_bytes(head[8:12], "little"))
                    except asyncio.IncompleteReadError as exc:
                        # The sender closed its side: pass on what came and the close (FIN), and
                        # keep relaying the other way, as TCP does. Closing both at once here
                        # would reset the connection, which can destroy the ERROR frame a
                        # decode worker sent just before closing, unread, on the other side.
                        writer.write(head + exc.partial)
                        writer.write_eof()
                        return
                    kind = head[5]
                    if fault and upstream and kind == P.FrameType.KV_LAYER:
                        if layers == fault.at and fault.kind in ("flip", "flip-rechecksum"):
                            damaged = bytearray(payload)
                            damaged[len(damaged) // 2] ^= 0x5A  # four bits, inside the layer's body
                            if fault.kind == "flip":
                                payload = bytes(damaged)
                            else:
                                head, payload = b"".join(P.frame(kind, [damaged]))[: P.HEADER_SIZE], bytes(damaged)
                            self._fired(fault, address)
                        elif layers == fault.at and fault.kind == "cut-kv":
                            writer.write(head + payload[: len(payload) // 2])
                            await writer.drain()
                            self._fired(fault, address)
                            cut()
                            return
                        layers += 1
                    writer.write(head + payload)
                    await writer.drain()
                    if fault and not upstream and kind == P.FrameType.MESSAGE:
                        tokens += json.loads(bytes(payload)).get("type") == "token"
                        if tokens == fault.at and fault.kind == "cut-tokens":
                            self._fired(fault, address)
                            cut()
                            return
                        if tokens == fault.at and fault.kind == "stop-after-tokens":
                            os.kill(pid, signal.SIGSTOP)
                            self._fired(fault, address)
            except (ConnectionError, OSError, RuntimeError):  # RuntimeError: a write after the close
                cut()  # one side was reset: the other goes too

        try:
            await asyncio.gather(pump(c_reader, s_writer, True), pump(s_reader, c_writer, False))
        finally:
            cut()
            self._writers.difference_update(both)

    def close(self) -> None:
        async def shut():
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        try:
            self._call(shut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


# -- the deployment ------------------------------------------------------------------------------
@dataclass
class Deployment:
    cluster: Cluster
    proxies: FaultyProxies

    def worker_behind(self, address: str):
        """The decode worker process the prefill worker reaches at ``address`` (a proxy)."""
        return self.cluster.decode[self.proxies.addresses.index(address)]


@pytest.fixture(scope="module")
def deployment(smollm2):
    env = {"PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    config = ClusterConfig(decode_workers=2, shaper="none", calibrate=False, peer_timeout_s=PEER_TIMEOUT_S,
                           start_timeout_s=400, env=env)  # fmt: skip
    cluster = Cluster(config)
    proxies = None
    try:
        cluster.start_decode()
        proxies = FaultyProxies([(w.host, w.port, w.proc.pid) for w in cluster.decode])
        cluster.start_prefill(proxies.addresses)
        assert cluster.decode_addresses == proxies.addresses
        yield Deployment(cluster, proxies)
    finally:
        for worker in cluster.decode:  # a test that failed between SIGSTOP and SIGCONT
            if worker.proc.poll() is None:
                os.kill(worker.proc.pid, signal.SIGCONT)
        cluster.stop()
        if proxies is not None:
            proxies.close()


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine(*smollm2)


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return engine.tokenizer(SAMPLE_TEXT.read_text() + KV_QUESTION).input_ids


@pytest.fixture(scope="module")
def local(engine, prompt) -> dict[str, list[int]]:
    """Local greedy generation: from the cache as prefilled, and from it sent raw or through LOSSY."""
    data = engine.prefill(prompt, observe_window=64)

    def through(config) -> list[int]:
        return list(engine.generate(Pipeline.decode_data(Pipeline.from_config(config).encode(data)), prompt[-1], SAMPLING))

    from tensorwire.data import SMOLLM2_LIBRARY
    from tensorwire.kv.profiles import ProfileLibrary

    tokens = {"prefilled": list(engine.generate(data, prompt[-1], SAMPLING)), "raw": through(RAW_PIPELINE),
              "lossy": through(ProfileLibrary.load(SMOLLM2_LIBRARY)[LOSSY].pipeline)}  # fmt: skip
    assert tokens["lossy"] != tokens["raw"], "LOSSY no longer tells a raw resend from a lossy one on this prompt"
    return tokens


@pytest.fixture(scope="module")
def raw_reference(deployment, engine, prompt, local) -> list[int]:
    """The tokens of the prompt forced raw end to end, on an undamaged path."""
    deployment.proxies.arm()
    events = _generate(deployment, engine, prompt, "raw", "reference-raw")
    assert [a["status"] for a in _attempts(events)] == ["done"]
    tokens = _tokens(events)
    assert tokens == local["raw"], (engine.tokenizer.decode(tokens), engine.tokenizer.decode(local["raw"]))
    return tokens


def _generate(deployment, engine, ids, compression, request_id, sampling=SAMPLING, during=None):
    """The backend's events for one request (``during(event)`` is awaited after each)."""
    backend = deployment.cluster.backend(engine.tokenizer)

    async def collect():
        events = []
        request = GenerationRequest(request_id, tuple(ids), sampling, KVOptions(compression=compression))
        async for event in backend.generate(request):
            events.append(event)
            if during is not None:
                await during(event)
        return events

    return asyncio.run(asyncio.wait_for(collect(), 120))


def _raw_messages(deployment, ids, compression, request_id, sampling=SAMPLING) -> list[dict]:
    """The prefill worker's messages for one request, as they come (to check the token indexes)."""
    cluster = deployment.cluster

    async def collect():
        secret = auth.load_secret(cluster.secret_file)
        async with await connect(cluster.prefill.host, cluster.prefill.port, secret=secret, read_timeout=120) as conn:
            await conn.send_message({"type": "generate", "id": request_id, "prompt_ids": list(ids),
                                     "sampling": sampling.to_dict(), "control": {"compression": compression}})  # fmt: skip
            messages = []
            while not messages or messages[-1]["type"] not in ("done", "error"):
                messages.append(await conn.recv_message())
            return messages

    return asyncio.run(asyncio.wait_for(collect(), 120))


def _tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, Tokens) for t in e.token_ids]


def _attempts(events) -> list[dict]:
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1].timings["attempts"]


def _indexed_tokens(messages) -> list[int]:
    """The tokens of a request's messages, after checking each index came once, in order."""
    assert messages[-1]["type"] == "done", messages[-1]
    tokens = [m for m in messages if m["type"] == "token"]
    assert [m["index"] for m in tokens] == list(range(len(tokens)))
    assert messages[-1]["tokens"] == len(tokens)
    assert sum(m["type"] == "kv_sent" for m in messages) == 1
    return [m["token"] for m in tokens]


@pytest.fixture(scope="module")
def short(engine) -> tuple[list[int], SamplingParams, list[int]]:
    """A short prompt, its sampling and local generation's tokens: the request after each fault."""
    ids = engine.tokenizer(SHORT + SHORT_QUESTION).input_ids
    sampling = SamplingParams(max_tokens=6, temperature=0)
    return ids, sampling, list(engine.generate(engine.prefill(ids), ids[-1], sampling))


def _still_serving(deployment, engine, short, name: str, retried: bool = False) -> list[dict]:
    """A clean request after a fault: it finishes on a decode worker (at the first try unless
    ``retried``), with local generation's tokens; returns its attempts."""
    deployment.proxies.arm()
    ids, sampling, expected = short
    events = _generate(deployment, engine, ids, "raw", f"after-{name}", sampling)
    attempts = _attempts(events)
    assert attempts[-1]["status"] == "done" and attempts[-1]["peer"] in deployment.proxies.addresses, attempts
    assert retried or len(attempts) == 1, attempts
    assert _tokens(events) == expected
    return attempts


# -- the knobs -----------------------------------------------------------------------------------
def test_the_peer_timeout_is_a_positive_number_of_seconds():
    assert _parser().parse_args(["prefill", "--peer-timeout-s", "2.5"]).peer_timeout_s == 2.5
    assert _parser().parse_args(["prefill"]).peer_timeout_s == 30.0
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["prefill", "--peer-timeout-s", bad])
    with pytest.raises(ValueError, match="peer_timeout_s"):
        ClusterConfig(peer_timeout_s=0)


def test_the_prefill_worker_needs_a_decode_address():
    cluster = Cluster(ClusterConfig(shaper="none"))
    try:
        with pytest.raises(ValueError, match="at least one decode worker"):
            cluster.start_prefill([])
    finally:
        cluster.stop()


# -- faults --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flip", "flip-rechecksum"])
def test_a_frame_damaged_in_flight_is_resent_raw(deployment, engine, prompt, local, raw_reference, short, kind):
    """Bits flipped in one KV layer of a compressed transfer: caught, resent raw, the raw answer."""
    fault = Fault(kind, 3)
    deployment.proxies.arm(fault)
    events = _generate(deployment, engine, prompt, LOSSY, f"damaged-{kind}")
    assert [f for f, *_ in deployment.proxies.fired] == [fault]
    attempts = _attempts(events)
    assert [a["status"] for a in attempts] == ["bad_kv", "done"], attempts
    code = "frame-checksum" if kind == "flip" else "payload-checksum"
    assert code in attempts[0]["error"], attempts[0]
    assert attempts[0]["pipeline"] != RAW_PIPELINE and attempts[1]["pipeline"] == RAW_PIPELINE
    assert attempts[0]["peer"] == deployment.proxies.fired[0][1]
    assert attempts[1]["peer"] == attempts[0]["peer"]  # the worker is fine, the bytes were not: same worker, raw
    prefilled = next(e for e in events if isinstance(e, Prefilled))
    assert prefilled.decision["choice"] == LOSSY  # what was asked for; the raw cache is what moved:
    assert prefilled.profile == "raw" and prefilled.kv_bytes_sent >= prefilled.kv_bytes_raw
    assert _tokens(events) == raw_reference != local["lossy"]
    _still_serving(deployment, engine, short, f"damaged-{kind}")


def test_a_connection_cut_during_the_transfer_is_retried_elsewhere(deployment, engine, prompt, raw_reference, short):
    fault = Fault("cut-kv", 10)
    deployment.proxies.arm(fault)
    messages = _raw_messages(deployment, prompt, "raw", "cut-kv")
    assert [f for f, *_ in deployment.proxies.fired] == [fault]
    attempts = messages[-1]["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "done"], attempts
    assert attempts[0]["peer"] == deployment.proxies.fired[0][1] != attempts[1]["peer"]
    assert _indexed_tokens(messages) == raw_reference
    _still_serving(deployment, engine, short, "cut-kv")


def test_a_connection_cut_during_the_tokens_sends_each_token_once(deployment, engine, prompt, raw_reference, short):
    """Three tokens relayed, then the connection is gone: the retry continues after them, nothing is sent twice."""
    fault = Fault("cut-tokens", 3)
    deployment.proxies.arm(fault)
    messages = _raw_messages(deployment, prompt, "raw", "cut-tokens")
    assert [f for f, *_ in deployment.proxies.fired] == [fault]
    attempts = messages[-1]["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "done"], attempts
    assert _indexed_tokens(messages) == raw_reference
    _still_serving(deployment, engine, short, "cut-tokens")


def test_with_every_decode_worker_cut_off_the_prefill_worker_finishes(deployment, engine, prompt, local, short):
    deployment.proxies.arm(Fault("cut-kv", 5), Fault("cut-kv", 5))
    messages = _raw_messages(deployment, prompt, "raw", "cut-all")
    assert len(deployment.proxies.fired) == 2
    attempts = messages[-1]["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "failed", "done"] and attempts[-1]["peer"] == "prefill"
    assert _indexed_tokens(messages) == local["prefilled"]  # its own cache, as prefilled
    kv_sent = next(m for m in messages if m["type"] == "kv_sent")
    assert kv_sent["profile"] is None and kv_sent["kv_bytes_sent"] == 0  # the cache did not move
    _still_serving(deployment, engine, short, "cut-all")


def test_a_stalled_decode_worker_is_given_up_and_the_request_completes(deployment, engine, prompt, raw_reference, short):
    """SIGSTOP in the middle of the tokens: the prefill worker times out and another worker finishes."""
    fault = Fault("stop-after-tokens", 2)
    deployment.proxies.arm(fault)
    try:
        events = _generate(deployment, engine, prompt, "raw", "stalled")
        finished = time.monotonic()
        assert [f for f, *_ in deployment.proxies.fired] == [fault]
        _, address, stalled_at = deployment.proxies.fired[0]
    finally:
        for worker in deployment.cluster.decode:
            os.kill(worker.proc.pid, signal.SIGCONT)
    attempts = _attempts(events)
    assert [a["status"] for a in attempts] == ["failed", "done"], attempts
    assert "TransportTimeout" in attempts[0]["error"], attempts[0]
    assert attempts[0]["peer"] == address != attempts[1]["peer"]
    assert _tokens(events) == raw_reference
    # Given up after the peer timeout (not the transport's default 30 s), then finished elsewhere.
    assert PEER_TIMEOUT_S <= finished - stalled_at < PEER_TIMEOUT_S + 15, finished - stalled_at
    _still_serving(deployment, engine, short, "stalled")


def test_a_decode_worker_stopped_before_the_handshake_is_given_up(deployment, engine, prompt, raw_reference, short):
    """The kernel still accepts its connections; nothing answers the HELLO: the handshake times out."""
    deployment.proxies.arm()
    health = asyncio.run(deployment.cluster.backend(engine.tokenizer).health())
    peers = {f"{w['host']}:{w['port']}": w for name, w in health.workers.items() if name.startswith("decode")}
    assert sorted(peers) == sorted(deployment.proxies.addresses)
    # The prefill worker tries first a decode worker that has not failed: stop that one.
    first = min(peers, key=lambda a: (peers[a]["failures"] > 0, peers[a]["in_flight"], deployment.proxies.addresses.index(a)))
    worker = deployment.worker_behind(first)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        events = _generate(deployment, engine, prompt, "raw", "stopped-handshake")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    attempts = _attempts(events)
    assert [(a["peer"], a["status"]) for a in attempts][0] == (first, "failed"), attempts
    assert attempts[-1]["status"] == "done" and attempts[-1]["peer"] != first
    assert "handshake" in attempts[0]["error"], attempts[0]
    assert PEER_TIMEOUT_S <= attempts[0]["seconds"] < PEER_TIMEOUT_S + 5, attempts[0]  # not the default 10 s
    assert _tokens(events) == raw_reference
    # The worker that was stopped serves again once resumed: stop the other, so it is the one left.
    other = deployment.worker_behind(attempts[-1]["peer"])
    os.kill(other.proc.pid, signal.SIGSTOP)
    try:
        resumed = _still_serving(deployment, engine, short, "resumed", retried=True)
    finally:
        os.kill(other.proc.pid, signal.SIGCONT)
    assert [(a["peer"], a["status"]) for a in resumed][-1] == (first, "done"), resumed
    _still_serving(deployment, engine, short, "stopped-handshake")
