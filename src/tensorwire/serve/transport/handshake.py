"""The handshake (docs/PROTOCOL.md, "Handshake"): both ends prove they hold the shared secret.

::

    client                                   server
    HELLO {versions, nonce Nc, max_frame}  ->
                                           <- HELLO {version, nonce Ns, max_frame}
    AUTH {proof HMAC(K, client label|Ns|Nc)} ->
                                              checks the proof; wrong: ERROR auth-failed, close
                                           <- AUTH_OK {proof HMAC(K, server label|Nc|Ns)}
    checks the proof; wrong: ERROR auth-failed, close

The server proves nothing to a client that has not proven itself first. Every frame
before AUTH_OK is at most :data:`~tensorwire.serve.protocol.HANDSHAKE_MAX_FRAME` bytes, and the
whole exchange has one deadline (``handshake_timeout``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ...errors import AuthenticationFailed, MalformedFrame, PeerError, ProtocolError, TransportTimeout, UnsupportedProtocolVersion
from .. import auth
from .. import protocol as P
from .connection import Connection

__all__ = ["client_handshake", "server_handshake"]

def _hex(obj: dict[str, Any], key: str, nbytes: int, what: str) -> bytes:
    value = obj.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != nbytes:
        raise MalformedFrame(f"the {what} needs {key!r}: {nbytes} bytes as hex, found {value!r:.80}")
    return raw


def _max_frame(obj: dict[str, Any]) -> int:
    value = obj.get("max_frame")
    if not isinstance(value, int) or isinstance(value, bool) or not P.HANDSHAKE_MAX_FRAME <= value < 1 << 32:
        raise MalformedFrame(f"HELLO's max_frame is an int in {P.HANDSHAKE_MAX_FRAME} .. 2**32-1, found {value!r}")
    return value


async def _read(conn: Connection, frame_type: P.FrameType, where: str) -> dict[str, Any]:
    frame = await conn.read_frame({frame_type}, P.HANDSHAKE_MAX_FRAME, where, conn.options.handshake_timeout)
    try:
        return P.parse_json(frame.payload, frame_type.name)
    except ProtocolError as exc:
        await conn.fail(exc)
        raise


async def _write(conn: Connection, frame_type: P.FrameType, body: dict[str, Any]) -> None:
    async with conn.send_lock:
        await conn.write_frame(frame_type, [P.json_payload(body)])


async def _bounded(conn: Connection, steps) -> None:
    """Run the handshake under its deadline; any failure closes the connection."""
    try:
        await asyncio.wait_for(steps, conn.options.handshake_timeout)
    except asyncio.TimeoutError:
        await conn.abort()
        raise TransportTimeout(
            f"the handshake with {conn.peer} did not finish within {conn.options.handshake_timeout:g} s"
        ) from None
    except ProtocolError as exc:
        if not conn.closed:
            await conn.fail(exc)
        raise
    except BaseException:
        await conn.abort()
        raise
    conn.authenticated = True


async def client_handshake(conn: Connection, secret: bytes) -> None:
    """Prove ``secret`` to the server and check its proof; raises :class:`AuthenticationFailed` on a mismatch."""

    async def steps() -> None:
        client_nonce = auth.new_nonce()
        await _write(conn, P.FrameType.HELLO, {"versions": list(P.SUPPORTED_VERSIONS), "nonce": client_nonce.hex(),
                                                "max_frame": conn.options.max_frame})  # fmt: skip
        hello = await _read(conn, P.FrameType.HELLO, "as the server's greeting")
        if hello.get("version") not in P.SUPPORTED_VERSIONS:
            raise UnsupportedProtocolVersion(f"the server chose protocol version {hello.get('version')!r}; "
                                             f"this build speaks {list(P.SUPPORTED_VERSIONS)}")  # fmt: skip
        server_nonce = _hex(hello, "nonce", auth.NONCE_BYTES, "server's HELLO")
        conn.peer_max_frame = _max_frame(hello)
        proof = auth.client_proof(secret, server_nonce, client_nonce)
        await _write(conn, P.FrameType.AUTH, {"proof": proof.hex()})
        try:
            ok = await _read(conn, P.FrameType.AUTH_OK, "after our proof")
        except PeerError as exc:
            if exc.code == AuthenticationFailed.code:
                raise AuthenticationFailed(
                    f"the server at {conn.peer} refused our proof: the two workers hold different secrets "
                    f"(check {auth.SECRET_ENV} / {auth.SECRET_FILE_ENV} on both)"
                ) from exc
            raise
        if not auth.proof_matches(auth.server_proof(secret, client_nonce, server_nonce),
                                  _hex(ok, "proof", 32, "server's AUTH_OK")):  # fmt: skip
            raise AuthenticationFailed(
                f"the server at {conn.peer} could not prove it holds the shared secret; "
                "it is not the worker you meant to reach, or its secret differs"
            )

    await _bounded(conn, steps())


async def server_handshake(conn: Connection, secret: bytes) -> None:
    """Check the client's proof, then prove ``secret`` to it; raises :class:`AuthenticationFailed` on a mismatch."""

    async def steps() -> None:
        hello = await _read(conn, P.FrameType.HELLO, "as the client's greeting")
        versions = hello.get("versions")
        offered = {v for v in versions if isinstance(v, int)} if isinstance(versions, list) else set()
        common = offered & set(P.SUPPORTED_VERSIONS)
        if not common:
            raise UnsupportedProtocolVersion(f"the client speaks protocol versions {versions!r:.80}; "
                                             f"this server speaks {list(P.SUPPORTED_VERSIONS)}")  # fmt: skip
        client_nonce = _hex(hello, "nonce", auth.NONCE_BYTES, "client's HELLO")
        conn.peer_max_frame = _max_frame(hello)
        server_nonce = auth.new_nonce()
        version = max(common)
        await _write(conn, P.FrameType.HELLO, {"version": version, "nonce": server_nonce.hex(),
                                                "max_frame": conn.options.max_frame})  # fmt: skip
        proof = _hex(await _read(conn, P.FrameType.AUTH, "after our greeting"), "proof", 32, "client's AUTH")
        if not auth.proof_matches(auth.client_proof(secret, server_nonce, client_nonce), proof):
            raise AuthenticationFailed(
                "the client's proof does not match: it holds another shared secret "
                f"(check {auth.SECRET_ENV} / {auth.SECRET_FILE_ENV} on both workers)"
            )
        await _write(conn, P.FrameType.AUTH_OK, {"proof": auth.server_proof(secret, client_nonce, server_nonce).hex()})

    await _bounded(conn, steps())
