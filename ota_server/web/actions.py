"""The device actions of the dashboard: bulk labelling and saved filters (raise ``ota_server.errors``).

Each function changes rows in the caller's session and writes its audit rows there; the caller commits once, so a
refused request changes nothing.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import Device
from ota_server.services import audit
from ota_server.web.fleet_view import LABEL_KEY, DeviceQuery
from ota_server.web.models import SavedFilter

MAX_BULK = 500
MAX_FILTERS = 50
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:/+-]{0,128}$")
_FILTER_NAME = re.compile(r"^[A-Za-z0-9 _.-]{1,64}$")


def label_devices(session: Session, device_ids: list[str], key: str, value: str | None, actor: str) -> int:
    """Set ``key=value`` (or remove ``key`` when ``value`` is None) on each device; returns the devices changed.

    Raises InvalidRequest for no devices, more than :data:`MAX_BULK`, a bad key or value; NotFound when an id names
    no device (then nothing changes).
    """
    ids = sorted(set(device_ids))
    if not ids:
        raise InvalidRequest("select at least one device")
    if len(ids) > MAX_BULK:
        raise InvalidRequest(f"at most {MAX_BULK} devices at once")
    if not LABEL_KEY.match(key):
        raise InvalidRequest("label key: 1-64 letters, digits, _ . -")
    if value is not None and not _LABEL_VALUE.match(value):
        raise InvalidRequest("label value: at most 128 letters, digits, _ . : / + -")
    devices = list(session.scalars(select(Device).where(Device.id.in_(ids))))
    if len(devices) != len(ids):
        missing = sorted(set(ids) - {d.id for d in devices})
        raise NotFound(f"no such device: {', '.join(missing[:5])}")
    changed = 0
    for device in devices:
        before = dict(device.labels or {})
        after = dict(before)
        if value is None:
            after.pop(key, None)
        else:
            after[key] = value
        if after == before:
            continue
        device.labels = after  # a new dict: the JSON column is saved only when reassigned
        audit.record(session, actor, "device.labels", "device", device.id, {"labels": before}, {"labels": after})
        changed += 1
    return changed


def saved_filters(session: Session, token_id: str) -> list[SavedFilter]:
    return list(session.scalars(select(SavedFilter).where(SavedFilter.token_id == token_id).order_by(SavedFilter.name)))


def save_filter(session: Session, token_id: str, name: str, query: DeviceQuery) -> SavedFilter:
    """Store (or replace) the filter ``name`` of ``token_id``. InvalidRequest for a bad name, an empty filter, or
    more than :data:`MAX_FILTERS` filters."""
    name = name.strip()
    if not _FILTER_NAME.match(name):
        raise InvalidRequest("filter name: 1-64 letters, digits, spaces, _ . -")
    if query.empty:
        raise InvalidRequest("nothing to save: the filter is empty")
    row = session.scalar(select(SavedFilter).where(SavedFilter.token_id == token_id, SavedFilter.name == name))
    if row is None:
        count = session.scalar(select(func.count()).where(SavedFilter.token_id == token_id)) or 0
        if count >= MAX_FILTERS:
            raise InvalidRequest(f"at most {MAX_FILTERS} saved filters")
        row = SavedFilter(token_id=token_id, name=name, query=query.as_dict())
        session.add(row)
    else:
        row.query = query.as_dict()
    return row


def delete_filter(session: Session, token_id: str, filter_id: int) -> None:
    """Delete one of ``token_id``'s filters; NotFound for another token's or an unknown filter."""
    row = session.get(SavedFilter, filter_id)
    if row is None or row.token_id != token_id:
        raise NotFound(f"saved filter {filter_id} not found")
    session.delete(row)


def filter_query_string(query: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return urlencode({k: str(v) for k, v in sorted(query.items()) if v})
