"""Rollouts in the database: creation, views for the pure engine, and applying its effects."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.core.problems import ApiError
from ota_server.models import Bundle, Deployment, Device, Release, Rollout, utcnow
from ota_server.rollout import engine_logic as el
from ota_server.rollout.plan import DeviceInfo, Plan, Selector, Targeting, dry_run, select_targets
from ota_server.services import audit
from ota_server.services import deployments as deps

# Serialises rollout mutations inside one process (SQLite has no row locks; PostgreSQL also
# takes FOR UPDATE row locks, which covers several processes).
ROLLOUT_LOCK = threading.RLock()


def compute_targeting(session: Session, rollout_id: str, release: Release, selector: Selector) -> Targeting:
    bundles = list(session.scalars(select(Bundle).where(Bundle.release_id == release.id)))
    profiles = {b.hardware_profile for b in bundles}
    shas = [b.sha256 for b in bundles]
    rolled_back = (
        set(
            session.scalars(
                select(Deployment.device_id).where(
                    Deployment.bundle_sha256.in_(shas),
                    Deployment.mode == "install",
                    Deployment.state == DeploymentState.ROLLED_BACK.value,
                )
            )
        )
        if shas
        else set()
    )
    devices = [DeviceInfo(d.id, d.hardware_profile, d.labels) for d in session.scalars(select(Device))]
    return select_targets(rollout_id, selector, devices, profiles, rolled_back)


def _snapshot(r: Rollout) -> dict[str, Any]:
    return {"state": r.state, "current_stage": r.current_stage, "reason": r.reason, "detail": r.detail}


def create_rollout(
    session: Session, release_id: str, selector: Selector, plan: Plan, actor: str, dry: bool
) -> tuple[Rollout | None, dict[str, Any]]:
    """Create a draft rollout (or only compute the dry run). Raises ApiError(404) for an unknown release."""
    release = session.get(Release, release_id)
    if release is None:
        raise ApiError(404, "Not Found", f"release {release_id} not found")
    rollout_id = uuid.uuid4().hex
    targeting = compute_targeting(session, rollout_id, release, selector)
    preview = {
        "stages": dry_run(plan, targeting),
        "no_bundle_for_profile": list(targeting.no_bundle),
        "skipped_rolled_back_before": list(targeting.skipped),
        "eligible": len(targeting.targets),
    }
    if dry:
        return None, preview
    rollout = Rollout(
        id=rollout_id,
        release_id=release.id,
        state=RolloutState.DRAFT.value,
        plan=plan.to_json(),
        selector={
            "hardware_profiles": list(selector.hardware_profiles),
            "labels": dict(selector.labels),
            "device_ids": list(selector.device_ids),
        },
        targets=list(targeting.targets),
        no_bundle=list(targeting.no_bundle),
        skipped=list(targeting.skipped),
        current_stage=0,
        approved_stages=[],
        created_by=actor,
    )
    session.add(rollout)
    audit.record(
        session,
        actor,
        "rollout.create",
        "rollout",
        rollout.id,
        None,
        {**_snapshot(rollout), "release_id": release.id, "targets": len(targeting.targets)},
    )
    return rollout, preview


def _reason(value: str) -> ReasonCode:
    try:
        return ReasonCode(value)
    except ValueError:  # a device may report a code this server does not know: never retried
        return ReasonCode.INTERNAL_ERROR


def load_view(session: Session, rollout: Rollout, telemetry_failure: str | None = None) -> el.RolloutView:
    """The pure engine's view of ``rollout``: the latest attempt per device, read as plain rows."""
    plan = Plan.from_json(rollout.plan)
    rows = session.execute(
        select(Deployment.device_id, Deployment.stage, Deployment.state, Deployment.updated_at)
        .add_columns(Deployment.attempt, Deployment.reason)
        .where(Deployment.rollout_id == rollout.id, Deployment.mode == plan.mode, Deployment.retried.is_(False))
    )
    views = {
        r.device_id: el.DeploymentView(
            r.device_id, r.stage, DeploymentState(r.state), r.updated_at, r.attempt, _reason(r.reason)
        )
        for r in rows
    }
    return el.RolloutView(
        rollout_id=rollout.id,
        state=RolloutState(rollout.state),
        plan=plan,
        targets=tuple(rollout.targets),
        current_stage=rollout.current_stage,
        stage_started_at=rollout.stage_started_at,
        soak_started_at=rollout.soak_started_at,
        approved_stages=frozenset(int(s) for s in rollout.approved_stages),
        deployments=views,
        telemetry_failure=telemetry_failure,
    )


