"""The audit log, read-only."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query

from ota_server.api.deps import Operator, SessionDep
from ota_server.api.responses import AuditEntry
from ota_server.services import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditEntry])
def list_audit(
    session: SessionDep,
    _who: Operator,
    actor: str | None = Query(default=None, max_length=128),
    action: str | None = Query(default=None, max_length=64),
    entity_type: str | None = Query(default=None, max_length=32),
    entity_id: str | None = Query(default=None, max_length=128),
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, object]]:
    entries = audit.query(
        session,
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return [audit.to_json(e) for e in entries]
