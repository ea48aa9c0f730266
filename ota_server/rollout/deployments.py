"""Deployments of a rollout in the database: assigning, retrying, timing out, reverting, ending shadows.

Each function changes rows inside the caller's unit of work (:mod:`ota_server.rollout.unit_of_work`)
and returns the ids of new deployments to publish once committed; state changes go through
:mod:`ota_server.rollout.records` by the rules of :mod:`ota_server.rollout.deployment_rules`. Called by
:mod:`ota_server.rollout.apply` for the engine's, an operator's and a device report's effects.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.models import Bundle, Deployment, Device, DeviceModel, Release, Rollout
from ota_server.rollout.plan import Plan
from ota_server.rollout.records import note, server_move
from ota_server.rollout.unit_of_work import Outbox
from ota_server.services import audit


def retry(session: Session, rollout: Rollout, device_ids: tuple[str, ...], actor: str, now: datetime) -> list[str]:
    """Mark each device's failed latest attempt ``retried`` and assign the next attempt (same stage)."""
    mode = Plan.from_json(rollout.plan).mode
    new_ids: list[str] = []
    for dep in list(
        session.scalars(
            select(Deployment).where(
                Deployment.rollout_id == rollout.id,
                Deployment.mode == mode,
                Deployment.device_id.in_(device_ids),
                Deployment.retried.is_(False),
                Deployment.state == DeploymentState.FAILED.value,
            )
        )
    ):
        dep.retried = True
        audit.record(
            session,
            actor,
            "deployment.retry",
            "deployment",
            dep.id,
            {"attempt": dep.attempt, "state": dep.state, "reason": dep.reason},
            {"retried": True},
            f"attempt {dep.attempt} failed with {dep.reason}; assigning attempt {dep.attempt + 1}",
        )
        session.flush()  # the new attempt must not meet this one as "the latest"
        # The same release as the failed attempt (a bandit rollout's devices run different releases).
        bundle = session.get(Bundle, dep.bundle_sha256)
        release = bundle.release_id if bundle is not None else None
        next_attempt = dep.attempt + 1
        for new_id in assign(session, rollout, (dep.device_id,), dep.stage, actor, now, next_attempt, release):
            again = session.get(Deployment, new_id)
            if again is not None:
                again.allow_downgrade = dep.allow_downgrade  # a permitted downgrade stays permitted on its retry
            new_ids.append(new_id)
    return new_ids


def _lock_superseded_rollouts(session: Session, rollout_id: str, device_ids: tuple[str, ...], model: str) -> None:
    """Lock (``FOR UPDATE``, in id order) the other rollouts whose open deployments of ``model`` on these devices
    an assignment is about to supersede. Ingest share-locks a deployment's rollout before applying a report to it
    (:func:`ota_server.services.ingest.handle_status`), so both meet at the rollout row first and never deadlock
    on the deployment rows. SQLite (one writer at a time) needs none of this."""
    if session.get_bind().dialect.name == "sqlite" or not device_ids:
        return
    open_states = [s.value for s in DeploymentState if not s.terminal]
    others = session.scalars(
        select(Deployment.rollout_id)
        .where(
            Deployment.device_id.in_(device_ids),
            Deployment.model_name == model,
            Deployment.state.in_(open_states),
            Deployment.rollout_id.is_not(None),
            Deployment.rollout_id != rollout_id,
        )
        .distinct()
    )
    for other in sorted(r for r in others if r is not None):
        session.execute(select(Rollout.id).where(Rollout.id == other).with_for_update())


