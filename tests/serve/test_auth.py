"""The shared secret (env var, file, generated at mode 0600) and the handshake's proofs."""

from __future__ import annotations

import os
import stat

import pytest

from tensorwire.errors import SecretError
from tensorwire.serve import auth


def test_ensure_secret_file_creates_a_0600_secret_once(tmp_path):
    path = tmp_path / "sub" / "secret"
    assert auth.ensure_secret_file(path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert len(first.strip()) == 64 and int(first, 16) >= 0
    auth.ensure_secret_file(path)
    assert path.read_text() == first  # never replaced
    assert auth.load_secret(path) == first.strip().encode()


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = auth.ensure_secret_file(tmp_path / "secret")
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        auth.load_secret(path)
    with pytest.raises(SecretError, match="chmod 600"):
        auth.ensure_secret_file(path)


def test_the_secret_comes_from_the_env_var_then_the_file(tmp_path):
    path = auth.ensure_secret_file(tmp_path / "secret")
    assert auth.load_secret(env={"TENSORWIRE_SECRET": "  a-secret-of-20-chars \n"}) == b"a-secret-of-20-chars"
    assert auth.load_secret(env={"TENSORWIRE_SECRET_FILE": str(path)}) == path.read_text().strip().encode()
    assert auth.load_secret(env={"TENSORWIRE_SECRET": "x" * 16, "TENSORWIRE_SECRET_FILE": str(path)}) == b"x" * 16
    with pytest.raises(SecretError, match="TENSORWIRE_SECRET"):
        auth.load_secret(env={})
    with pytest.raises(SecretError, match="cannot read"):
        auth.load_secret(env={"TENSORWIRE_SECRET_FILE": str(tmp_path / "missing")})


def test_short_secrets_are_refused():
    with pytest.raises(SecretError, match="at least 16"):
        auth.as_secret("short")
    assert auth.as_secret(b"b" * 16) == b"b" * 16


def test_proofs_bind_the_direction_and_both_nonces():
    key, a, b = b"k" * 32, auth.new_nonce(), auth.new_nonce()
    assert a != b and len(a) == auth.NONCE_BYTES
    client = auth.client_proof(key, a, b)
    assert len(client) == 32
    assert client != auth.server_proof(key, b, a)  # a client proof is no server proof
    assert client != auth.client_proof(key, b, a) and client != auth.client_proof(b"j" * 32, a, b)
    assert auth.proof_matches(client, auth.client_proof(key, a, b))
    assert not auth.proof_matches(client, bytes(32))
    assert len({auth.generate_secret() for _ in range(20)}) == 20
