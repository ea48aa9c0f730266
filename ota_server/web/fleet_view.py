"""The overview and device pages' queries: grouped and paged in SQL, whatever the size of the fleet.

A device is online when its presence flag is set and it was seen within ``device_heartbeat_timeout_seconds``
(the rule of :func:`ota_server.services.devices.is_online`, written as a SQL condition here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, not_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import ScalarSelect

from edgeota_contract.states import DeploymentState, RolloutState
from ota_server.errors import InvalidRequest
from ota_server.models import Deployment, Device, DeviceModel, Rollout, utcnow
from ota_server.services.devices import parse_label_selector

PAGE_SIZES = (25, 50, 100, 200, 500)
_TEXT = re.compile(r"^[A-Za-z0-9_.:@/+-]{0,128}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def online_clause(now: datetime, heartbeat_timeout: float) -> ColumnElement[bool]:
    cutoff = now - timedelta(seconds=heartbeat_timeout)
    return and_(Device.presence_online.is_(True), Device.last_seen.is_not(None), Device.last_seen >= cutoff)


def devices_by_profile(session: Session, heartbeat_timeout: float) -> list[dict[str, Any]]:
    online = case((online_clause(utcnow(), heartbeat_timeout), 1), else_=0)
    rows = session.execute(
        select(Device.hardware_profile, func.count(), func.sum(online))
        .group_by(Device.hardware_profile)
        .order_by(Device.hardware_profile)
    ).all()
    return [
        {"profile": p, "total": int(n), "online": int(on or 0), "offline": int(n) - int(on or 0)} for p, n, on in rows
    ]


def devices_by_version(session: Session, heartbeat_timeout: float) -> list[dict[str, Any]]:
    """Devices per (model, serving version, profile), online and offline; devices serving nothing are apart."""
    online = case((online_clause(utcnow(), heartbeat_timeout), 1), else_=0)
    rows = session.execute(
        select(DeviceModel.model_name, DeviceModel.version, Device.hardware_profile, func.count(), func.sum(online))
        .join(Device, Device.id == DeviceModel.device_id)
        .group_by(DeviceModel.model_name, DeviceModel.version, Device.hardware_profile)
        .order_by(DeviceModel.model_name, DeviceModel.version, Device.hardware_profile)
    ).all()
    return [
        {
            "model": m,
            "version": v,
            "profile": p,
            "total": int(n),
            "online": int(on or 0),
            "offline": int(n) - int(on or 0),
        }
        for m, v, p, n, on in rows
    ]


ACTIVE_ROLLOUT_STATES = (RolloutState.RUNNING.value, RolloutState.PAUSED.value, RolloutState.SCHEDULED.value)


def active_rollouts(session: Session) -> list[Rollout]:
    return list(
        session.scalars(
            select(Rollout)
            .where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
            .order_by(Rollout.created_at.desc())
            .limit(50)
        )
    )


@dataclass(frozen=True)
class DeviceQuery:
    """A validated device filter (the query string of ``/ui/devices`` and what a saved filter stores)."""

    q: str = ""
    profile: str = ""
    version: str = ""
    state: str = ""
    labels: str = ""
    online: str = ""
    """``yes``, ``no`` or "" (any)."""

    @classmethod
    def parse(cls, values: dict[str, str]) -> DeviceQuery:
        """Raises InvalidRequest (a 400 page) for a value that is not one this filter knows."""
        q = cls(**{k: (values.get(k) or "").strip() for k in ("q", "profile", "version", "state", "labels", "online")})
        for name in ("q", "profile", "version"):
            if not _TEXT.match(getattr(q, name)):
                raise InvalidRequest(f"filter {name}: use letters, digits and _.:@/+- only (at most 128)")
        if q.state and q.state not in {s.value for s in DeploymentState}:
            raise InvalidRequest(f"filter state: {q.state!r} is not a deployment state")
        if q.online not in ("", "yes", "no"):
            raise InvalidRequest("filter online: yes, no or empty")
        if len(q.labels) > 512:
            raise InvalidRequest("filter labels: at most 512 characters")
        for key in parse_label_selector(q.labels):
            if not LABEL_KEY.match(key):
                raise InvalidRequest(f"filter labels: bad label key {key!r}")
        return q

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}

    @property
    def empty(self) -> bool:
        return not self.as_dict()


def _latest_state() -> ScalarSelect[str]:
    """The state of a device's newest deployment (a correlated scalar subquery)."""
    return (
        select(Deployment.state)
        .where(Deployment.device_id == Device.id)
        .order_by(Deployment.created_at.desc(), Deployment.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _where(query: DeviceQuery, heartbeat_timeout: float) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if query.q:
        where.append(Device.id.contains(query.q, autoescape=True))
    if query.profile:
        where.append(Device.hardware_profile == query.profile)
    if query.version:
        where.append(
            select(DeviceModel.device_id)
            .where(DeviceModel.device_id == Device.id, DeviceModel.version == query.version)
            .exists()
        )
    if query.state:
        where.append(_latest_state() == query.state)
    for key, value in parse_label_selector(query.labels).items():
        where.append(Device.labels[key].as_string() == value)
    if query.online:
        clause = online_clause(utcnow(), heartbeat_timeout)
        where.append(clause if query.online == "yes" else not_(clause))
    return where


def search_devices(
    session: Session, query: DeviceQuery, heartbeat_timeout: float, page: int, size: int
) -> tuple[int, list[dict[str, Any]]]:
    """(matching devices, one page of them ordered by id), each with its serving versions and newest deployment."""
    where = _where(query, heartbeat_timeout)
    total = int(session.scalar(select(func.count()).select_from(Device).where(*where)) or 0)
    online = online_clause(utcnow(), heartbeat_timeout)
    rows = session.execute(
        select(
            Device.id,
            Device.hardware_profile,
            Device.labels,
            Device.last_seen,
            Device.agent_version,
            online.label("online"),
        )
        .where(*where)
        .order_by(Device.id)
        .offset((page - 1) * size)
        .limit(size)
    ).all()
    ids = [r.id for r in rows]
    versions: dict[str, list[str]] = {}
    latest: dict[str, tuple[str, str]] = {}
    if ids:
        for device_id, model, version in session.execute(
            select(DeviceModel.device_id, DeviceModel.model_name, DeviceModel.version).where(
                DeviceModel.device_id.in_(ids)
            )
        ):
            versions.setdefault(device_id, []).append(f"{model} {version}")
        for device_id, state, reason, _created in session.execute(
            select(Deployment.device_id, Deployment.state, Deployment.reason, Deployment.created_at)
            .where(Deployment.device_id.in_(ids))
            .order_by(Deployment.created_at, Deployment.id)
        ):
            latest[device_id] = (state, reason)  # ordered: the newest wins
    out = [
        {
            "device_id": r.id,
            "hardware_profile": r.hardware_profile,
            "labels": r.labels or {},
            "last_seen": r.last_seen,
            "agent_version": r.agent_version,
            "online": bool(r.online),
            "versions": sorted(versions.get(r.id, [])),
            "state": latest.get(r.id, ("", ""))[0],
            "reason": latest.get(r.id, ("", ""))[1],
        }
        for r in rows
    ]
    return total, out


def filter_choices(session: Session) -> dict[str, list[str]]:
    """Known profiles and versions, for the filter form's suggestions."""
    return {
        "profiles": list(session.scalars(select(Device.hardware_profile).distinct().order_by(Device.hardware_profile))),
        "versions": list(session.scalars(select(DeviceModel.version).distinct().order_by(DeviceModel.version))),
        "states": [s.value for s in DeploymentState],
    }
