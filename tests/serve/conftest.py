"""Helpers for the serving tests: a shared secret, an event loop per test, a server and a client."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tensorwire.serve import connect, start_server

SECRET = "0123456789abcdef" * 4
LIMIT_S = 60.0


def run(coro, limit: float = LIMIT_S):
    """Run a coroutine in a fresh event loop, bounded in time."""

    async def bounded():
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def served(handler, **options):
    """A server on 127.0.0.1 (a free port) running ``handler``, closed on exit."""
    server = await start_server(handler, secret=SECRET, **options)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def tcp_pair(**options):
    """``(client, server)`` connections of one fresh server, closed on exit."""
    accepted: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()

    async def handler(conn):
        await accepted.put(conn)
        await done.wait()

    async with served(handler, **options) as server:
        client = await connect("127.0.0.1", server.port, secret=SECRET, **options)
        try:
            yield client, await asyncio.wait_for(accepted.get(), 10.0)
        finally:
            done.set()
            await client.close()


@pytest.fixture
def secret() -> str:
    return SECRET
