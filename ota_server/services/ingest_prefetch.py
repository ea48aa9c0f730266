"""What a batch of device messages needs looked up, loaded in a few queries before its handlers run.

A batch of messages applied in one transaction (``ota_server.ingest_queue``) first calls
:func:`prefetch`: one query loads (on PostgreSQL: locks) the batch's devices and one each finds the status msg ids and
telemetry keys already stored, so the handlers (:mod:`ota_server.services.ingest`) need no lookup per
message for them (and sets ``last_seen`` once per device). With ``lookups`` (the batch's fast pass) it
also loads the devices' model rows and the check-in devices' deployments, so a heartbeat check-in costs
no query of its own (two each before: 2.2 ms of a 2.9 ms idle message pair, measured). The caller adds
each message it applied without error to the returned :class:`Known` (:meth:`Known.remember`), so a
second copy later in the same batch is a duplicate too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text, tuple_
from sqlalchemy.orm import Session

from edgeota_contract.messages import CheckIn, FeedbackReport, Presence, StatusReport, TelemetryWindow
from ota_server.models import (
    Bundle,
    Deployment,
    Device,
    DeviceMessage,
    DeviceModel,
    Rollout,
    TelemetryRecord,
    utcnow,
)
from ota_server.services.telemetry_aggregates import AggregateBatch, AggregationConfig, WindowPart, flush
from ota_server.services.telemetry_rows import insert_window_rows

DeviceMessageT = StatusReport | CheckIn | TelemetryWindow | FeedbackReport | Presence


@dataclass
class Known:
    """What is stored already (before the batch, or earlier in it): status msg keys and telemetry keys."""

    messages: set[str] = field(default_factory=set)
    windows: set[tuple[str, str, int]] = field(default_factory=set)
    rows: list[object] = field(default_factory=list)
    """Rows loaded for the batch: held here because the session's identity map keeps only weak references."""
    model_devices: set[str] = field(default_factory=set)
    """Devices whose every ``DeviceModel`` row is in :attr:`models` (absent there: the device has no such row)."""
    models: dict[tuple[str, str], DeviceModel] = field(default_factory=dict)
    deployments: dict[str, list[Deployment]] = field(default_factory=dict)
    """Per check-in device of the batch, every deployment of that device (dropped when the batch adds one)."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    bundle_profiles: dict[str, str | None] = field(default_factory=dict)
    """Hardware profile of each telemetry bundle sha of the batch (None: no such bundle stored)."""
    locked: set[str] = field(default_factory=set)
    """Deployments the batch's status reports name, re-read under ``FOR UPDATE`` after a share lock on their
    rollouts (PostgreSQL): a report applied to one of these needs no lock of its own (:func:`lock_reported`)."""
    staged: dict[tuple[str, str, int], WindowPart] = field(default_factory=dict)
    """A window's aggregate part, from its handler until :meth:`remember` adds it to :attr:`aggregates`."""
    aggregates: AggregateBatch = field(default_factory=AggregateBatch)
    """Windows stored by this batch, merged per aggregate group: :func:`flush_aggregates` writes them."""
    window_rows: list[dict[str, Any]] | None = None
    """The batch's new window rows for :func:`flush_windows` (one statement); None: the handlers add ORM rows."""
    staged_rows: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    """A window's row, from its handler until :meth:`remember` moves it to :attr:`window_rows`."""

    def remember(self, device_id: str, message: DeviceMessageT) -> None:
        """Record ``message`` as stored in this transaction (call once it applied without error)."""
        if isinstance(message, StatusReport):
            self.messages.add(msg_key(device_id, message.msg_id))
        elif isinstance(message, TelemetryWindow):
            key = (device_id, message.boot_id, message.seq)
            self.windows.add(key)
            part = self.staged.pop(key, None)
            if part is not None:
                self.aggregates.add(part)
            row = self.staged_rows.pop(key, None)
            if row is not None and self.window_rows is not None:
                self.window_rows.append(row)


def msg_key(device_id: str, msg_id: str) -> str:
    """The stored key of a status report: msg ids are unique per device only."""
    return f"{device_id}/{msg_id}"


