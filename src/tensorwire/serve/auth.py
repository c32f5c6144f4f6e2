"""The shared secret and the handshake's proofs (docs/PROTOCOL.md, "Handshake").

Both workers hold one secret. Each side sends a fresh 32-byte nonce; the client proves it
holds the secret first, with ``HMAC-SHA256(secret, CLIENT_LABEL || server nonce || client
nonce)``, and only then does the server prove it, with ``HMAC-SHA256(secret, SERVER_LABEL
|| client nonce || server nonce)``. The labels make a proof of one direction useless in the
other; fresh nonces make a recorded proof useless later. Proofs are compared in constant
time (:func:`hmac.compare_digest`).

The secret comes from ``TENSORWIRE_SECRET`` (the secret itself) or a file (its content,
surrounding whitespace stripped; ``TENSORWIRE_SECRET_FILE`` or an explicit path).
:func:`ensure_secret_file` makes one (mode 0600) when absent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from ..errors import SecretError

__all__ = [
    "SECRET_ENV",
    "SECRET_FILE_ENV",
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "CLIENT_LABEL",
    "SERVER_LABEL",
    "generate_secret",
    "ensure_secret_file",
    "read_secret_file",
    "load_secret",
    "as_secret",
    "new_nonce",
    "client_proof",
    "server_proof",
    "tenant_tag",
    "proof_matches",
]

SECRET_ENV = "TENSORWIRE_SECRET"
SECRET_FILE_ENV = "TENSORWIRE_SECRET_FILE"
MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
CLIENT_LABEL = b"tensorwire/1 client proof\x00"
SERVER_LABEL = b"tensorwire/1 server proof\x00"


def generate_secret() -> str:
    """A new secret: 32 random bytes (:func:`secrets.token_bytes`) written as 64 hex digits."""
    return secrets.token_bytes(32).hex()


def as_secret(secret: bytes | str) -> bytes:
    """The secret's bytes (a str is UTF-8, surrounding whitespace stripped); refuses a short one."""
    raw = secret.strip().encode() if isinstance(secret, str) else bytes(secret).strip()
    if len(raw) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the shared secret is {len(raw)} bytes, at least {MIN_SECRET_BYTES} are required; "
            "make one with tensorwire.serve.generate_secret() (64 hex digits)"
        )
    return raw


def ensure_secret_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` holding a new secret, mode 0600, unless it exists; returns the path.

    The file is created with ``O_CREAT | O_EXCL`` and mode 0600 at once, so the secret is
    never readable by others, and two launchers racing do not overwrite each other's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        read_secret_file(path)  # an existing file must be usable too
        return path
    with os.fdopen(fd, "w") as f:
        f.write(generate_secret() + "\n")
    return path


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``; refuses a file that the group or others may read or write."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_bytes()
    except OSError as exc:
        raise SecretError(f"cannot read the secret file {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"the secret file {path} has mode {stat.S_IMODE(mode):04o}; others may read it: chmod 600 {path}")
    return as_secret(text)


def load_secret(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> bytes:
    """The shared secret: ``path`` if given, else ``TENSORWIRE_SECRET``, else ``TENSORWIRE_SECRET_FILE``."""
    env = os.environ if env is None else env
    if path is not None:
        return read_secret_file(path)
    if env.get(SECRET_ENV):
        return as_secret(env[SECRET_ENV])
    if env.get(SECRET_FILE_ENV):
        return read_secret_file(env[SECRET_FILE_ENV])
    raise SecretError(
        f"no shared secret: set {SECRET_ENV} (the secret) or {SECRET_FILE_ENV} (a file holding it) on both "
        "workers; `tensorwire serve` creates a secret file when none exists"
    )


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, CLIENT_LABEL + server_nonce + client_nonce, hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, SERVER_LABEL + client_nonce + server_nonce, hashlib.sha256).digest()


def proof_matches(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison, so the time taken reveals nothing about the expected proof."""
    return hmac.compare_digest(expected, got)


def tenant_tag(api_key: str | None) -> str:
    """The namespace of a client: a hash of its API key (never the key itself), or "anonymous"."""
    if not api_key:
        return "anonymous"
    return hashlib.sha256(b"tensorwire-tenant/1" + api_key.encode()).hexdigest()[:16]