def lock_rollout(session: Session, rollout_id: str) -> Rollout | None:
    """Load ``rollout_id`` for a change, serialised against other processes changing it.

    PostgreSQL takes a ``FOR UPDATE`` row lock. SQLite has none, so a no-op write first takes the
    database's write lock: with several server processes (``--workers``), the engine and a manual
    command then never decide on the same stale state. Call it first in its transaction.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Rollout).where(Rollout.id == rollout_id).values(current_stage=Rollout.current_stage))
    return session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())


def apply_effects(session: Session, rollout: Rollout, effects: list[el.Effect], actor: str, now: datetime) -> list[str]:
    """Persist the engine's effects (caller commits); returns the new deployment ids to publish."""
    to_send: list[str] = []
    for effect in effects:
        if isinstance(effect, el.Assign):
            to_send.extend(deps.assign(session, rollout, effect.device_ids, effect.stage, actor, now))
        elif isinstance(effect, el.Retry):
            to_send.extend(deps.retry(session, rollout, effect.device_ids, actor, now))
        elif isinstance(effect, el.TimeOut):
            deps.finish_install(
                session, rollout, effect.device_ids, ReasonCode.DEVICE_TIMEOUT, "no report before timeout", now, actor
            )
        elif isinstance(effect, el.CancelDeployments):
            deps.finish_install(
                session, rollout, effect.device_ids, ReasonCode.CANCELLED, "cancelled by rollout", now, actor
            )
        elif isinstance(effect, el.RevertDevices):
            to_send.extend(deps.revert_devices(session, rollout, effect.device_ids, actor, now))
        elif isinstance(effect, el.EnterStage):
            before = _snapshot(rollout)
            rollout.current_stage = effect.stage
            rollout.stage_started_at = now
            rollout.soak_started_at = None
            audit.record(
                session,
                actor,
                "rollout.stage",
                "rollout",
                rollout.id,
                before,
                _snapshot(rollout),
                f"entered stage {effect.stage}",
            )
        elif isinstance(effect, el.StartSoak):
            rollout.soak_started_at = effect.at
        elif isinstance(effect, el.ApproveStage):
            rollout.approved_stages = sorted({*rollout.approved_stages, effect.stage})
            audit.record(
                session, actor, "rollout.approve", "rollout", rollout.id, None, {"approved_stage": effect.stage}
            )
        elif isinstance(effect, el.SetState):
            before = _snapshot(rollout)
            rollout.state = effect.state.value
            rollout.reason = effect.reason.value
            rollout.detail = effect.detail
            audit.record(
                session,
                actor,
                f"rollout.{effect.state.value}",
                "rollout",
                rollout.id,
                before,
                _snapshot(rollout),
                effect.detail,
            )
    rollout.updated_at = now
    return to_send


def schedule(session: Session, rollout: Rollout, start_at: datetime, actor: str) -> None:
    """Move a draft rollout to ``scheduled``; the engine starts it at ``start_at`` (caller commits)."""
    before = _snapshot(rollout)
    rollout.start_at = start_at
    rollout.state = RolloutState.SCHEDULED.value
    audit.record(
        session,
        actor,
        "rollout.scheduled",
        "rollout",
        rollout.id,
        before,
        {**_snapshot(rollout), "start_at": start_at.isoformat()},
    )


def start_due(session: Session, now: datetime, actor: str) -> list[str]:
    """Start every scheduled rollout whose time has come (caller commits); returns their ids."""
    due = list(session.scalars(select(Rollout).where(Rollout.state == RolloutState.SCHEDULED.value)))
    started = []
    for rollout in due:
        if rollout.start_at is not None and rollout.start_at <= now:
            run_command(session, rollout, "start", actor, "scheduled start")
            started.append(rollout.id)
    return started


def run_command(session: Session, rollout: Rollout, command: el.Command, actor: str, reason: str) -> list[str]:
    """Apply a manual command (caller commits). Raises TransitionError when not allowed."""
    view = load_view(session, rollout)
    effects = el.apply_command(view, command)
    now = utcnow()
    ids = apply_effects(session, rollout, effects, actor, now)
    if reason:
        audit.record(
            session, actor, f"rollout.command.{command}", "rollout", rollout.id, None, _snapshot(rollout), reason
        )
    return ids