def assign(
    session: Session,
    rollout: Rollout,
    device_ids: tuple[str, ...],
    stage: int,
    actor: str,
    now: datetime,
    attempt: int = 1,
    release_id: str | None = None,
) -> list[str]:
    """Create a deployment of the release's bundle per device; returns the ids to send (not the devices that
    already run it, committed at once). ``release_id``: another release than the rollout's (a bandit arm)."""
    release = session.get(Release, release_id or rollout.release_id)
    assert release is not None
    bundles = {b.hardware_profile: b for b in session.scalars(select(Bundle).where(Bundle.release_id == release.id))}
    mode = Plan.from_json(rollout.plan).mode
    new_ids: list[str] = []
    _lock_superseded_rollouts(session, rollout.id, device_ids, release.model_name)
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
                server_move(other, "supersede", now, f"superseded by rollout {rollout.id}")
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
            attempt=attempt,
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
                "attempt": attempt,
            },
        )
        if not already:
            new_ids.append(dep.id)
    session.flush()
    return new_ids


def finish_install(
    session: Session,
    rollout: Rollout,
    device_ids: tuple[str, ...],
    rule: str,
    detail: str,
    now: datetime,
    actor: str,
    outbox: Outbox,
) -> None:
    """End the open deployments of ``device_ids`` by ``rule`` (``time_out`` or ``cancel``: failed)."""
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
        was_pending = dep.state == DeploymentState.PENDING.value
        if not server_move(dep, rule, now, detail):
            continue
        if dep.mode == "shadow" and not was_pending:
            outbox.shadow_stops.append((dep.device_id, dep.model_name))
        audit.record(
            session,
            actor,
            "deployment.failed",
            "deployment",
            dep.id,
            before,
            {"state": dep.state, "reason": dep.reason},
            detail,
        )


def revert_devices(
    session: Session,
    rollout: Rollout,
    device_ids: tuple[str, ...],
    actor: str,
    now: datetime,
    outbox: Outbox,
    note_skipped: bool = True,
) -> list[str]:
    """Create one rollback deployment per device (to the bundle it ran before); returns their ids.

    Each reverted install deployment keeps its state and gets ``reverted_by`` = the rollback
    deployment's id: the typed record that the server ordered it back (see
    :mod:`ota_server.rollout.deployment_rules` for how a committed install then ends). At most one
    rollback deployment per (rollout, device). For a shadow rollout nothing is installed: the
    shadows are ended (``rolled_back``) and a ``shadow_stop`` goes into ``outbox`` for each.
    """
    if Plan.from_json(rollout.plan).mode == "shadow":
        _stop_shadows(session, rollout, device_ids, actor, now, outbox)
        return []
    new_ids: list[str] = []
    skipped: list[str] = []
    for dep in list(
        session.scalars(
            select(Deployment).where(
                Deployment.rollout_id == rollout.id,
                Deployment.mode == Plan.from_json(rollout.plan).mode,
                Deployment.device_id.in_(device_ids),
                Deployment.retried.is_(False),
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
            if dep.reverted_by is None:
                dep.reverted_by = exists.id
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
        dep.reverted_by = back.id
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
    if skipped and note_skipped:
        note(rollout, f"no previous bundle to revert: {', '.join(skipped)}")
    elif skipped:
        # A late revert from ingest, which holds only a share lock on the rollout: its row is not written here
        # (two ingest writers upgrading their share locks would deadlock); the audit log says it instead.
        for device_id in skipped:
            audit.record(
                session,
                actor,
                "deployment.revert_skipped",
                "rollout",
                rollout.id,
                None,
                {"device_id": device_id},
                "no previous bundle to revert",
            )
    session.flush()
    return new_ids


def _stop_shadows(
    session: Session, rollout: Rollout, device_ids: tuple[str, ...], actor: str, now: datetime, outbox: Outbox
) -> None:
    for dep in session.scalars(
        select(Deployment).where(
            Deployment.rollout_id == rollout.id,
            Deployment.mode == "shadow",
            Deployment.device_id.in_(device_ids),
            Deployment.retried.is_(False),
        )
    ):
        before = {"state": dep.state}
        if not server_move(dep, "stop_shadow", now, "shadow stopped"):
            continue
        outbox.shadow_stops.append((dep.device_id, dep.model_name))
        audit.record(session, actor, "deployment.shadow_stop", "deployment", dep.id, before, {"state": dep.state})
