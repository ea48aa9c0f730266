"""Rollouts in the database: creation, views for the pure engine, and applying its effects."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.core.problems import ApiError
from ota_server.models import Bundle, Deployment, Device, DeviceModel, Release, Rollout, utcnow
from ota_server.rollout import engine_logic as el
from ota_server.rollout.plan import DeviceInfo, Plan, Selector, Targeting, dry_run, select_targets
from ota_server.services import audit
from ota_server.services.devices import deployment_json

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


def load_view(session: Session, rollout: Rollout, telemetry_failure: str | None = None) -> el.RolloutView:
    mode = Plan.from_json(rollout.plan).mode
    deps = session.scalars(select(Deployment).where(Deployment.rollout_id == rollout.id, Deployment.mode == mode))
    views = {d.device_id: el.DeploymentView(d.device_id, d.stage, DeploymentState(d.state), d.updated_at) for d in deps}
    return el.RolloutView(
        rollout_id=rollout.id,
        state=RolloutState(rollout.state),
        plan=Plan.from_json(rollout.plan),
        targets=tuple(rollout.targets),
        current_stage=rollout.current_stage,
        stage_started_at=rollout.stage_started_at,
        soak_started_at=rollout.soak_started_at,
        approved_stages=frozenset(int(s) for s in rollout.approved_stages),
        deployments=views,
        telemetry_failure=telemetry_failure,
    )


def lock_rollout(session: Session, rollout_id: str) -> Rollout | None:
    return session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())


def apply_effects(session: Session, rollout: Rollout, effects: list[el.Effect], actor: str, now: datetime) -> list[str]:
    """Persist the engine's effects (caller commits); returns the new deployment ids to publish."""
    to_send: list[str] = []
    for effect in effects:
        if isinstance(effect, el.Assign):
            to_send.extend(_assign(session, rollout, effect.device_ids, effect.stage, actor, now))
        elif isinstance(effect, el.TimeOut):
            _finish_install(
                session, rollout, effect.device_ids, ReasonCode.DEVICE_TIMEOUT, "no report before timeout", now, actor
            )
        elif isinstance(effect, el.CancelDeployments):
            _finish_install(
                session, rollout, effect.device_ids, ReasonCode.CANCELLED, "cancelled by rollout", now, actor
            )
        elif isinstance(effect, el.RevertDevices):
            to_send.extend(revert_devices(session, rollout, effect.device_ids, actor, now))
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


def _assign(
    session: Session, rollout: Rollout, device_ids: tuple[str, ...], stage: int, actor: str, now: datetime
) -> list[str]:
    release = session.get(Release, rollout.release_id)
    assert release is not None
    bundles = {b.hardware_profile: b for b in session.scalars(select(Bundle).where(Bundle.release_id == release.id))}
    mode = Plan.from_json(rollout.plan).mode
    new_ids: list[str] = []
    for device_id in device_ids:
        device = session.get(Device, device_id)
        if device is None or device.hardware_profile not in bundles:
            continue
        bundle = bundles[device.hardware_profile]
        shadow = mode == "shadow"
        running = None if shadow else session.get(DeviceModel, (device_id, bundle.model_name))
        # Supersede any other open deployment of this model on the device (shadows only other shadows).
        for other in session.scalars(
            select(Deployment).where(Deployment.device_id == device_id, Deployment.model_name == bundle.model_name)
        ):
            if not DeploymentState(other.state).terminal and (other.mode == "shadow") == shadow:
                other.state = DeploymentState.FAILED.value
                other.reason = ReasonCode.SUPERSEDED.value
                other.detail = f"superseded by rollout {rollout.id}"
                other.updated_at = now
        already = running is not None and running.bundle_sha256 == bundle.sha256
        dep = Deployment(
            id=uuid.uuid4().hex,
            rollout_id=rollout.id,
            device_id=device_id,
            mode=mode,
            stage=stage,
            model_name=bundle.model_name,
            version=bundle.version,
            bundle_sha256=bundle.sha256,
            release_counter=bundle.release_counter,
            previous_bundle_sha256=running.bundle_sha256 if running is not None and not already else None,
            state=DeploymentState.COMMITTED.value if already else DeploymentState.PENDING.value,
            detail="device already runs this bundle" if already else "",
            created_at=now,
            updated_at=now,
        )
        session.add(dep)
        audit.record(
            session,
            actor,
            "deployment.create",
            "deployment",
            dep.id,
            None,
            {
                "device_id": device_id,
                "rollout_id": rollout.id,
                "stage": stage,
                "version": bundle.version,
                "state": dep.state,
            },
        )
        if not already:
            new_ids.append(dep.id)
    session.flush()
    return new_ids


def _finish_install(
    session: Session,
    rollout: Rollout,
    device_ids: tuple[str, ...],
    reason: ReasonCode,
    detail: str,
    now: datetime,
    actor: str,
) -> None:
    for dep in session.scalars(
        select(Deployment).where(
            Deployment.rollout_id == rollout.id,
            Deployment.mode == Plan.from_json(rollout.plan).mode,
            Deployment.device_id.in_(device_ids),
        )
    ):
        if DeploymentState(dep.state).terminal:
            continue
        before = {"state": dep.state}
        if dep.mode == "shadow" and dep.state != DeploymentState.PENDING.value:
            _queue_shadow_stop(session, dep)
        dep.state = DeploymentState.FAILED.value
        dep.reason = reason.value
        dep.detail = detail
        dep.updated_at = now
        audit.record(
            session,
            actor,
            "deployment.failed",
            "deployment",
            dep.id,
            before,
            {"state": dep.state, "reason": reason.value},
            detail,
        )


