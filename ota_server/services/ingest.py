"""Applying device messages to the database: status, check-in, telemetry, feedback, presence.

Deployment state is decided by the pure rules of :mod:`ota_server.rollout.deployment_rules`
(:func:`~ota_server.rollout.deployment_rules.on_status_report`, :func:`~ota_server.rollout.deployment_rules.on_checkin`)
and written by :mod:`ota_server.rollout.apply`; this module stores the messages (history, dedupe,
telemetry, what a device runs) and builds the rules' plain views. The caller's unit of work (the
batch writers, :mod:`ota_server.ingest_queue`) commits, then acks and publishes.

Identity comes from the topic (``device_id`` argument), never from the payload. Every handler
returns the msg ids to acknowledge and the deployment ids to (re-)send; the caller acks and
publishes only after the commit. Status reports are deduplicated by msg id and by
``deployment_transition_allowed``; telemetry by (device, boot_id, seq).

A batch applied in one transaction first loads what its handlers look up
(:func:`ota_server.services.ingest_prefetch.prefetch`, which returns the :class:`Known` passed to
every handler here); without ``known`` a handler queries for itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeota_contract.errors import ContractError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import CheckIn, FeedbackReport, Presence, StatusReport, TelemetryWindow
from edgeota_contract.states import DeploymentState, ReasonCode
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
from ota_server.rollout import deployment_rules as rules
from ota_server.rollout.apply import apply_deployment_effects
from ota_server.rollout.unit_of_work import Outbox
from ota_server.services import feedback
from ota_server.services.dispatch import prepare_sends
from ota_server.services.ingest_prefetch import DeviceMessageT, Known, msg_key
from ota_server.services.telemetry_aggregates import (
    AggregateBatch,
    AggregationConfig,
    flush,
    parsed_window_part,
    window_part,
)
from ota_server.services.telemetry_rows import window_columns, window_payload, window_row

log = logging.getLogger("edgeota.server.ingest")


class UnknownDevice(ContractError):
    """A message from a device id this server never provisioned."""


@dataclass
class IngestResult:
    ack: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    ignored: str | None = None


def apply_message(
    session: Session, device_id: str, message: DeviceMessageT, known: Known | None = None
) -> IngestResult:
    """Apply one parsed device message with its handler (the caller owns the transaction)."""
    if isinstance(message, StatusReport):
        return handle_status(session, device_id, message, known)
    if isinstance(message, CheckIn):
        return handle_checkin(session, device_id, message, known)
    if isinstance(message, TelemetryWindow):
        return handle_telemetry(session, device_id, message, known)
    if isinstance(message, FeedbackReport):
        return handle_feedback(session, device_id, message, known)
    return handle_presence(session, device_id, message, known)


def _device(session: Session, device_id: str, known: Known | None = None) -> Device:
    """The sending device (``last_seen`` updated, unless a batch's :func:`prefetch` did); UnknownDevice if none, or if
    it was decommissioned (its messages, while the broker still lets it in, change nothing)."""
    device = session.get(Device, device_id)
    if device is None:
        raise UnknownDevice(f"unknown device {device_id}", ReasonCode.MALFORMED_MESSAGE)
    if device.decommissioned_at is not None:
        raise UnknownDevice(f"device {device_id} is decommissioned", ReasonCode.MALFORMED_MESSAGE)
    if known is None:
        device.last_seen = utcnow()
    return device


def _seen(session: Session, device_id: str, msg_id: str, kind: str, known: Known | None) -> bool:
    """True when this msg id was already stored (``known``: as prefetched for a batch); otherwise remember it."""
    key = msg_key(device_id, msg_id)
    if key in known.messages if known is not None else session.get(DeviceMessage, key) is not None:
        return True
    session.add(DeviceMessage(msg_id=key, device_id=device_id, kind=kind))
    return False


def _is_older(device: Device, msg: CheckIn | StatusReport) -> bool:
    """True when ``msg`` was built before the newest report or check-in already applied for ``device``.

    Same boot: by the per-boot ``seq`` (one counter for all of a device's messages). Another boot: by the
    device's own clock (``sent_at``), the only order two boots share.
    """
    if device.report_seq is None:
        return False
    if device.report_boot_id == msg.boot_id:
        return msg.seq < device.report_seq
    return device.report_sent_at is not None and msg.sent_at < device.report_sent_at


def _advance(device: Device, msg: CheckIn | StatusReport) -> None:
    """Move ``device``'s watermark to ``msg`` unless it is older than what is there."""
    if not _is_older(device, msg):
        device.report_boot_id, device.report_seq, device.report_sent_at = msg.boot_id, msg.seq, msg.sent_at


def _facts(dep: Deployment, revert_ordered: bool = False) -> rules.DeploymentFacts:
    return rules.DeploymentFacts(
        id=dep.id,
        device_id=dep.device_id,
        mode=dep.mode,
        model_name=dep.model_name,
        version=dep.version,
        bundle_sha256=dep.bundle_sha256,
        release_counter=dep.release_counter,
        state=DeploymentState(dep.state),
        reason=dep.reason,
        reverted_by=dep.reverted_by,
        rollout_revert_ordered=revert_ordered,
    )


def _revert_ordered(session: Session, dep: Deployment) -> bool:
    """Whether ``dep``'s rollout ordered its devices reverted (read only for a possible late commit)."""
    if not rules.is_late_commit(_facts(dep)) or dep.rollout_id is None:
        return False
    rollout = session.get(Rollout, dep.rollout_id)
    return rollout is not None and rollout.reverted


def hold_rollout(session: Session, dep: Deployment, known: Known | None = None) -> None:
    """Share-lock ``dep``'s rollout row, then re-read ``dep`` locked, before a report is applied to it.

    A rollout's decisions (roll back, cancel, supersede) take that row ``FOR UPDATE`` in whichever process
    makes them, so a report applied in another process (``edgeota server ingest``, or an ingest writer beside
    an API worker) waits for such a decision to commit and then sees it: without this, a ``committed``
    applied over a cancellation that committed meanwhile was lost, and the device was never reverted. Share
    locks do not wait for each other, so ingest transactions do not serialise among themselves. On SQLite
    (one writer at a time) this is a plain read. A batch takes these locks for all its reports at once
    (:func:`ota_server.services.ingest_prefetch.lock_reported`): a deployment in ``known.locked`` is held already.
    """
    if (known is not None and dep.id in known.locked) or session.get_bind().dialect.name == "sqlite":
        return
    session.execute(select(Rollout.id).where(Rollout.id == dep.rollout_id).with_for_update(read=True))
    session.refresh(dep, with_for_update=True)


def _apply(session: Session, device_id: str, effects: list[rules.DeploymentEffect], known: Known | None) -> list[str]:
    """Persist ``effects`` (:func:`ota_server.rollout.apply.apply_deployment_effects`); the ids to send."""
    if not effects:
        return []
    outbox = Outbox()

    def record_running(dev: str, sha256: str) -> None:
        _set_running(session, dev, sha256, known)

    apply_deployment_effects(session, effects, utcnow(), outbox, record_running, lambda d: prepare_sends(session, d))
    if known is not None and any(isinstance(e, rules.RevertLate) for e in effects):
        known.deployments.pop(device_id, None)  # it has one more now: a later check-in queries them again
    return outbox.deployments


def handle_status(session: Session, device_id: str, report: StatusReport, known: Known | None = None) -> IngestResult:
    """Store a status report (history, dedupe by msg id) and apply it by :func:`rules.on_status_report`."""
    device = _device(session, device_id, known)
    result = IngestResult(ack=[report.msg_id])
    if _seen(session, device_id, report.msg_id, "status", known):
        result.ignored = "duplicate"
        return result
    _advance(device, report)
    dep = session.get(Deployment, report.deployment_id)
    if dep is None or dep.device_id != device_id:
        # Acked so the device stops re-sending, but nothing is applied.
        result.ignored = "unknown_deployment"
        return result
    if dep.rollout_id is not None:
        hold_rollout(session, dep, known)
    session.add(
        StatusEvent(
            device_id=device_id,
            deployment_id=dep.id,
            state=report.state.value,
            reason=report.reason.value,
            detail=report.detail,
        )
    )
    reverted: list[rules.DeploymentFacts] = []
    if dep.mode == "rollback" and report.state == DeploymentState.COMMITTED:
        reverted = [_facts(d) for d in session.scalars(select(Deployment).where(Deployment.reverted_by == dep.id))]
    outcome = rules.on_status_report(
        _facts(dep, report.state == DeploymentState.COMMITTED and _revert_ordered(session, dep)),
        report.state,
        report.reason,
        report.detail,
        reverted,
    )
    result.ignored = outcome.ignored
    result.send = _apply(session, device_id, outcome.effects, known)
    return result


def _set_running(session: Session, device_id: str, sha256: str, known: Known | None = None) -> None:
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        return
    _record_model(session, device_id, bundle.model_name, bundle.version, bundle.sha256, bundle.release_counter, known)


def _record_model(
    session: Session, device_id: str, model: str, version: str, sha: str, counter: int, known: Known | None = None
) -> None:
    # the batch's look-up holds every model row of this device (absent: it has none), else ask the session
    cached = known.models if known is not None and device_id in known.model_devices else None
    row = cached.get((device_id, model)) if cached is not None else session.get(DeviceModel, (device_id, model))
    now = utcnow()
    if row is None:
        row = DeviceModel(
            device_id=device_id,
            model_name=model,
            version=version,
            bundle_sha256=sha,
            release_counter=counter,
            updated_at=now,
        )
        session.add(row)
        if cached is not None:
            cached[(device_id, model)] = row  # a second message of this device in the batch finds it
        return
    if row.bundle_sha256 != sha:
        row.previous_version, row.previous_bundle_sha256 = row.version, row.bundle_sha256
        row.version, row.bundle_sha256, row.release_counter = version, sha, counter
    row.updated_at = now


def handle_checkin(session: Session, device_id: str, checkin: CheckIn, known: Known | None = None) -> IngestResult:
    """Record what the device runs, then reconcile its deployments by :func:`rules.on_checkin`.

    Reconciliation (late commits, committed installs the device no longer runs, "reconciled from
    check-in", re-sending open deployments with fresh assignment ids) is decided by the pure rule and
    applied by :mod:`ota_server.rollout.apply`; nothing here writes a deployment's state.

    A check-in older than a report already applied (re-sent under ingest lag, or delivered late from
    an earlier boot) is acked and marks the device online, but reconciles nothing: its picture of the
    device predates what the newer report said (outcome ``stale``).
    """
    device = _device(session, device_id, known)
    result = IngestResult(ack=[checkin.msg_id])
    device.presence_online = True
    if _is_older(device, checkin):
        result.ignored = "stale"
        return result
    _advance(device, checkin)
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
    running = {
        m.model_name: rules.RunningFacts(
            m.model_name, m.version, m.bundle_sha256, m.release_counter, m.state == "serving", m.shadow_version
        )
        for m in checkin.models
    }
    for m in checkin.models:
        _record_model(session, device_id, m.model_name, m.version, m.bundle_sha256, m.release_counter, known)
    deployments = known.deployments.get(device_id) if known is not None else None
    if deployments is None:
        deployments = list(session.scalars(select(Deployment).where(Deployment.device_id == device_id)))
    shown = {m.bundle_sha256 for m in checkin.models}
    # whether a revert was ordered matters only for a late commit the device shows running
    facts = [_facts(d, d.bundle_sha256 in shown and _revert_ordered(session, d)) for d in deployments]
    effects = rules.on_checkin(facts, running, checkin.active_deployment_id, checkin.active_state)
    if effects and session.get_bind().dialect.name != "sqlite":
        # About to change deployments: decide again on their state under the same locks a report takes.
        for rollout_id in sorted({d.rollout_id for d in deployments if d.rollout_id is not None}):
            session.execute(select(Rollout.id).where(Rollout.id == rollout_id).with_for_update(read=True))
        for dep in deployments:
            session.refresh(dep, with_for_update=True)
        facts = [_facts(d, d.bundle_sha256 in shown and _revert_ordered(session, d)) for d in deployments]
        effects = rules.on_checkin(facts, running, checkin.active_deployment_id, checkin.active_state)
    result.send.extend(_apply(session, device_id, effects, known))
    return result


def handle_telemetry(
    session: Session, device_id: str, window: TelemetryWindow, known: Known | None = None
) -> IngestResult:
    device = _device(session, device_id, known)
    result = IngestResult(ack=[window.msg_id])
    if known is not None:
        exists = (device_id, window.boot_id, window.seq) in known.windows
    else:
        exists = (
            session.scalar(
                select(TelemetryRecord.id).where(
                    TelemetryRecord.device_id == device_id,
                    TelemetryRecord.boot_id == window.boot_id,
                    TelemetryRecord.seq == window.seq,
                )
            )
            is not None
        )
    if exists:
        result.ignored = "duplicate"
        return result
    if known is not None and window.bundle_sha256 in known.bundle_profiles:
        bundle_profile = known.bundle_profiles[window.bundle_sha256]
    else:
        bundle = session.get(Bundle, window.bundle_sha256)
        bundle_profile = bundle.hardware_profile if bundle is not None else None
    config = known.aggregation if known is not None else AggregationConfig()
    key = (device_id, window.boot_id, window.seq)
    if known is not None and known.window_rows is not None:
        # The batch's fast pass: a plain row and the parsed window's counts (no ORM object, no JSON built here);
        # both wait for Known.remember (the message applied without error), then the batch's one insert and flush.
        known.staged_rows[key] = window_row(device_id, window)
        part = parsed_window_part(window, device_id, device.hardware_profile, device.labels, bundle_profile, config)
    else:
        payload = window_payload(window)  # the same document as the bulk path's row (NaN stored as null)
        session.add(TelemetryRecord(**window_columns(device_id, window), payload=payload))
        part = window_part(
            payload, window.window_end, device_id, device.hardware_profile, device.labels, bundle_profile, config
        )
    if known is not None:
        known.staged[key] = part
    else:
        single = AggregateBatch()
        single.add(part)
        flush(session, single)
    return result


def handle_feedback(
    session: Session, device_id: str, report: FeedbackReport, known: Known | None = None
) -> IngestResult:
    """Store a report's feedback items (:func:`ota_server.services.feedback.store_items`: an upsert, so a
    re-delivered report changes nothing) and ack it."""
    device = _device(session, device_id, known)
    config = known.aggregation if known is not None else AggregationConfig()
    feedback.store_items(session, device, report.items, source=feedback.SOURCE_DEVICE, cohort_label=config.cohort_label)
    return IngestResult(ack=[report.msg_id])


def handle_presence(session: Session, device_id: str, presence: Presence, known: Known | None = None) -> IngestResult:
    device = _device(session, device_id, known)
    device.presence_online = presence.online
    device.boot_id = presence.boot_id
    return IngestResult()


def is_integrity_error(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError)
