"""A rollout's status as the API shows it: state, stage sizes, counts per deployment state.

The status endpoint is on the hot path (``rollout status --watch``, dashboards), so it reads plain
columns and lets the database count: no ORM objects, and the target list (thousands of device ids)
is measured by ``json_array_length`` in SQL instead of being shipped and parsed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState
from ota_server.models import Deployment, Rollout
from ota_server.rollout.engine_logic import RETRYABLE_REASONS
from ota_server.rollout.plan import Plan
from ota_server.services.devices import deployment_json


class RolloutLike(Protocol):
    """A :class:`Rollout` or a row of :data:`STATUS_COLUMNS`."""

    id: str
    release_id: str
    state: str
    reason: str
    detail: str
    current_stage: int
    plan: dict[str, Any]
    selector: dict[str, Any]
    no_bundle: list[Any]
    skipped: list[Any]
    created_at: datetime
    updated_at: datetime
    created_by: str
    start_at: datetime | None


STATUS_COLUMNS = (
    Rollout.id,
    Rollout.release_id,
    Rollout.state,
    Rollout.reason,
    Rollout.detail,
    Rollout.current_stage,
    Rollout.plan,
    Rollout.selector,
    Rollout.no_bundle,
    Rollout.skipped,
    Rollout.created_at,
    Rollout.updated_at,
    Rollout.created_by,
    Rollout.start_at,
)


def rollout_json(session: Session, rollout: Rollout, with_devices: bool = True) -> dict[str, Any]:
    """The status of a loaded rollout; per-device deployments (every attempt) only when ``with_devices``."""
    return _status(session, rollout, len(rollout.targets), with_devices)


def rollout_status(session: Session, rollout_id: str, with_devices: bool = False) -> dict[str, Any] | None:
    """The status of ``rollout_id`` read as plain columns, or None when there is no such rollout."""
    row = session.execute(
        select(*STATUS_COLUMNS, func.json_array_length(Rollout.targets).label("target_count")).where(
            Rollout.id == rollout_id
        )
    ).first()
    if row is None:
        return None
    return _status(session, row, int(row.target_count or 0), with_devices)


def _status(session: Session, rollout: RolloutLike, target_count: int, with_devices: bool) -> dict[str, Any]:
    plan = Plan.from_json(rollout.plan)
    grouped = session.execute(
        select(Deployment.mode, Deployment.state, Deployment.retried, func.count())
        .where(Deployment.rollout_id == rollout.id)
        .group_by(Deployment.mode, Deployment.state, Deployment.retried)
    ).all()
    # Counts are per device (its latest attempt); retried attempts are counted apart.
    counts: dict[str, int] = {}
    rollback_counts: dict[str, int] = {}
    retried_attempts = 0
    for mode, state, retried, n in grouped:
        if retried:
            retried_attempts += n
        elif mode == plan.mode:
            counts[state] = counts.get(state, 0) + n
        elif mode == "rollback":
            rollback_counts[state] = rollback_counts.get(state, 0) + n
    waiting = 0
    if plan.max_retries and counts.get(DeploymentState.FAILED.value):
        waiting = (
            session.scalar(
                select(func.count()).where(
                    Deployment.rollout_id == rollout.id,
                    Deployment.mode == plan.mode,
                    Deployment.retried.is_(False),
                    Deployment.state == DeploymentState.FAILED.value,
                    Deployment.reason.in_([r.value for r in RETRYABLE_REASONS]),
                    Deployment.attempt <= plan.max_retries,
                )
            )
            or 0
        )
    out: dict[str, Any] = {
        "rollout_id": rollout.id,
        "release_id": rollout.release_id,
        "state": rollout.state,
        "reason": rollout.reason,
        "detail": rollout.detail,
        "current_stage": rollout.current_stage,
        "stage_count": len(plan.stages),
        "stage_sizes": plan.stage_sizes(target_count),
        "plan": rollout.plan,
        "selector": rollout.selector,
        "targets": target_count,
        "no_bundle_for_profile": rollout.no_bundle,
        "skipped_rolled_back_before": rollout.skipped,
        "counts": {s.value: counts.get(s.value, 0) for s in DeploymentState},
        "rollback_counts": rollback_counts,
        "retries": {"retried_attempts": retried_attempts, "waiting": waiting},
        "created_at": rollout.created_at.isoformat(),
        "updated_at": rollout.updated_at.isoformat(),
        "created_by": rollout.created_by,
        "start_at": rollout.start_at.isoformat() if rollout.start_at else None,
    }
    if with_devices:
        deps = session.scalars(
            select(Deployment).where(Deployment.rollout_id == rollout.id).order_by(Deployment.created_at, Deployment.id)
        )
        out["deployments"] = [deployment_json(d) for d in deps]
    return out
