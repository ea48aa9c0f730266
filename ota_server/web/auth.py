"""Dashboard sign-in: API token -> server-side session -> signed, httponly, SameSite=Strict cookie; CSRF tokens.

The cookie holds ``<secret>.<mac>``: a random secret (its sha256 is the session row's id) and an HMAC of it under a
key derived from the server's signing key, so a forged or truncated cookie is refused before any database read.
Every request re-checks the session against its token: a revoked token, a changed role or a deleted token ends
the session at once. The token itself never reaches the cookie or the database.

Guarantees: :func:`sign_in` returns None for any token :func:`ota_server.services.tokens.authenticate` refuses, and
for device tokens (devices have no dashboard); :func:`load_session` returns None for a missing, forged, expired or
orphaned session; :func:`csrf_ok` compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from ota_server.context import ServerContext
from ota_server.core.security import Role, split_token
from ota_server.models import ApiToken, utcnow
from ota_server.services import audit
from ota_server.services.tokens import authenticate
from ota_server.web.models import UiSession

COOKIE = "edgeota_ui"
LOGIN_COOKIE = "edgeota_ui_login"
"""A short-lived random value the sign-in form's CSRF field is bound to (there is no session yet)."""
SESSION_HOURS = 8
BOOTSTRAP_ID = "bootstrap-admin"


@dataclass(frozen=True)
class UiUser:
    """Who is signed in: the token's id and name, its role, the session's CSRF token."""

    session_id: str
    token_id: str
    name: str
    role: Role
    csrf: str

    def may(self, role: Role) -> bool:
        return self.role.allows(role)


def cookie_key(ctx: ServerContext) -> bytes:
    """The HMAC key of the cookies: derived from the server's private key (the same in every worker and restart)."""
    raw = ctx.server_key.private_pem()
    return hmac.new(raw, b"edgeota dashboard cookie v1", hashlib.sha256).digest()


def sign(key: bytes, value: str) -> str:
    mac = hmac.new(key, value.encode("ascii"), hashlib.sha256).hexdigest()
    return f"{value}.{mac}"


def unsign(key: bytes, signed: str | None) -> str | None:
    """The value of a cookie made by :func:`sign`, or None when it is absent, malformed or its MAC is wrong."""
    if not signed or len(signed) > 256:
        return None
    value, sep, mac = signed.rpartition(".")
    if not sep or not value:
        return None
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        return None
    good = hmac.new(key, value.encode("ascii"), hashlib.sha256).hexdigest()
    return value if hmac.compare_digest(good.encode("ascii"), mac.encode("ascii", "replace")) else None


def _bootstrap_id(admin_token: str) -> str:
    """The bootstrap admin's "token id": bound to the configured token, so changing it ends the old sessions."""
    return f"{BOOTSTRAP_ID}:{hashlib.sha256(admin_token.encode('utf-8')).hexdigest()[:16]}"


def _session_id(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def sign_in(ctx: ServerContext, session: Session, token: str, now: datetime | None = None) -> tuple[str, UiUser] | None:
    """Check ``token`` and open a session; returns (cookie value, user), or None when the token is refused.

    Audited as ``ui.sign_in``; the caller commits.
    """
    token = token.strip()
    if not token or len(token) > 512:
        return None
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    who = authenticate(session, token, admin)
    if who is None or who.role is None:
        return None
    if who.name == BOOTSTRAP_ID:
        assert admin is not None  # authenticate accepted the bootstrap token
        token_id = _bootstrap_id(admin)
    else:
        parts = split_token(token)
        assert parts is not None  # authenticate accepted it
        token_id = parts[0]
    now = now or utcnow()
    secret = secrets.token_urlsafe(32)
    row = UiSession(
        id=_session_id(secret),
        token_id=token_id,
        principal=who.name,
        role=who.role.value,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + timedelta(hours=SESSION_HOURS),
    )
    session.add(row)
    # Expired sessions of anyone are dropped here, so the table stays as small as the signed-in browsers.
    session.execute(delete(UiSession).where(UiSession.expires_at < now))
    audit.record(session, who.name, "ui.sign_in", "token", token_id, None, {"role": who.role.value})
    return sign(cookie_key(ctx), secret), UiUser(row.id, token_id, who.name, who.role, row.csrf)


def load_session(
    ctx: ServerContext, session: Session, cookie: str | None, now: datetime | None = None
) -> UiUser | None:
    """The signed-in user of ``cookie``, or None (see the module docstring for what ends a session)."""
    secret = unsign(cookie_key(ctx), cookie)
    if secret is None:
        return None
    row = session.get(UiSession, _session_id(secret))
    if row is None or row.expires_at <= (now or utcnow()):
        return None
    if row.token_id.startswith(BOOTSTRAP_ID):
        admin = ctx.settings.admin_token
        if admin is None or not hmac.compare_digest(row.token_id, _bootstrap_id(admin.get_secret_value())):
            return None  # the bootstrap token was removed or changed: its sessions end with it
        role = Role.ADMIN
    else:
        token = session.get(ApiToken, row.token_id)
        if token is None or token.revoked or token.role != row.role:
            return None
        role = Role(token.role)
    return UiUser(row.id, row.token_id, row.principal, role, row.csrf)


def sign_out(session: Session, user: UiUser) -> None:
    """End the session (the caller commits); the cookie is worthless afterwards even if kept."""
    session.execute(delete(UiSession).where(UiSession.id == user.session_id))
    audit.record(session, user.name, "ui.sign_out", "token", user.token_id)


def csrf_ok(expected: str, given: str | None) -> bool:
    """Constant-time check of a posted CSRF token."""
    if not given or not expected:
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))


def login_csrf(key: bytes, nonce: str) -> str:
    """The sign-in form's CSRF value for the login cookie's ``nonce``."""
    return hmac.new(key, f"login:{nonce}".encode("ascii"), hashlib.sha256).hexdigest()


@dataclass
class SignInThrottle:
    """At most ``limit`` failed sign-ins per client address per ``window`` seconds (then 429 until they age out).

    Tokens are long random secrets, so this is about noise and log flooding more than guessing; behind a proxy
    every browser shares the proxy's address. Memory is bounded: the table is cleared past ``max_clients``.
    """

    limit: int = 10
    window: float = 60.0
    max_clients: int = 100_000
    failures: dict[str, deque[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blocked(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self.lock:
            recent = self.failures.get(client)
            if recent is None:
                return False
            while recent and now - recent[0] > self.window:
                recent.popleft()
            return len(recent) >= self.limit

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            if len(self.failures) >= self.max_clients:
                self.failures.clear()
            self.failures.setdefault(client, deque(maxlen=self.limit)).append(now)
