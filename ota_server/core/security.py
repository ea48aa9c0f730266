"""Tokens, roles, password hashes and the server's signing key.

Token secrets are stored as sha256 digests and compared with :func:`hmac.compare_digest`.
A token reads ``<id>.<secret>``: the id finds the row, the secret is checked in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from enum import StrEnum
from pathlib import Path

from edgeota_contract.signing import SigningKey, load_private_key, write_keypair


class Role(StrEnum):
    """API roles, each allowed everything the ones before it may do."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    RELEASE_MANAGER = "release_manager"
    ADMIN = "admin"

    @property
    def level(self) -> int:
        return list(Role).index(self)

    def allows(self, required: Role) -> bool:
        return self.level >= required.level


def new_secret(nbytes: int = 24) -> str:
    """A URL-safe random secret (never contains a dot)."""
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of ``secret`` against its stored sha256 digest."""
    return hmac.compare_digest(hash_secret(secret).encode("ascii"), stored_hash.encode("ascii"))


def split_token(token: str) -> tuple[str, str] | None:
    """``"<id>.<secret>"`` -> ``(id, secret)``; None when the token has no such shape."""
    ident, sep, secret = token.rpartition(".")
    if not sep or not ident or not secret:
        return None
    return ident, secret


MOSQUITTO_PBKDF2_ITERATIONS = 101


def mosquitto_password_hash(
    password: str, salt: bytes | None = None, iterations: int = MOSQUITTO_PBKDF2_ITERATIONS
) -> str:
    """The ``$7$`` PBKDF2-SHA512 hash Mosquitto 2 reads from its password file."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def load_or_create_server_key(path: Path) -> SigningKey:
    """Load the server's command-signing key, generating it (0600, public half beside it) if missing."""
    if not path.exists():
        write_keypair(path)
    key = load_private_key(path)
    pub = path.with_name(path.name.removesuffix(".pem") + ".pub.pem")
    if not pub.exists():
        pub.write_bytes(key.public_pem())
    return key