def prefetch(
    session: Session,
    batch: list[tuple[str, DeviceMessageT]],
    lookups: bool = True,
    aggregation: AggregationConfig | None = None,
    bulk_windows: bool = False,
) -> Known:
    """Load the batch's devices into the session and find which of its reports are stored already.

    At most nine queries whatever the batch size (devices, the reported and the telemetry bundles, the reported
    deployments with their rollouts' locks (three on PostgreSQL, see :func:`lock_reported`), status msg ids,
    telemetry keys and, with ``lookups``, the devices' model rows and the check-in devices' deployments); the
    rows stay in the session for the handlers' lookups. Without ``lookups`` the
    handlers query model rows and deployments themselves (the careful pass: a savepoint rolled back
    must not leave a row in :class:`Known` that the session no longer holds). ``aggregation``: how
    telemetry windows are grouped into aggregates (default :class:`AggregationConfig`). ``bulk_windows``: the telemetry handler
    stages plain window rows for :func:`flush_windows` instead of adding ORM objects (the fast pass: nothing
    is written before the batch's one insert, so no savepoint can roll back a row it holds).
    """
    known = Known(aggregation=aggregation or AggregationConfig(), window_rows=[] if bulk_windows else None)
    # The batch's devices are locked first (PostgreSQL), in id order: a device's row holds its report watermark,
    # which a check-in reads and a report moves, and a shared subscription hands one device's messages to both
    # ingest processes; reading it unlocked let a check-in judged against an old watermark overwrite a newer one
    # (and land an install it did not know was committed as "device went back"). No autoflush while loading.
    with session.no_autoflush:
        device_ids = {device_id for device_id, _ in batch}
        if device_ids:
            now = utcnow()
            active = select(Device).where(Device.id.in_(device_ids), Device.decommissioned_at.is_(None))
            if session.get_bind().dialect.name != "sqlite":
                # NO KEY UPDATE: what an UPDATE of these columns takes anyway; it leaves the key-share locks of
                # foreign keys alone (a rollout inserting 10,000 deployments deadlocked against FOR UPDATE).
                active = active.order_by(Device.id).with_for_update(key_share=True)
                active = active.execution_options(populate_existing=True)
            for device in session.scalars(active):
                device.last_seen = now  # once per batch, not one UPDATE per message
                known.rows.append(device)
        # Only check-ins and status reports record what a device runs; telemetry and presence need neither lookup.
        reporting = {device_id for device_id, m in batch if isinstance(m, CheckIn | StatusReport)}
        if lookups and reporting:
            known.model_devices = reporting
            for row in session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(reporting))):
                known.models[(row.device_id, row.model_name)] = row
            checkins = {device_id for device_id, m in batch if isinstance(m, CheckIn)}
            if checkins:
                known.deployments = {device_id: [] for device_id in checkins}
                for dep in session.scalars(select(Deployment).where(Deployment.device_id.in_(checkins))):
                    known.deployments[dep.device_id].append(dep)
        statuses = [m for _, m in batch if isinstance(m, StatusReport)]
        telemetry = [m for _, m in batch if isinstance(m, TelemetryWindow)]
        shas = {m.bundle_sha256 for m in statuses} | {m.bundle_sha256 for m in telemetry}
        if shas:  # one query: a committed report records its running bundle, a window needs its bundle's profile
            bundles = {b.sha256: b for b in session.scalars(select(Bundle).where(Bundle.sha256.in_(shas)))}
            known.rows.extend(bundles.values())
            for window in telemetry:
                bundle = bundles.get(window.bundle_sha256)
                known.bundle_profiles[window.bundle_sha256] = bundle.hardware_profile if bundle is not None else None
        deployment_ids = {m.deployment_id for m in statuses}
        if deployment_ids:
            if session.get_bind().dialect.name == "sqlite":
                known.rows.extend(session.scalars(select(Deployment).where(Deployment.id.in_(deployment_ids))))
            else:
                lock_reported(session, known, deployment_ids)
        keys = [msg_key(d, m.msg_id) for d, m in batch if isinstance(m, StatusReport)]
        if keys:
            known.messages.update(session.scalars(select(DeviceMessage.msg_id).where(DeviceMessage.msg_id.in_(keys))))
        windows = {(d, m.boot_id, m.seq) for d, m in batch if isinstance(m, TelemetryWindow)}
        if windows:
            known.windows.update(_stored_windows(session, sorted(windows)))
    return known


