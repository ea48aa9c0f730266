"""Device provisioning and inventory."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.provisioning import DeviceProvisioning, DeviceSection, MqttSection, ServerSection, TrustSection
from ota_server.context import ServerContext
from ota_server.core.security import hash_secret, mosquitto_password_hash, new_secret
from ota_server.errors import Conflict, InvalidRequest
from ota_server.models import Deployment, Device, DeviceModel, utcnow
from ota_server.services import audit
from ota_server.services.profiles import require_known_profile


def provision(
    ctx: ServerContext,
    session: Session,
    hardware_profile: str,
    labels: dict[str, str],
    device_id: str | None,
    actor: str,
) -> dict[str, Any]:
    """Register a device and return its one-time credentials and ``agent.toml``.

    Raises:
        Conflict: the device id is taken, or no release keys are configured (a device could trust nothing).
        InvalidRequest: the server does not know ``hardware_profile`` (:mod:`ota_server.services.profiles`).
    """
    if not ctx.release_key_pems:
        raise Conflict("no trusted release keys configured; set EDGEOTA_SERVER_RELEASE_KEYS")
    require_known_profile(ctx.settings, session, hardware_profile)
    device_id = device_id or f"dev-{uuid.uuid4().hex[:12]}"
    if session.get(Device, device_id) is not None:
        raise Conflict(f"device {device_id} already exists")
    token_secret = new_secret()
    mqtt_password = new_secret()
    device = Device(
        id=device_id,
        hardware_profile=hardware_profile,
        labels=dict(labels),
        token_hash=hash_secret(token_secret),
        mqtt_password_hash=mosquitto_password_hash(mqtt_password),
    )
    session.add(device)
    audit.record(
        session,
        actor,
        "device.provision",
        "device",
        device_id,
        None,
        {"hardware_profile": hardware_profile, "labels": dict(labels)},
    )
    token = f"dev:{device_id}.{token_secret}"
    s = ctx.settings
    agent = DeviceProvisioning(
        device=DeviceSection(id=device_id, hardware_profile=hardware_profile),
        server=ServerSection(url=s.public_url, token=token),
        mqtt=MqttSection(
            host=s.mqtt_device_host or s.mqtt_host,
            port=s.mqtt_device_port or s.mqtt_port,
            username=device_id,
            password=mqtt_password,
            tls=s.mqtt_tls,
            protocol=s.mqtt_protocol,
        ),
        trust=TrustSection(
            release_keys=list(ctx.release_key_pems),
            server_keys=[ctx.server_key.public_pem().decode()],
            tuf_root=ctx.tuf.root_json() if ctx.tuf is not None else None,
        ),
    )
    return {
        "device_id": device_id,
        "token": token,
        "mqtt_username": device_id,
        "mqtt_password": mqtt_password,
        "agent_toml": agent.to_toml(),
    }


def is_online(device: DeviceLike, heartbeat_timeout: float, now: datetime | None = None) -> bool:
    if not device.presence_online or device.last_seen is None:
        return False
    return (now or utcnow()) - device.last_seen <= timedelta(seconds=heartbeat_timeout)


def parse_label_selector(selector: str | None) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> dict; raises InvalidRequest on a malformed term."""
    out: dict[str, str] = {}
    for term in (selector or "").split(","):
        term = term.strip()
        if not term:
            continue
        key, sep, value = term.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"label selector term {term!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


class DeviceLike(Protocol):
    """What a summary needs: a :class:`Device` or a row of :data:`SUMMARY_COLUMNS`."""

    id: str
    hardware_profile: str
    labels: dict[str, Any]
    last_seen: datetime | None
    agent_version: str | None
    presence_online: bool
    decommissioned_at: datetime | None


SUMMARY_COLUMNS = (
    Device.id,
    Device.hardware_profile,
    Device.labels,
    Device.last_seen,
    Device.agent_version,
    Device.presence_online,
    Device.decommissioned_at,
)


def device_summary(device: DeviceLike, heartbeat_timeout: float) -> dict[str, Any]:
    return {
        "device_id": device.id,
        "hardware_profile": device.hardware_profile,
        "labels": device.labels,
        "online": is_online(device, heartbeat_timeout),
        "last_seen": device.last_seen.isoformat() if device.last_seen else None,
        "agent_version": device.agent_version,
        "decommissioned_at": device.decommissioned_at.isoformat() if device.decommissioned_at else None,
    }


def list_devices(
    session: Session,
    heartbeat_timeout: float,
    profile: str | None,
    labels: dict[str, str],
    online: bool | None,
    limit: int,
    offset: int,
    include_decommissioned: bool = False,
) -> list[dict[str, Any]]:
    """Device summaries in id order; decommissioned devices only with ``include_decommissioned``."""
    # Plain rows of the summary columns: building ORM objects cost most of this endpoint's time.
    stmt = select(*SUMMARY_COLUMNS).order_by(Device.id)
    if not include_decommissioned:
        stmt = stmt.where(Device.decommissioned_at.is_(None))
    if profile:
        stmt = stmt.where(Device.hardware_profile == profile)
    if not labels and online is None:  # the common case pages in SQL
        return [device_summary(row, heartbeat_timeout) for row in session.execute(stmt.offset(offset).limit(limit))]
    out = []
    for row in session.execute(stmt):
        if any(str(row.labels.get(k)) != v or k not in row.labels for k, v in labels.items()):
            continue
        summary = device_summary(row, heartbeat_timeout)
        if online is not None and summary["online"] != online:
            continue
        out.append(summary)
    return out[offset : offset + limit]


def deployment_json(dep: Deployment) -> dict[str, Any]:
    return {
        "deployment_id": dep.id,
        "rollout_id": dep.rollout_id,
        "device_id": dep.device_id,
        "mode": dep.mode,
        "stage": dep.stage,
        "model_name": dep.model_name,
        "version": dep.version,
        "bundle_sha256": dep.bundle_sha256,
        "release_counter": dep.release_counter,
        "state": dep.state,
        "reason": dep.reason,
        "detail": dep.detail,
        "attempt": dep.attempt,
        "retried": dep.retried,
        "created_at": dep.created_at.isoformat(),
        "updated_at": dep.updated_at.isoformat(),
    }


def device_detail(session: Session, device: Device, heartbeat_timeout: float) -> dict[str, Any]:
    models = session.scalars(
        select(DeviceModel).where(DeviceModel.device_id == device.id).order_by(DeviceModel.model_name)
    )
    deployments = session.scalars(
        select(Deployment).where(Deployment.device_id == device.id).order_by(Deployment.created_at.desc()).limit(20)
    )
    return {
        **device_summary(device, heartbeat_timeout),
        "models": [
            {
                "model_name": m.model_name,
                "version": m.version,
                "bundle_sha256": m.bundle_sha256,
                "release_counter": m.release_counter,
                "previous_version": m.previous_version,
                "updated_at": m.updated_at.isoformat(),
            }
            for m in models
        ],
        "deployments": [deployment_json(d) for d in deployments],
    }
