"""A decommissioned device leaves every rollout: out of the open rollouts' targets, its open deployments cancelled.

Runs inside the caller's unit of work (:mod:`ota_server.rollout.unit_of_work`); nothing is sent to the
device (its credentials are being revoked in the same transaction). Deployment states change only through
:func:`ota_server.rollout.records.server_move` by the ``cancel`` rule, so the device's history (every
deployment, now ``failed`` with reason ``cancelled``) stays readable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, RolloutState
from ota_server.models import Deployment, Rollout
from ota_server.rollout.records import server_move
from ota_server.rollout.unit_of_work import lock_rollout
from ota_server.services import audit

_OPEN_DEPLOYMENTS = [s.value for s in DeploymentState if not s.terminal]
_OPEN_ROLLOUTS = [s.value for s in RolloutState if not s.terminal]


@dataclass(frozen=True)
class LeftRollouts:
    """What leaving the rollouts changed."""

    rollouts: tuple[str, ...]
    """Open rollouts whose targets no longer hold the device."""
    cancelled_deployments: tuple[str, ...]
    """Deployments of the device that were open and are now ``failed`` (reason ``cancelled``)."""


def leave_rollouts(session: Session, device_id: str, actor: str, now: datetime) -> LeftRollouts:
    """Take ``device_id`` out of every open rollout's targets and cancel each of its open deployments.

    The engine reads only the deployments of a rollout's targets (:func:`ota_server.services.rollouts.load_view`),
    so a cancelled deployment of a device that left never counts against a stage's failure rate. Each
    rollout is locked (:func:`lock_rollout`) before its targets change. Audited per rollout and deployment.
    """
    left: list[str] = []
    candidates = session.scalars(select(Rollout.id).where(Rollout.state.in_(_OPEN_ROLLOUTS)).order_by(Rollout.id))
    for rollout_id in list(candidates):
        rollout = lock_rollout(session, rollout_id)
        if rollout is None or device_id not in rollout.targets:
            continue
        before = len(rollout.targets)
        rollout.targets = [d for d in rollout.targets if d != device_id]
        rollout.updated_at = now
        audit.record(
            session,
            actor,
            "rollout.target_removed",
            "rollout",
            rollout.id,
            {"targets": before},
            {"targets": len(rollout.targets), "device_id": device_id},
            f"device {device_id} decommissioned",
        )
        left.append(rollout.id)
    cancelled: list[str] = []
    open_deployments = session.scalars(
        select(Deployment)
        .where(Deployment.device_id == device_id, Deployment.state.in_(_OPEN_DEPLOYMENTS))
        .order_by(Deployment.created_at)
    )
    for dep in list(open_deployments):
        before_state = dep.state
        if not server_move(dep, "cancel", now, "device decommissioned"):
            continue
        audit.record(
            session,
            actor,
            "deployment.failed",
            "deployment",
            dep.id,
            {"state": before_state},
            {"state": dep.state, "reason": dep.reason},
            "device decommissioned",
        )
        cancelled.append(dep.id)
    return LeftRollouts(tuple(left), tuple(cancelled))
