"""What the retraining loop left, shown where it exists: open alerts (with their dataset exports) and evaluations.

Both packages are optional to the dashboard: without ``ota_server.alerts`` the pages say "alerts: not configured",
without ``ota_server.services.evaluations`` "evaluations: not configured". Reads only.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session


def _module(name: str) -> Any | None:
    try:
        return importlib.import_module(name) if importlib.util.find_spec(name) is not None else None
    except ImportError:
        return None


def open_alerts(session: Session, model: str | None = None, limit: int = 50) -> list[Any] | None:
    """The firing or acknowledged alerts, newest first (None when alerts are not part of this server)."""
    records = _module("ota_server.alerts.records")
    if records is None:
        return None
    alert = records.Alert
    stmt = select(alert).where(alert.state.in_(records.OPEN_STATES))
    if model:
        stmt = stmt.where(alert.model_name == model)
    return list(session.scalars(stmt.order_by(alert.last_seen.desc()).limit(limit)))


def exports(session: Session, model: str | None = None, limit: int = 20) -> list[Any] | None:
    """Alerts whose dataset export ran or failed (the retraining loop's exports), newest first."""
    records = _module("ota_server.alerts.records")
    if records is None:
        return None
    alert = records.Alert
    stmt = select(alert).where(alert.export_state != "none")
    if model:
        stmt = stmt.where(alert.model_name == model)
    return list(session.scalars(stmt.order_by(alert.last_seen.desc()).limit(limit)))


def evaluations(session: Session, release_id: str | None = None, model: str | None = None) -> list[Any] | None:
    """Uploaded evaluations (newest first) of one release as candidate, or of one model; None when not present."""
    service = _module("ota_server.services.evaluations")
    if service is None:
        return None
    rows = list(service.list_evaluations(session, release_id, 20, 0))
    return [e for e in rows if model is None or e.model_name == model]