def revert_devices(
    session: Session, rollout: Rollout, device_ids: tuple[str, ...], actor: str, now: datetime
) -> list[str]:
    """Create one rollback deployment per device (to the bundle it ran before); returns their ids.

    For a shadow rollout nothing is installed: the shadows are ended (``rolled_back``) and a
    ``shadow_stop`` is queued for each (see :func:`take_shadow_stops`).
    """
    if Plan.from_json(rollout.plan).mode == "shadow":
        _stop_shadows(session, rollout, device_ids, actor, now)
        return []
    new_ids: list[str] = []
    skipped: list[str] = []
    for dep in list(
        session.scalars(
            select(Deployment).where(
                Deployment.rollout_id == rollout.id,
                Deployment.mode == Plan.from_json(rollout.plan).mode,
                Deployment.device_id.in_(device_ids),
            )
        )
    ):
        exists = session.scalar(
            select(Deployment).where(
                Deployment.rollout_id == rollout.id,
                Deployment.device_id == dep.device_id,
                Deployment.mode == "rollback",
            )
        )
        if exists is not None:
            continue
        previous = session.get(Bundle, dep.previous_bundle_sha256) if dep.previous_bundle_sha256 else None
        if previous is None:
            skipped.append(dep.device_id)
            continue
        back = Deployment(
            id=uuid.uuid4().hex,
            rollout_id=rollout.id,
            device_id=dep.device_id,
            mode="rollback",
            stage=dep.stage,
            model_name=previous.model_name,
            version=previous.version,
            bundle_sha256=previous.sha256,
            release_counter=previous.release_counter,
            previous_bundle_sha256=dep.bundle_sha256,
            state=DeploymentState.PENDING.value,
            reason=ReasonCode.SERVER_ROLLBACK.value,
            created_at=now,
            updated_at=now,
        )
        session.add(back)
        audit.record(
            session,
            actor,
            "deployment.rollback",
            "deployment",
            back.id,
            None,
            {"device_id": dep.device_id, "to_version": previous.version, "from_version": dep.version},
        )
        new_ids.append(back.id)
    if skipped:
        rollout.detail = (rollout.detail + f"; no previous bundle to revert: {', '.join(skipped)}").lstrip("; ")
    session.flush()
    return new_ids


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


def _queue_shadow_stop(session: Session, dep: Deployment) -> None:
    session.info.setdefault("shadow_stops", []).append((dep.device_id, dep.model_name))


def take_shadow_stops(session: Session) -> list[tuple[str, str]]:
    """The (device, model) pairs to send ``shadow_stop`` to once the session's transaction commits."""
    stops: list[tuple[str, str]] = session.info.pop("shadow_stops", [])
    return stops


def _stop_shadows(session: Session, rollout: Rollout, device_ids: tuple[str, ...], actor: str, now: datetime) -> None:
    for dep in session.scalars(
        select(Deployment).where(
            Deployment.rollout_id == rollout.id, Deployment.mode == "shadow", Deployment.device_id.in_(device_ids)
        )
    ):
        if dep.state == DeploymentState.ROLLED_BACK.value:
            continue
        before = {"state": dep.state}
        dep.state = DeploymentState.ROLLED_BACK.value
        dep.reason = ReasonCode.SERVER_ROLLBACK.value
        dep.detail = "shadow stopped"
        dep.updated_at = now
        _queue_shadow_stop(session, dep)
        audit.record(session, actor, "deployment.shadow_stop", "deployment", dep.id, before, {"state": dep.state})


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


def rollout_json(session: Session, rollout: Rollout, with_devices: bool = True) -> dict[str, Any]:
    """The rollout's status; per-device deployments only when ``with_devices`` (counts come from SQL)."""
    plan = Plan.from_json(rollout.plan)
    grouped = session.execute(
        select(Deployment.mode, Deployment.state, func.count())
        .where(Deployment.rollout_id == rollout.id)
        .group_by(Deployment.mode, Deployment.state)
    ).all()
    counts = {state: n for mode, state, n in grouped if mode == plan.mode}
    rollback_counts = {state: n for mode, state, n in grouped if mode == "rollback"}
    out: dict[str, Any] = {
        "rollout_id": rollout.id,
        "release_id": rollout.release_id,
        "state": rollout.state,
        "reason": rollout.reason,
        "detail": rollout.detail,
        "current_stage": rollout.current_stage,
        "stage_count": len(plan.stages),
        "stage_sizes": plan.stage_sizes(len(rollout.targets)),
        "plan": rollout.plan,
        "selector": rollout.selector,
        "targets": len(rollout.targets),
        "no_bundle_for_profile": rollout.no_bundle,
        "skipped_rolled_back_before": rollout.skipped,
        "counts": {s.value: counts.get(s.value, 0) for s in DeploymentState},
        "rollback_counts": rollback_counts,
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
