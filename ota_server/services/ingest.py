"""Applying device messages to the database: status, check-in, telemetry, presence.

Identity comes from the topic (``device_id`` argument), never from the payload. Every handler
returns the msg ids to acknowledge and the deployment ids to (re-)send; the caller acks and
publishes only after the commit. Status reports are deduplicated by msg id and by
``deployment_transition_allowed``; telemetry by (device, boot_id, seq).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeota_contract.errors import ContractError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import CheckIn, Presence, StatusReport, TelemetryWindow
from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.models import (
    Bundle,
    Deployment,
    Device,
    DeviceMessage,
    DeviceModel,
    Rollout,
    StatusEvent,
    TelemetryRecord,
    utcnow,
)
from ota_server.rollout.engine_logic import apply_report
from ota_server.services.deployments import revert_devices
from ota_server.services.dispatch import prepare_sends

log = logging.getLogger("edgeota.server.ingest")


class UnknownDevice(ContractError):
    """A message from a device id this server never provisioned."""


@dataclass
class IngestResult:
    ack: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    ignored: str | None = None


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise UnknownDevice(f"unknown device {device_id}", ReasonCode.MALFORMED_MESSAGE)
    device.last_seen = utcnow()
    return device


def _seen(session: Session, device_id: str, msg_id: str, kind: str) -> bool:
    """True when this msg id was already stored; otherwise remember it."""
    key = f"{device_id}/{msg_id}"
    if session.get(DeviceMessage, key) is not None:
        return True
    session.add(DeviceMessage(msg_id=key, device_id=device_id, kind=kind))
    return False


def handle_status(session: Session, device_id: str, report: StatusReport) -> IngestResult:
    _device(session, device_id)
    result = IngestResult(ack=[report.msg_id])
    if _seen(session, device_id, report.msg_id, "status"):
        result.ignored = "duplicate"
        return result
    dep = session.get(Deployment, report.deployment_id)
    if dep is None or dep.device_id != device_id:
        # Acked so the device stops re-sending, but nothing is applied.
        result.ignored = "unknown_deployment"
        return result
    new = apply_report(DeploymentState(dep.state), report.state)
    session.add(
        StatusEvent(
            device_id=device_id,
            deployment_id=dep.id,
            state=report.state.value,
            reason=report.reason.value,
            detail=report.detail,
        )
    )
    if new is None:
        result.ignored = "stale"
        if report.state == DeploymentState.COMMITTED and _late_commit(dep):
            # The device finished an install the server had already cancelled or timed out.
            _set_running(session, device_id, dep.bundle_sha256)
            result.send = _revert_late(session, dep)
        return result
    now = utcnow()
    dep.state = new.value
    dep.reason = report.reason.value
    dep.detail = report.detail
    dep.updated_at = now
    if new == DeploymentState.COMMITTED and dep.mode != "shadow":
        _set_running(session, device_id, dep.bundle_sha256)
    return result


def _set_running(session: Session, device_id: str, sha256: str) -> None:
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        return
    _record_model(session, device_id, bundle.model_name, bundle.version, bundle.sha256, bundle.release_counter)


def _record_model(session: Session, device_id: str, model: str, version: str, sha: str, counter: int) -> None:
    row = session.get(DeviceModel, (device_id, model))
    now = utcnow()
    if row is None:
        session.add(
            DeviceModel(
                device_id=device_id,
                model_name=model,
                version=version,
                bundle_sha256=sha,
                release_counter=counter,
                updated_at=now,
            )
        )
        return
    if row.bundle_sha256 != sha:
        row.previous_version, row.previous_bundle_sha256 = row.version, row.bundle_sha256
        row.version, row.bundle_sha256, row.release_counter = version, sha, counter
    row.updated_at = now


def handle_checkin(session: Session, device_id: str, checkin: CheckIn) -> IngestResult:
    """Reconcile what the device runs and re-send its open deployments (fresh assignment ids)."""
    device = _device(session, device_id)
    result = IngestResult(ack=[checkin.msg_id])
    device.presence_online = True
    device.boot_id = checkin.boot_id
    device.agent_version = checkin.agent_version
    if checkin.hardware_profile != device.hardware_profile:
        log_event(
            log,
            "checkin_profile_mismatch",
            logging.WARNING,
            device=device_id,
            reported=checkin.hardware_profile,
            registered=device.hardware_profile,
        )
    running = {m.model_name: m for m in checkin.models}
    for m in checkin.models:
        _record_model(session, device_id, m.model_name, m.version, m.bundle_sha256, m.release_counter)
    open_deps: list[Deployment] = []
    for dep in session.scalars(select(Deployment).where(Deployment.device_id == device_id)):
        state = DeploymentState(dep.state)
        model = running.get(dep.model_name)
        if dep.mode == "shadow":
            runs_it = model is not None and model.shadow_version == dep.version
        else:
            runs_it = model is not None and model.bundle_sha256 == dep.bundle_sha256 and model.state == "serving"
        is_active = checkin.active_deployment_id == dep.id
        if state.terminal and runs_it and _late_commit(dep):
            result.send.extend(_revert_late(session, dep))
            continue
        if state.terminal:
            # A committed install the device no longer runs (it rolled back by itself): record that.
            if (
                state == DeploymentState.COMMITTED
                and dep.mode == "install"
                and model is not None
                and not runs_it
                and not is_active
                and _newer_than(dep, model.release_counter)
            ):
                dep.state = DeploymentState.ROLLED_BACK.value
                dep.reason = ReasonCode.HEALTH_FAILED.value
                dep.detail = f"device check-in shows {model.version} running"
                dep.updated_at = utcnow()
            continue
        if is_active and checkin.active_state is not None:
            new = apply_report(state, checkin.active_state)
            if new is not None:
                dep.state, dep.updated_at = new.value, utcnow()
                state = new
        if runs_it and not is_active and state != DeploymentState.COMMITTED:
            dep.state, dep.reason, dep.updated_at = DeploymentState.COMMITTED.value, ReasonCode.OK.value, utcnow()
            dep.detail = "reconciled from check-in"
            continue
        if not DeploymentState(dep.state).terminal:
            open_deps.append(dep)
    result.send.extend(prepare_sends(session, open_deps))
    return result


def _late_commit(dep: Deployment) -> bool:
    return (
        dep.mode == "install"
        and dep.state == DeploymentState.FAILED.value
        and dep.reason in (ReasonCode.CANCELLED.value, ReasonCode.DEVICE_TIMEOUT.value, ReasonCode.SUPERSEDED.value)
    )


def _revert_late(session: Session, dep: Deployment) -> list[str]:
    """Revert a device that installed a bundle after its rollout was rolled back (or aborted with revert)."""
    if dep.rollout_id is None:
        return []
    rollout = session.get(Rollout, dep.rollout_id)
    if rollout is None or rollout.state not in (RolloutState.ROLLED_BACK.value, RolloutState.ABORTED.value):
        return []
    if rollout.state == RolloutState.ABORTED.value and "revert" not in rollout.detail:
        return []
    new_ids = revert_devices(session, rollout, (dep.device_id,), "ingest", utcnow())
    pending = [d for d in (session.get(Deployment, i) for i in new_ids) if d is not None]
    return prepare_sends(session, pending)


def _newer_than(dep: Deployment, running_counter: int) -> bool:
    return dep.release_counter > running_counter


def handle_telemetry(session: Session, device_id: str, window: TelemetryWindow) -> IngestResult:
    _device(session, device_id)
    result = IngestResult(ack=[window.msg_id])
    exists = session.scalar(
        select(TelemetryRecord.id).where(
            TelemetryRecord.device_id == device_id,
            TelemetryRecord.boot_id == window.boot_id,
            TelemetryRecord.seq == window.seq,
        )
    )
    if exists is not None:
        result.ignored = "duplicate"
        return result
    session.add(
        TelemetryRecord(
            device_id=device_id,
            boot_id=window.boot_id,
            seq=window.seq,
            model_name=window.model_name,
            version=window.version,
            bundle_sha256=window.bundle_sha256,
            window_start=window.window_start,
            window_end=window.window_end,
            request_count=window.request_count,
            error_count=window.error_count,
            payload=window.model_dump(mode="json"),
        )
    )
    return result


def handle_presence(session: Session, device_id: str, presence: Presence) -> IngestResult:
    device = _device(session, device_id)
    device.presence_online = presence.online
    device.boot_id = presence.boot_id
    return IngestResult()


def is_integrity_error(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError)