def lock_reported(session: Session, known: Known, deployment_ids: set[str]) -> None:
    """Share-lock the rollouts of ``deployment_ids``, then load those deployments ``FOR UPDATE`` (PostgreSQL).

    The locks a status report needs (see :func:`ota_server.services.ingest.hold_rollout`), taken for the whole
    batch in two statements instead of two per report, always in one order (after the batch's devices: rollouts,
    then deployments, each by id), so two writers taking them for overlapping batches wait for each other
    instead of deadlocking. The
    deployments are read after their locks are granted (``populate_existing``): a decision committed
    meanwhile (rollback, cancel, supersede) is what the handlers see. The rollout rows stay in the session
    (a late commit reads whether its rollout ordered a revert).
    """
    rollout_ids = sorted(
        {
            rid
            for rid in session.scalars(
                select(Deployment.rollout_id).where(
                    Deployment.id.in_(deployment_ids), Deployment.rollout_id.is_not(None)
                )
            )
            if rid is not None
        }
    )
    if rollout_ids:
        rollouts = select(Rollout).where(Rollout.id.in_(rollout_ids)).order_by(Rollout.id).with_for_update(read=True)
        known.rows.extend(session.scalars(rollouts.execution_options(populate_existing=True)))
    deployments = (
        select(Deployment)
        .where(Deployment.id.in_(deployment_ids))
        .order_by(Deployment.id)
        .with_for_update(key_share=True)  # NO KEY UPDATE: status events inserted elsewhere still key-share them
        .execution_options(populate_existing=True)
    )
    for dep in session.scalars(deployments):
        known.rows.append(dep)
        known.locked.add(dep.id)


_STORED_PG = text(
    "SELECT w.device_id, w.boot_id, w.seq FROM telemetry_windows AS w"
    " JOIN unnest(CAST(:devices AS text[]), CAST(:boots AS text[]), CAST(:seqs AS bigint[])) AS k(device_id, boot_id, seq)"
    " ON w.device_id = k.device_id AND w.boot_id = k.boot_id AND w.seq = k.seq"
)


def _stored_windows(session: Session, keys: list[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    """Which of ``keys`` (device, boot id, seq) are stored: exact keys, on the unique index.

    (A device IN .. AND seq IN .. read every window of the batch's devices whose seq any of them sent, and a
    fleet's devices number their windows alike.) PostgreSQL gets three arrays (one short statement, planned
    once); SQLite row values.
    """
    if session.get_bind().dialect.name == "postgresql":
        devices, boots, seqs = (list(column) for column in zip(*keys, strict=True))
        rows = session.execute(_STORED_PG, {"devices": devices, "boots": boots, "seqs": seqs})
        return {(r[0], r[1], r[2]) for r in rows}
    columns = (TelemetryRecord.device_id, TelemetryRecord.boot_id, TelemetryRecord.seq)
    found: set[tuple[str, str, int]] = set()
    for start in range(0, len(keys), 1000):  # 3 parameters a key, far below SQLite's limit per statement
        chunk = keys[start : start + 1000]
        found.update((r[0], r[1], r[2]) for r in session.execute(select(*columns).where(tuple_(*columns).in_(chunk))))
    return found


def flush_windows(session: Session, known: Known) -> int:
    """Insert the batch's staged window rows (:func:`ota_server.services.telemetry_rows.insert_window_rows`)."""
    if not known.window_rows:
        return 0
    written = insert_window_rows(session, known.window_rows)
    known.window_rows.clear()
    return written


def flush_aggregates(session: Session, known: Known) -> int:
    """Write the batch's telemetry aggregates (:func:`ota_server.services.telemetry_aggregates.flush`)."""
    return flush(session, known.aggregates)
