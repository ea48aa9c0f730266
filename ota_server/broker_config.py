"""Mosquitto password file and ACL for the provisioned fleet.

Each device's password hash (Mosquitto's ``$7$`` PBKDF2-SHA512 format) is computed once at
provisioning, so the plaintext never needs to be stored. The ACL gives each device only its own
topics (``edgeota_contract.topics.mosquitto_acl_patterns``); the server user gets the whole tree.

The generated ``edgeota.conf`` also raises Mosquitto's per-client queue limits (:data:`BROKER_LIMITS`):
its defaults (20 in flight, 1,000 queued) would drop QoS 1 reports queued for the server's
session whenever its ingest applies back-pressure during a fleet-wide burst.

It also sets ``use_username_as_clientid``: the broker takes each client's id from its user name, so a
device holding valid credentials cannot connect under another device's client id and take over (and
so disconnect) that device's session. The server's own session id is then its ``mqtt_username``:
give each server instance that shares a broker a user name of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from edgeota_contract.errors import ContractError
from edgeota_contract.messages import MAX_MESSAGE_BYTES
from edgeota_contract.topics import PREFIX, mosquitto_acl_patterns
from ota_server.core.config import Settings
from ota_server.core.security import mosquitto_password_hash
from ota_server.db import make_sessionmaker
from ota_server.local_db import database_error, open_server_database
from ota_server.models import Device

BROKER_LIMITS: dict[str, int] = {
    # QoS 1 messages in flight to one client (the server) before the broker waits for its PUBACKs.
    "max_inflight_messages": 1000,
    # Messages queued for one client (the server's session) while it is slow, busy or reconnecting:
    # a burst of ~20 reports per device for a 10,000-device fleet.
    "max_queued_messages": 200_000,
    "max_queued_bytes": 0,  # no byte limit: the message count above and the size limit bound memory
    "message_size_limit": MAX_MESSAGE_BYTES,
}


BROKER_IDENTITY = "use_username_as_clientid true\n"
"""A client's id is its user name: no device can take over another's session by naming its client id."""


def config_warnings(settings: Settings) -> list[str]:
    """What is wrong with writing a broker configuration for ``settings`` that is not worth refusing it for.

    The configuration turns anonymous access off, so a server without a user name and password of its own
    could no longer connect to the broker it configures.
    """
    if not settings.mqtt_username:
        return [
            "no server user is configured (mqtt_username / EDGEOTA_SERVER_MQTT_USERNAME) and this configuration "
            "turns anonymous access off: the server could not connect to the broker; set the server's mqtt_username "
            "and mqtt_password, then run this again"
        ]
    if settings.mqtt_password is None:
        return [
            f"server user {settings.mqtt_username!r} has no password (mqtt_password / EDGEOTA_SERVER_MQTT_PASSWORD), "
            "so it is not in passwd and the server could not log in; set it, then run this again"
        ]
    return []


def render_limits() -> str:
    return "".join(f"{name} {value}\n" for name, value in BROKER_LIMITS.items())


def render_acl(server_user: str | None) -> str:
    lines = ["# written by `edgeota broker config`", ""]
    if server_user:
        lines += [f"user {server_user}", f"topic readwrite {PREFIX}/#", ""]
    lines += mosquitto_acl_patterns()
    return "\n".join(lines) + "\n"


def render_passwd(entries: list[tuple[str, str]]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in entries)


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def write_broker_config(settings: Settings, out: Path) -> list[Path]:
    """Write ``passwd``, ``acl`` and ``edgeota.conf`` into ``out``; returns the paths.

    Raises:
        ContractError: a device id could not be a Mosquitto user name (contains ``:``); the server's database
            does not exist or cannot be read (:func:`ota_server.local_db.open_server_database`).
    """
    engine = open_server_database(settings)
    try:
        with make_sessionmaker(engine)() as session:
            # A decommissioned device gets no password: its MQTT access ends when this file is reloaded.
            active = select(Device).where(Device.decommissioned_at.is_(None)).order_by(Device.id)
            entries = [(d.id, d.mqtt_password_hash) for d in session.scalars(active)]
    except SQLAlchemyError as exc:
        raise database_error(exc) from None
    finally:
        engine.dispose()
    server_user = settings.mqtt_username
    if server_user and settings.mqtt_password is not None:
        entries.insert(0, (server_user, mosquitto_password_hash(settings.mqtt_password.get_secret_value())))
    for user, _ in entries:
        if ":" in user:
            raise ContractError(f"user name {user!r} cannot appear in a Mosquitto password file")
    out.mkdir(parents=True, exist_ok=True)
    passwd = _write(out / "passwd", render_passwd(entries))
    acl = _write(out / "acl", render_acl(server_user))
    conf = _write(
        out / "edgeota.conf",
        f"allow_anonymous false\npassword_file {passwd.resolve()}\nacl_file {acl.resolve()}\n"
        + BROKER_IDENTITY
        + render_limits(),
        0o644,
    )
    return [passwd, acl, conf]
