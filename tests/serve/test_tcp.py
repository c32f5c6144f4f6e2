"""The TCP transport over real sockets on 127.0.0.1: the transport contract, then what only TCP shows.

Hostile or broken peers are raw sockets writing bytes by hand; a corrupting proxy flips a
byte in flight; a token bucket slows one connection down to show the others are not held up.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings

from tensorwire.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    FrameChecksumMismatch,
    FrameTooLarge,
    MalformedFrame,
    PeerError,
    ProtocolError,
    SecretError,
    ShapeMismatch,
    TransportTimeout,
    UnknownFrameType,
    UnsupportedProtocolVersion,
)
from tensorwire.kv.pipeline import Pipeline
from tensorwire.serve import TokenBucket, connect, gbps
from tensorwire.serve import protocol as P
from tensorwire.testing.conformance import TransportSuite
from tensorwire.testing.strategies import kv_cache_data, kv_caches

from .conftest import SECRET, run, served, tcp_pair

RAW = Pipeline.from_config({"stages": []})
KIVI = Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "zstd"}]})


class TestTCPTransport(TransportSuite):
    def pair(self, **options):
        return tcp_pair(**options)


def same(a, b) -> bool:
    return a.seq_len == b.seq_len and all(
        np.array_equal(x.keys, y.keys) and np.array_equal(x.values, y.values) and np.array_equal(x.positions, y.positions)
        for x, y in zip(a.layers, b.layers)
    ) and a.n_layers == b.n_layers


async def read_all(reader: asyncio.StreamReader, limit: float = 5.0) -> bytes:
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 16), limit):
            out += chunk
    except (ConnectionError, asyncio.TimeoutError):
        pass
    return out


def error_code(data: bytes) -> str:
    """The code of the ERROR frame a server sent a raw client before closing."""
    frames = P.parse_frames(data)
    assert frames and frames[-1].type is P.FrameType.ERROR, frames
    code, _, fatal, _ = P.parse_error(frames[-1].payload)
    assert fatal
    return code


# -- the real KV path ------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(cache=kv_caches(max_layers=3, max_tokens=40))
def test_random_caches_arrive_bit_for_bit(cache):
    async def body():
        async with tcp_pair() as (client, server):
            stream = KIVI.encode_stream(cache)
            _, (got, _) = await asyncio.gather(client.send_kv("r", stream), server.recv_kv())
            assert same(got, Pipeline.decode_data(KIVI.encode(cache)))

    run(body())


def test_send_cache_selects_in_a_thread_and_arrives_bit_for_bit():
    pipe = Pipeline.from_config({"stages": [{"id": "key_norm", "keep_fraction": 0.5}, {"id": "zstd"}]})
    cache = kv_cache_data(3, 1, 2, 50, 32, seed=9)

    async def body():
        async with tcp_pair() as (client, server):
            sent, (got, _) = await asyncio.gather(client.send_cache("r", pipe, cache), server.recv_kv())
            assert same(got, Pipeline.decode_data(pipe.encode(cache)))
            assert len(sent.encode_intervals) == cache.n_layers + 1 and sent.total_s >= sent.encode_s - 1e-6

    run(body())


def test_overlap_is_measured_on_both_sides():
    """Over a 50 Mbit/s link, layer i+1 is encoded while layer i is on the wire, and layer i is
    decoded while layer i+1 arrives."""
    cache = kv_cache_data(6, 1, 4, 512, 64, seed=1)

    async def body():
        async with tcp_pair(shaper=TokenBucket(gbps(0.05))) as (client, server):
            sent, (got, received) = await asyncio.gather(client.send_kv("r", RAW.encode_stream(cache)), server.recv_kv())
            assert same(got, cache)
            assert sent.shaper == "token-bucket" and sent.overlap_s > 0 and received.overlap_s > 0
            assert sent.overlap_s <= min(sent.encode_s, sent.wire_s) + 1e-6
            assert received.overlap_s <= min(received.decode_s, received.wire_s) + 1e-6

    run(body())


# -- authentication ----------------------------------------------------------------------------
def test_a_wrong_secret_is_refused_and_the_server_goes_on(caplog):
    async def handler(conn):
        msg = await conn.recv_message()
        await conn.send_message({"type": "echo", "got": msg})

    async def body():
        async with served(handler, handshake_timeout=5.0) as server:
            with pytest.raises(AuthenticationFailed, match="different secrets"):
                await connect("127.0.0.1", server.port, secret="the wrong secret, long enough")
            async with await connect("127.0.0.1", server.port, secret=SECRET) as conn:
                await conn.send_message({"type": "ping"})
                assert (await conn.recv_message())["got"] == {"type": "ping"}
            for _ in range(50):
                if server.refused:
                    break
                await asyncio.sleep(0.05)
            assert (server.refused, server.accepted) == (1, 1)

    with caplog.at_level("WARNING", logger="tensorwire.serve"):
        run(body())
    assert any("refused a connection" in r.getMessage() and "another shared secret" in r.getMessage()
               for r in caplog.records)  # fmt: skip


async def _read_frame(reader: asyncio.StreamReader) -> P.Frame:
    head = P.parse_header(await reader.readexactly(P.HEADER_SIZE))
    payload = await reader.readexactly(head.length)
    P.check_payload(head, payload)
    return P.Frame(head.type, memoryview(payload))


def test_a_client_refuses_a_server_that_cannot_prove_the_secret():
    """A fake server that does not hold the secret answers the client's proof with a made-up one."""
    told: asyncio.Future

    async def fake(reader, writer):
        hello = P.parse_json((await _read_frame(reader)).payload, "HELLO")
        assert len(bytes.fromhex(hello["nonce"])) == 32
        writer.write(b"".join(P.frame(P.FrameType.HELLO, [P.json_payload(
            {"version": 1, "nonce": "ab" * 32, "max_frame": 1 << 20})])))  # fmt: skip
        assert (await _read_frame(reader)).type is P.FrameType.AUTH
        writer.write(b"".join(P.frame(P.FrameType.AUTH_OK, [P.json_payload({"proof": "cd" * 32})])))
        told.set_result(P.parse_error((await _read_frame(reader)).payload))
        writer.close()

    async def body():
        nonlocal told
        told = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        try:
            with pytest.raises(AuthenticationFailed, match="could not prove"):
                await connect("127.0.0.1", server.sockets[0].getsockname()[1], secret=SECRET)
            code, _, fatal, _ = await asyncio.wait_for(told, 5.0)
            assert code == "auth-failed" and fatal
        finally:
            server.close()

    run(body())


