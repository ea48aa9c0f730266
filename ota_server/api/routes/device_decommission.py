"""Device decommissioning: ``POST /api/v1/devices/{id}/decommission`` (operator role, audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi import Path as PathParam

from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.api.deps import CtxDep, Operator
from ota_server.api.responses import DeviceDecommissioned
from ota_server.api.schemas import DecommissionBody
from ota_server.services.decommission import decommission

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("/{device_id}/decommission", response_model=DeviceDecommissioned)
def decommission_device(
    ctx: CtxDep,
    who: Operator,
    device_id: str = PathParam(pattern=DEVICE_ID_PATTERN),
    body: DecommissionBody | None = None,
) -> dict[str, Any]:
    """Revoke the device's token, take it out of every open rollout (its open deployments cancelled) and hide
    it from device lists (``?all=true`` shows it); its history stays. 404 unknown, 409 already decommissioned."""
    return decommission(ctx, device_id, who.name, (body or DecommissionBody()).reason)
