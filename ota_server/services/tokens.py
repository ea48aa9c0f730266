"""API tokens: creation (secret shown once) and constant-time authentication."""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from ota_server.core.security import Role, hash_secret, new_secret, secret_matches, split_token
from ota_server.models import ApiToken, Device
from ota_server.services import audit


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API token holder (with a role) or a device."""

    name: str
    role: Role | None
    device_id: str | None = None


def create_token(session: Session, role: Role, name: str, actor: str) -> tuple[ApiToken, str]:
    """Store a new token (hashed) and return it with its one-time plaintext ``<id>.<secret>``."""
    secret = new_secret()
    token = ApiToken(id=uuid.uuid4().hex, name=name, role=role.value, secret_hash=hash_secret(secret), created_by=actor)
    session.add(token)
    audit.record(session, actor, "token.create", "token", token.id, None, {"role": role.value, "name": name})
    return token, f"{token.id}.{secret}"


def authenticate(session: Session, bearer: str, admin_token: str | None) -> Principal | None:
    """Resolve a bearer token to a principal, or None. All secret comparisons are constant time."""
    if admin_token and hmac.compare_digest(bearer.encode("utf-8"), admin_token.encode("utf-8")):
        return Principal("bootstrap-admin", Role.ADMIN)
    parts = split_token(bearer)
    if parts is None:
        return None
    ident, secret = parts
    if ident.startswith("dev:"):
        device = session.get(Device, ident[4:])
        if device is not None and device.decommissioned_at is None and secret_matches(secret, device.token_hash):
            return Principal(f"device:{device.id}", None, device.id)
        return None
    if len(ident) > 64:
        return None
    token = session.get(ApiToken, ident)
    if token is None or token.revoked or not secret_matches(secret, token.secret_hash):
        return None
    return Principal(f"token:{token.name}", Role(token.role))