def test_no_secret_is_a_named_error(monkeypatch):
    monkeypatch.delenv("TENSORWIRE_SECRET", raising=False)
    monkeypatch.delenv("TENSORWIRE_SECRET_FILE", raising=False)

    async def body():
        with pytest.raises(SecretError, match="TENSORWIRE_SECRET"):
            await connect("127.0.0.1", 9, secret=None)

    run(body())


def test_garbage_gets_an_error_frame_and_the_server_goes_on():
    async def handler(conn):
        await conn.send_message({"type": "hi"})

    async def body():
        async with served(handler) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: tensorwire\r\n\r\n")
            assert error_code(await read_all(reader)) == "malformed-frame"
            writer.close()
            async with await connect("127.0.0.1", server.port, secret=SECRET) as conn:
                assert (await conn.recv_message())["type"] == "hi"

    run(body())


def test_a_silent_client_fails_the_handshake_in_time():
    async def handler(conn):  # pragma: no cover - never authenticated
        raise AssertionError("a silent client must not reach the handler")

    async def body():
        async with served(handler, handshake_timeout=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            started = time.monotonic()
            await read_all(reader)  # the server hangs up
            assert time.monotonic() - started < 3.0
            writer.close()
            assert server.refused == 1

    run(body())


# -- hostile and broken frames ---------------------------------------------------------------------
def test_a_huge_length_before_the_handshake_is_refused_before_allocation():
    async def handler(conn):  # pragma: no cover
        raise AssertionError("unreachable")

    async def body():
        async with served(handler) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            tracemalloc.start()
            try:
                writer.write(P.pack_header(P.FrameType.HELLO, 2**31, 0))
                assert error_code(await read_all(reader)) == "frame-too-large"
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 16 << 20, f"{peak} bytes allocated for a frame that was refused"
            writer.close()

    run(body())


async def _server_error_for(raw: bytes, *, kv: bool = False) -> tuple[BaseException, PeerError]:
    """What the server raises when an authenticated client sends ``raw``, and the ERROR the client gets."""
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(conn):
        try:
            await (conn.recv_kv() if kv else conn.recv_message())
        except BaseException as exc:
            seen.set_result(exc)
            raise

    async with served(handler) as server:
        conn = await connect("127.0.0.1", server.port, secret=SECRET)
        conn._stream.write(raw)
        exc = await asyncio.wait_for(seen, 10.0)
        with pytest.raises(PeerError) as told:
            await conn.recv_message(timeout=5.0)
        await conn.close()
        return exc, told.value


def _header(frame_type=P.FrameType.MESSAGE, length=10, *, magic=P.MAGIC, version=P.VERSION, flags=0) -> bytes:
    return P.HEADER.pack(magic, version, int(frame_type), flags, length, 0)


@pytest.mark.parametrize(
    "raw, error, code",
    [
        (_header(length=2**31), FrameTooLarge, "frame-too-large"),
        (_header(length=(16 << 20) + 1), FrameTooLarge, "frame-too-large"),  # over max_message, under max_frame
        (_header(version=2), UnsupportedProtocolVersion, "unsupported-version"),
        (_header(frame_type=99), UnknownFrameType, "unknown-frame-type"),
        (_header(flags=1), MalformedFrame, "malformed-frame"),
        (_header(magic=b"TWP\x89"), MalformedFrame, "malformed-frame"),
        (_header(P.FrameType.KV_LAYER), ProtocolError, "unexpected-frame"),  # a layer where a message is due
    ],
    ids=["2**31", "over-max-message", "version", "type", "reserved", "magic", "sequence"],
)
def test_bad_frames_are_named_errors_before_allocation(raw, error, code):
    tracemalloc.start()
    try:
        exc, told = run(_server_error_for(raw + bytes(64)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(exc, error) and told.code == code and told.fatal
    assert peak < 16 << 20, f"{peak} bytes allocated for a frame that was refused"


def test_a_layer_longer_than_the_transfer_allows_is_refused_before_allocation():
    """Under max_frame, but far over what a layer of this (tiny) cache may take."""
    stream = RAW.encode_stream(kv_cache_data(2, 1, 1, 4, 8))
    raw = b"".join(bytes(p) for p in P.frame(P.FrameType.KV_HEADER, [P.kv_header_payload("r", stream.header)]))
    raw += b"".join(bytes(p) for p in P.frame(P.FrameType.KV_BITMAP, [stream.bitmap]))
    raw += _header(P.FrameType.KV_LAYER, 200 << 20)
    tracemalloc.start()
    try:
        exc, told = run(_server_error_for(raw, kv=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(exc, FrameTooLarge) and "this transfer allows" in str(exc) and told.code == "frame-too-large"
    assert peak < 16 << 20


def test_a_byte_flipped_in_flight_is_detected():
    """A proxy between client and server flips one byte inside the first layer's frame."""
    cache = kv_cache_data(2, 1, 2, 64, 64)
    seen: asyncio.Future

    async def handler(conn):
        try:
            await conn.recv_kv()
        except BaseException as exc:
            seen.set_result(exc)

    async def body():
        nonlocal seen
        seen = asyncio.get_running_loop().create_future()
        armed = {"at": None}

        async def pump(reader, writer, flip: bool):
            count = 0
            try:
                while data := await reader.read(1 << 16):
                    if flip and armed["at"] is not None:
                        data = bytearray(data)
                        at = armed["at"] - count
                        if 0 <= at < len(data):
                            data[at] ^= 0x10
                        count += len(data)
                    writer.write(bytes(data))
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        async with served(handler) as server:
            async def relay(c_reader, c_writer):
                s_reader, s_writer = await asyncio.open_connection("127.0.0.1", server.port)
                await asyncio.gather(pump(c_reader, s_writer, True), pump(s_reader, c_writer, False))

            proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
            try:
                conn = await connect("127.0.0.1", proxy.sockets[0].getsockname()[1], secret=SECRET)
                armed["at"] = 5000  # bytes into the transfer: inside layer 0's body (64 KiB)
                with pytest.raises((PeerError, ConnectionClosed)):
                    await conn.send_kv("r", RAW.encode_stream(cache))
                    await conn.recv_message(timeout=5.0)
                exc = await asyncio.wait_for(seen, 10.0)
                assert isinstance(exc, FrameChecksumMismatch), exc
                await conn.close()
            finally:
                proxy.close()

    run(body())


def test_a_peer_stalled_mid_frame_times_out_and_is_closed():
    async def body():
        seen = asyncio.get_running_loop().create_future()

        async def handler(conn):
            started = time.monotonic()
            try:
                await conn.recv_message(timeout=0.3)
            except TransportTimeout as exc:
                seen.set_result((exc, time.monotonic() - started, conn.closed))

        async with served(handler) as server:
            conn = await connect("127.0.0.1", server.port, secret=SECRET)
            conn._stream.write(_header(length=100) + b"only ten b")
            with pytest.raises(PeerError) as told:  # the server says why it hangs up
                await conn.recv_message(timeout=5.0)
            assert told.value.code == "timeout" and told.value.fatal
            exc, after, closed = await asyncio.wait_for(seen, 5.0)
            assert 0.25 <= after < 3.0 and closed and "stalled" in str(exc)
            await conn.close()

    run(body())


# -- concurrency --------------------------------------------------------------------------------------
def test_a_slow_transfer_does_not_hold_up_the_others():
    """One client sends 2 MB at 16 Mbit/s (about 1 s) and one never sends at all; three
    others, unshaped, finish long before."""
    slow_cache = kv_cache_data(4, 1, 4, 512, 64, seed=1)  # 4 x 512 KiB raw
    fast_cache = kv_cache_data(2, 1, 2, 64, 64, seed=2)
    finished: dict[str, float] = {}

    async def handler(conn):
        msg = await conn.recv_message()
        data, _ = await conn.recv_kv(timeout=10.0)
        finished[msg["name"]] = time.monotonic()
        await conn.send_message({"type": "done", "layers": data.n_layers})

    async def client(name: str, cache, **options):
        async with await connect("127.0.0.1", port, secret=SECRET, **options) as conn:
            await conn.send_message({"type": "hello", "name": name})
            await conn.send_kv(name, RAW.encode_stream(cache))
            assert (await conn.recv_message())["layers"] == cache.n_layers

    async def silent():
        async with await connect("127.0.0.1", port, secret=SECRET):
            await asyncio.sleep(1.5)

    async def body():
        nonlocal port
        async with served(handler) as server:
            port = server.port
            started = time.monotonic()
            await asyncio.gather(client("slow", slow_cache, shaper=TokenBucket(gbps(0.016))), silent(),
                                 *(client(f"fast{i}", fast_cache) for i in range(3)))  # fmt: skip
            slow = finished["slow"] - started
            assert slow > 0.7
            for i in range(3):
                assert finished[f"fast{i}"] - started < 0.5 * slow, finished

    port = 0
    run(body())


# -- limits announced in HELLO, cancellation, failing handlers -----------------------------------------
def test_the_receivers_max_frame_binds_the_sender():
    """The client accepts frames of at most 256 KiB: the server cannot send it a bigger message,
    and a KV layer too big for it is abandoned (non-fatally) before it is sent."""
    big_layers = kv_cache_data(2, 1, 2, 512, 64)  # 512 KiB per layer, raw

    async def body():
        async with tcp_pair(max_frame=256 << 10) as (client, server):
            with pytest.raises(FrameTooLarge, match="message limit|accepts"):
                await server.send_message({"type": "big", "blob": "x" * (300 << 10)})
            sending = asyncio.ensure_future(server.send_kv("r", RAW.encode_stream(big_layers)))
            with pytest.raises(PeerError) as told:
                await client.recv_kv()
            assert told.value.code == "encode-failed" and not told.value.fatal
            with pytest.raises(FrameTooLarge, match="over the"):
                await sending
            await server.send_message({"type": "still here"})
            assert (await client.recv_message())["type"] == "still here"

    run(body())


def test_the_sender_learns_why_the_receiver_refused():
    """The receiver refuses the cache after its header; the sender, between two layers, reads the ERROR."""
    cache = kv_cache_data(8, 1, 2, 256, 64)  # 8 x 256 KiB raw: 1.7 s at 10 Mbit/s

    async def body():
        async with tcp_pair(shaper=TokenBucket(gbps(0.01))) as (client, server):
            receiving = asyncio.ensure_future(server.recv_kv(expect={"head_dim": 128}))
            started = time.monotonic()
            with pytest.raises(PeerError) as told:
                await client.send_kv("r", RAW.encode_stream(cache))
            assert told.value.code == "shape-mismatch" and told.value.fatal and "head_dim=64" in str(told.value)
            assert time.monotonic() - started < 1.0 and client.closed
            with pytest.raises(ShapeMismatch):
                await receiving

    run(body())


def test_a_cancelled_transfer_closes_the_connection():
    cache = kv_cache_data(4, 1, 4, 256, 64)  # 1 MiB raw: 0.8 s at 10 Mbit/s

    async def body():
        async with tcp_pair(shaper=TokenBucket(gbps(0.01))) as (client, server):
            sending = asyncio.ensure_future(client.send_kv("r", RAW.encode_stream(cache)))
            receiving = asyncio.ensure_future(server.recv_kv())
            await asyncio.sleep(0.2)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(receiving, 5.0)

    run(body())


def test_a_bad_request_id_is_a_value_error():
    async def body():
        async with tcp_pair() as (client, _):
            with pytest.raises(ValueError, match="request id"):
                await client.send_kv("", RAW.encode_stream(kv_cache_data(1, 1, 1, 2, 8)))
            assert not client.closed

    run(body())


def test_a_failing_handler_is_logged_and_the_peer_told(caplog):
    async def handler(conn):
        if (await conn.recv_message())["type"] == "boom":
            raise KeyError("a bug in the worker")
        await conn.send_message({"type": "ok"})

    async def body():
        async with served(handler) as server:
            conn = await connect("127.0.0.1", server.port, secret=SECRET)
            await conn.send_message({"type": "boom"})
            with pytest.raises(PeerError) as told:
                await conn.recv_message(timeout=5.0)
            assert told.value.code == "internal" and told.value.fatal and conn.closed
            async with await connect("127.0.0.1", server.port, secret=SECRET) as again:
                await again.send_message({"type": "fine"})
                assert (await again.recv_message())["type"] == "ok"

    with caplog.at_level("ERROR", logger="tensorwire.serve"):
        run(body())
    assert any("handler failed" in r.getMessage() for r in caplog.records)
