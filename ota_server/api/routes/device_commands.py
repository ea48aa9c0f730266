"""HTTP polling for commands: the pull-based alternative to the MQTT command topic."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.api.deps import AnyCaller, CtxDep
from ota_server.api.responses import DeviceCommands
from ota_server.errors import PermissionDenied
from ota_server.services.dispatch import poll_commands

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.get("/{device_id}/commands", response_model=DeviceCommands)
async def commands(
    ctx: CtxDep, who: AnyCaller, device_id: str = PathParam(pattern=DEVICE_ID_PATTERN)
) -> dict[str, object]:
    """``{"commands": [<signed command>, ...]}``: what the MQTT bridge would publish to this device now.

    One object per open deployment (oldest first), each the signed envelope of an ``Assignment``.
    Only the device itself, with its own token, may poll (403 for other devices and API tokens,
    401 without a valid token). Serving a pending deployment marks it notified, like a publish.
    """
    if who.device_id is None or who.device_id != device_id:
        raise PermissionDenied("only the device itself may poll its commands")
    return {"commands": await run_in_threadpool(poll_commands, ctx, device_id)}
