"""Device decommissioning: the device's credentials stop working, it leaves every rollout, its history stays.

One unit of work (:func:`ota_server.rollout.unit_of_work.unit_of_work`): the device row is marked, its
token hash replaced by the hash of a secret nobody holds (and authentication refuses a decommissioned
device anyway), it leaves the open rollouts' targets and its open deployments are cancelled
(:mod:`ota_server.rollout.decommission`), and an audit row records who did it and why. Either all of it
is committed or none of it.

The broker's password file is written by ``edgeota broker config``, which leaves decommissioned devices
out: run it again (and reload Mosquitto) to close the device's MQTT access.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ota_server.context import ServerContext
from ota_server.core.security import hash_secret, new_secret
from ota_server.errors import Conflict, NotFound
from ota_server.models import Device, utcnow
from ota_server.rollout.decommission import leave_rollouts
from ota_server.rollout.unit_of_work import unit_of_work
from ota_server.services import audit


def decommission(ctx: ServerContext, device_id: str, actor: str, reason: str = "") -> dict[str, Any]:
    """Decommission ``device_id``; returns what changed (``DeviceDecommissioned``).

    Raises:
        NotFound: no such device.
        Conflict: the device is already decommissioned (nothing changes).
    """
    now = utcnow()
    with unit_of_work(ctx) as unit:
        session = unit.session
        device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
        if device is None:
            raise NotFound(f"device {device_id} not found")
        if device.decommissioned_at is not None:
            raise Conflict(f"device {device_id} was decommissioned at {device.decommissioned_at.isoformat()}")
        device.decommissioned_at = now
        # The stored hash can no longer match the token the device holds: revoked even for a reader
        # that forgets to check decommissioned_at.
        device.token_hash = hash_secret(new_secret())
        device.presence_online = False
        left = leave_rollouts(session, device_id, actor, now)
        audit.record(
            session,
            actor,
            "device.decommission",
            "device",
            device_id,
            {"decommissioned_at": None},
            {
                "decommissioned_at": now.isoformat(),
                "left_rollouts": list(left.rollouts),
                "cancelled_deployments": list(left.cancelled_deployments),
            },
            reason,
        )
    return {
        "device_id": device_id,
        "decommissioned_at": now.isoformat(),
        "left_rollouts": list(left.rollouts),
        "cancelled_deployments": list(left.cancelled_deployments),
    }
