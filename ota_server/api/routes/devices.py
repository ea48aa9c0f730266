"""Device provisioning and inventory."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.api.deps import CtxDep, Operator, SessionDep, Viewer
from ota_server.api.responses import DeviceDetail, DeviceProvisioned, DeviceSummary
from ota_server.api.schemas import DeviceCreate
from ota_server.errors import NotFound
from ota_server.models import Device
from ota_server.services import devices as svc

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("", status_code=201, response_model=DeviceProvisioned)
def provision(body: DeviceCreate, ctx: CtxDep, session: SessionDep, who: Operator) -> dict[str, Any]:
    """Register a device; returns its token, MQTT credentials and ``agent.toml`` (shown once)."""
    out = svc.provision(ctx, session, body.hardware_profile, body.labels, body.device_id, who.name)
    session.commit()
    return out


# A JSONResponse (not validated again): listing large fleets is a hot path.
@router.get("", response_model=list[DeviceSummary])
def list_devices(
    ctx: CtxDep,
    session: SessionDep,
    _who: Viewer,
    profile: str | None = Query(default=None, max_length=64),
    label: str | None = Query(default=None, max_length=2000, description="label selector k=v,k2=v2"),
    online: bool | None = None,
    limit: int = Query(default=1000, ge=1, le=100_000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
    include_decommissioned: bool = Query(default=False, alias="all", description="also decommissioned devices"),
) -> JSONResponse:
    labels = svc.parse_label_selector(label)
    timeout = ctx.settings.device_heartbeat_timeout_seconds
    return JSONResponse(
        svc.list_devices(session, timeout, profile, labels, online, limit, offset, include_decommissioned)
    )


@router.get("/{device_id}", response_model=DeviceDetail)
def show(
    ctx: CtxDep, session: SessionDep, _who: Viewer, device_id: str = PathParam(pattern=DEVICE_ID_PATTERN)
) -> dict[str, Any]:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} not found")
    return svc.device_detail(session, device, ctx.settings.device_heartbeat_timeout_seconds)
