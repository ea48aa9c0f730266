"""Readiness and counters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from ota_server.api.deps import CtxDep, Viewer
from ota_server.api.responses import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz(ctx: CtxDep) -> dict[str, Any]:
    """Ready when the database answers. Reports MQTT connectivity without failing on it."""
    with ctx.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    bridge = getattr(ctx.publisher, "connected", None)
    return {"status": "ok", "mqtt_connected": bool(bridge.is_set()) if bridge is not None else False}


@router.get("/api/v1/metrics", response_model=dict[str, int])
def metrics(ctx: CtxDep, _who: Viewer) -> dict[str, int]:
    return ctx.metrics_snapshot()
