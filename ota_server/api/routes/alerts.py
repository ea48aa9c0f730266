"""Alerts: list and show (viewer and up), acknowledge (operator, audited). See docs/alerts.md."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from ota_server.alerts import service as svc
from ota_server.alerts.delivery import alert_json
from ota_server.alerts.records import Alert, AlertDelivery
from ota_server.api.deps import Operator, SessionDep, Viewer
from ota_server.api.responses_alerts import AlertRecord
from ota_server.models import utcnow

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
_ID = r"^[0-9a-f]{32}$"


class AckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=1000)


def _delivery_json(d: AlertDelivery) -> dict[str, Any]:
    return {
        "event": d.event,
        "target": d.target,
        "target_kind": d.target_kind,
        "delivery_id": d.delivery_id,
        "state": d.state,
        "attempts": d.attempts or [],
        "created_at": d.created_at.isoformat(),
        "updated_at": d.updated_at.isoformat(),
    }


def _records(session: Any, alerts: list[Alert]) -> list[dict[str, Any]]:
    deliveries = svc.deliveries_of(session, [a.id for a in alerts])
    return [{**alert_json(a), "deliveries": [_delivery_json(d) for d in deliveries[a.id]]} for a in alerts]


@router.get("", response_model=list[AlertRecord])
def list_alerts(
    session: SessionDep,
    _who: Viewer,
    state: Literal["open", "firing", "acknowledged", "resolved"] | None = Query(
        default=None, description="open = firing or acknowledged"
    ),
    rule: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    """Alerts newest first, each with its deliveries and their attempts."""
    return _records(session, svc.list_alerts(session, state, rule, limit, offset))


@router.get("/{alert_id}", response_model=AlertRecord)
def show_alert(session: SessionDep, _who: Viewer, alert_id: str = Path(pattern=_ID)) -> dict[str, Any]:
    return _records(session, [svc.get_alert(session, alert_id)])[0]


@router.post("/{alert_id}/ack", response_model=AlertRecord)
def ack_alert(
    session: SessionDep, who: Operator, alert_id: str = Path(pattern=_ID), body: AckBody | None = None
) -> dict[str, Any]:
    """firing -> acknowledged (409 when already acknowledged or resolved); recorded in the audit log as
    ``alert.ack``. An acknowledged alert still resolves when its condition clears."""
    alert = svc.acknowledge(session, alert_id, who.name, (body or AckBody()).reason, utcnow())
    session.commit()
    return _records(session, [alert])[0]
