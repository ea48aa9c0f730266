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


LOOKUP_CHUNK = 5000
"""Ids per ``IN (...)`` list: far below PostgreSQL's and SQLite's limits on bound parameters."""


def _assign_lookups(
    session: Session, device_ids: tuple[str, ...], model: str
) -> tuple[dict[str, Device], dict[str, DeviceModel], dict[str, list[Deployment]]]:
    """For :func:`assign`: the devices, their running ``model`` rows, and their open deployments of ``model``."""
    devices: dict[str, Device] = {}
    running: dict[str, DeviceModel] = {}
    open_others: dict[str, list[Deployment]] = {}
    open_states = [s.value for s in DeploymentState if not s.terminal]
    session.flush()  # rows this unit of work added before (another stage, another arm) are found too
    for start in range(0, len(device_ids), LOOKUP_CHUNK):
        chunk = device_ids[start : start + LOOKUP_CHUNK]
        devices.update((d.id, d) for d in session.scalars(select(Device).where(Device.id.in_(chunk))))
        models = select(DeviceModel).where(DeviceModel.device_id.in_(chunk), DeviceModel.model_name == model)
        running.update((m.device_id, m) for m in session.scalars(models))
        others = select(Deployment).where(
            Deployment.device_id.in_(chunk), Deployment.model_name == model, Deployment.state.in_(open_states)
        )
        for dep in session.scalars(others):
            open_others.setdefault(dep.device_id, []).append(dep)
    return devices, running, open_others


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
    shadow = mode == "shadow"
    # Everything the loop reads, in a few queries for any number of devices (one query per device and table
    # before: 2,000 devices took seconds), and without autoflushing the rows added so far on every lookup.
    devices, running_models, open_others = _assign_lookups(session, device_ids, release.model_name)
    for device_id in device_ids:
        device = devices.get(device_id)
        if device is None or device.hardware_profile not in bundles:
            continue
        bundle = bundles[device.hardware_profile]
        running = None if shadow else running_models.get(device_id)
        # Supersede any other open deployment of this model on the device (shadows only other shadows).
        for other in open_others.get(device_id, []):
            if (other.mode == "shadow") == shadow:
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
    rollback deployment per (rollout, device): a device that already has one (its install was reverted
    when the rollout halted and then committed late) only gets ``reverted_by`` set. A device whose install
    has no previous bundle is skipped and named in the rollout's note (:func:`listed`: the first
    :data:`SKIPPED_NAMED`, then a count). A constant number of queries for any number of devices. For a shadow
    rollout nothing is installed: the shadows are ended (``rolled_back``) and a ``shadow_stop`` goes into
    ``outbox`` for each.
    """
    if Plan.from_json(rollout.plan).mode == "shadow":
        _stop_shadows(session, rollout, device_ids, actor, now, outbox)
        return []
    # Three queries whatever the number of devices (a halt reverts thousands at once): the installs, the
    # rollback deployments this rollout already made for them, and the bundles they ran before. Past
    # LOOKUP_CHUNK ids the device filter is left to Python: one query over the rollout instead of an id list
    # longer than the database takes.
    ids = set(device_ids)
    few = len(ids) <= LOOKUP_CHUNK
    installs = [
        dep
        for dep in session.scalars(
            select(Deployment)
            .where(
                Deployment.rollout_id == rollout.id,
                Deployment.mode == Plan.from_json(rollout.plan).mode,
                Deployment.retried.is_(False),
                *([Deployment.device_id.in_(sorted(ids))] if few else []),
            )
            .order_by(Deployment.device_id)
        )
        if dep.device_id in ids
    ]
    if not installs:
        return []
    rollbacks: dict[str, str] = {
        device_id: rollback_id
        for device_id, rollback_id in session.execute(
            select(Deployment.device_id, Deployment.id).where(
                Deployment.rollout_id == rollout.id,
                Deployment.mode == "rollback",
                *([Deployment.device_id.in_(sorted({d.device_id for d in installs}))] if few else []),
            )
        )
        if device_id in ids
    }
    previous_of = _previous_bundles(session, installs)
    shas = sorted(set(previous_of.values()))
    previous_bundles = (
        {b.sha256: b for b in session.scalars(select(Bundle).where(Bundle.sha256.in_(shas)))} if shas else {}
    )
    new_ids: list[str] = []
    skipped: list[str] = []
    for dep in installs:
        existing = rollbacks.get(dep.device_id)
        if existing is not None:
            if dep.reverted_by is None:
                dep.reverted_by = existing
            continue
        previous = previous_bundles.get(previous_of.get(dep.id, ""))
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
        rollbacks[dep.device_id] = back.id  # at most one per (rollout, device), even for two rows of one device
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
        note(rollout, f"no previous bundle to revert: {listed(skipped)}")
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


def _previous_bundles(session: Session, installs: list[Deployment]) -> dict[str, str]:
    """The bundle each install's device goes back to, by install id: the one it ran when the install was assigned,
    or, when the server did not know it then, the device's model record now.

    The server's view can lag its devices: an install assigned while the device's previous install was still in
    flight (superseded, then committed late) recorded no previous bundle. By the time of the revert the late commit
    or a check-in has usually recorded what the device runs: that bundle, or, if the record already shows this
    install's bundle, the one it replaced. One query per LOOKUP_CHUNK devices, for the installs that need it.
    """
    previous = {dep.id: dep.previous_bundle_sha256 for dep in installs if dep.previous_bundle_sha256}
    unknown = [dep for dep in installs if not dep.previous_bundle_sha256]
    if unknown:
        keys = {(dep.device_id, dep.model_name) for dep in unknown}
        devices = sorted({device_id for device_id, _ in keys})
        models: dict[tuple[str, str], DeviceModel] = {}
        for start in range(0, len(devices), LOOKUP_CHUNK):
            rows = session.scalars(
                select(DeviceModel).where(DeviceModel.device_id.in_(devices[start : start + LOOKUP_CHUNK]))
            )
            models.update(((m.device_id, m.model_name), m) for m in rows if (m.device_id, m.model_name) in keys)
        for dep in unknown:
            model = models.get((dep.device_id, dep.model_name))
            if model is None:
                continue
            sha = model.previous_bundle_sha256 if model.bundle_sha256 == dep.bundle_sha256 else model.bundle_sha256
            if sha:
                previous[dep.id] = sha
    return previous


SKIPPED_NAMED = 20
"""Device ids a note names before it only counts the rest (a rollout's detail stays short at any fleet size)."""


def listed(ids: list[str], limit: int = SKIPPED_NAMED) -> str:
    """``ids`` joined by commas, the first ``limit`` of them and then "and N more"."""
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


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
