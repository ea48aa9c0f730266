"""Telemetry aggregates: windows merged by addition per bundle x hardware profile x cohort x time bucket.

Ingest maintains them as windows arrive: each stored window's counts are merged in Python per group for
the whole batch (:class:`AggregateBatch`), and :func:`flush` writes each group once, in the batch's
transaction, after the window rows. So an aggregate holds exactly the windows stored (a window delivered
three times is stored, and counted, once), and a rolled-back batch leaves neither.

- **Cohort**: the value of one configured device label (``telemetry_cohort_label``, default ``cohort``;
  "" when the device has none). One key keeps the number of groups bounded; a selector over other labels
  falls back to reading windows (:mod:`ota_server.services.telemetry_summary`).
- **Bucket**: ``window_end`` rounded down to ``telemetry_bucket_seconds`` (default 300).
- **Attribution**: a window's requests are ``attributed`` when its bundle sha names a stored bundle at
  ingest (its release is known); the profile is then the bundle's, else the device's.

:func:`flush` is an ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of every group (new groups cost
that one statement), then the groups that existed are locked (``FOR UPDATE`` on PostgreSQL; SQLite's
writer holds the database lock), merged in Python (histograms are JSON) and updated. Groups are
written in key order so concurrent writers lock rows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgeota_contract.messages import TelemetryWindow
from ota_server.models import TelemetryAggregate, TelemetryDevice, utcnow
from ota_server.rollout.telemetry_gates import TelemetryTotals

AggKey = tuple[str, str, str, datetime, str]
"""(bundle sha256, hardware profile, cohort, bucket start, shadowed candidate sha or "")."""
KEY_COLUMNS = ("bundle_sha256", "hardware_profile", "cohort", "bucket_start", "shadow_sha256")


@dataclass(frozen=True)
class AggregationConfig:
    """How windows are grouped (``Settings.telemetry_cohort_label``, ``Settings.telemetry_bucket_seconds``)."""

    cohort_label: str = "cohort"
    bucket_seconds: int = 300

    @classmethod
    def from_settings(cls, settings: Any) -> AggregationConfig:
        """The server's grouping (``telemetry_cohort_label``, ``telemetry_bucket_seconds``)."""
        return cls(settings.telemetry_cohort_label, settings.telemetry_bucket_seconds)


def bucket_start(when: datetime, seconds: int) -> datetime:
    """``when`` rounded down to a multiple of ``seconds`` since the epoch, in UTC (naive read as UTC)."""
    aware = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    epoch = int(aware.timestamp()) // seconds * seconds
    return datetime.fromtimestamp(epoch, UTC)


def cohort_of(labels: Mapping[str, Any] | None, label_key: str) -> str:
    """The device's cohort: the value of ``label_key`` among its labels ("" without one)."""
    if not label_key or not labels or label_key not in labels:
        return ""
    return str(labels[label_key])[:128]


@dataclass
class Group:
    model_name: str
    version: str
    attributed: bool
    shadow_version: str
    totals: TelemetryTotals = field(default_factory=TelemetryTotals)


@dataclass(frozen=True)
class WindowPart:
    """One stored window waiting to join its aggregate group (its counts are added only then)."""

    key: AggKey
    model_name: str
    version: str
    attributed: bool
    shadow_version: str
    payload: Mapping[str, Any] | TelemetryWindow
    """The window as stored JSON, or parsed (ingest's batch path: :func:`parsed_window_part`)."""
    device_id: str
    window_end: datetime


@dataclass
class AggregateBatch:
    """Windows of one ingest batch merged per aggregate group, waiting for :func:`flush`."""

    groups: dict[AggKey, Group] = field(default_factory=dict)
    devices: dict[tuple[str, str], tuple[str, datetime]] = field(default_factory=dict)
    """Per (device, bundle sha): its cohort and newest window end in the batch (``telemetry_devices``)."""

    def add(self, part: WindowPart) -> None:
        """Add one window's counts to its group (each window is added once, straight into the group)."""
        key = part.key
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(part.model_name, part.version, part.attributed, part.shadow_version)
        else:
            group.attributed = group.attributed or part.attributed
        if isinstance(part.payload, TelemetryWindow):
            group.totals.add_window_model(part.payload, part.device_id, part.attributed)
        else:
            group.totals.add_window(part.payload, part.device_id, part.attributed)
        seen = self.devices.get((part.device_id, key[0]))
        if seen is None or seen[1] < part.window_end:
            self.devices[(part.device_id, key[0])] = (key[2], part.window_end)

    def clear(self) -> None:
        self.groups.clear()
        self.devices.clear()


def window_part(
    payload: Mapping[str, Any],
    window_end: datetime,
    device_id: str,
    device_profile: str,
    labels: Mapping[str, Any] | None,
    bundle_profile: str | None,
    config: AggregationConfig,
) -> WindowPart:
    """The aggregate group of one window (``payload``: the ``TelemetryWindow`` as stored JSON).

    ``bundle_profile``: the stored bundle's hardware profile, None when the bundle sha is unknown.
    """
    shadow = payload.get("shadow") or {}
    key: AggKey = (
        str(payload["bundle_sha256"]),
        bundle_profile if bundle_profile is not None else device_profile,
        cohort_of(labels, config.cohort_label),
        bucket_start(window_end, config.bucket_seconds),
        str(shadow.get("candidate_bundle_sha256", "")),
    )
    return WindowPart(
        key,
        str(payload["model_name"]),
        str(payload["version"]),
        bundle_profile is not None,
        str(shadow.get("candidate_version", "")),
        payload,
        device_id,
        window_end,
    )


def parsed_window_part(
    window: TelemetryWindow,
    device_id: str,
    device_profile: str,
    labels: Mapping[str, Any] | None,
    bundle_profile: str | None,
    config: AggregationConfig,
) -> WindowPart:
    """:func:`window_part` of a parsed window (the same key and counts, without its JSON)."""
    shadow = window.shadow
    key: AggKey = (
        window.bundle_sha256,
        bundle_profile if bundle_profile is not None else device_profile,
        cohort_of(labels, config.cohort_label),
        bucket_start(window.window_end, config.bucket_seconds),
        shadow.candidate_bundle_sha256 if shadow is not None else "",
    )
    return WindowPart(
        key,
        window.model_name,
        window.version,
        bundle_profile is not None,
        shadow.candidate_version if shadow is not None else "",
        window,
        device_id,
        window.window_end,
    )


def _shadow_counts(group: Group, key: AggKey) -> tuple[int, int]:
    pair = group.totals.shadows.get((group.shadow_version, key[4]))
    return (pair[0], pair[1]) if pair else (0, 0)


def _row(key: AggKey, group: Group, now: datetime) -> dict[str, Any]:
    t = group.totals
    compared, agree = _shadow_counts(group, key)
    return {
        **dict(zip(KEY_COLUMNS, key, strict=True)),
        "model_name": group.model_name,
        "version": group.version,
        "attributed": group.attributed,
        "shadow_version": group.shadow_version,
        "shadow_compared": compared,
        "shadow_agree": agree,
        "windows": t.windows,
        "requests": t.requests,
        "errors": t.errors,
        "nan_outputs": t.nan_outputs,
        "attributed_requests": t.attributed_requests,
        "latency_counts": t.latency_counts,
        "histograms": t.histograms_json(),
        "updated_at": now,
    }


def row_totals(row: Any, histograms: bool = True) -> TelemetryTotals:
    """The :class:`TelemetryTotals` of a stored aggregate (an ORM row or a result row with its columns)."""
    return TelemetryTotals.from_row(
        row.histograms if histograms else None,
        row.latency_counts,
        windows=row.windows,
        requests=row.requests,
        errors=row.errors,
        nan_outputs=row.nan_outputs,
        attributed_requests=row.attributed_requests,
        shadow=(row.shadow_version, row.shadow_sha256, row.shadow_compared, row.shadow_agree),
    )


_CACHE: dict[tuple[str, int], tuple[tuple[datetime, int], TelemetryTotals]] = {}
"""Decoded aggregate rows by (database, id), with the (updated_at, windows) they were read at: a review re-reads the same
rows every time, and decoding their JSON histograms was most of its cost."""
_CACHE_MAX = 200_000
_META = (
    TelemetryAggregate.id,
    TelemetryAggregate.bundle_sha256,
    TelemetryAggregate.hardware_profile,
    TelemetryAggregate.cohort,
    TelemetryAggregate.model_name,
    TelemetryAggregate.version,
    TelemetryAggregate.updated_at,
    TelemetryAggregate.windows,
)


def read_aggregates(session: Session, *where: Any) -> list[tuple[Any, TelemetryTotals]]:
    """The aggregate rows matching ``where`` (SQLAlchemy criteria on ``TelemetryAggregate``), each with its totals.

    Each row's plain columns come from one query; the JSON histograms are fetched and decoded only for rows
    not cached at their current ``(updated_at, windows)``. The totals returned are shared with the cache:
    merge them into others, never change them.
    """
    db = str(session.get_bind().engine.url)
    rows = list(session.execute(select(*_META).where(*where).order_by(TelemetryAggregate.id)))
    stale = [r.id for r in rows if (c := _CACHE.get((db, r.id))) is None or c[0] != (r.updated_at, r.windows)]
    if len(_CACHE) + len(stale) > _CACHE_MAX:
        _CACHE.clear()
    for start in range(0, len(stale), 500):
        for full in session.scalars(
            select(TelemetryAggregate).where(TelemetryAggregate.id.in_(stale[start : start + 500]))
        ):
            _CACHE[(db, full.id)] = ((full.updated_at, full.windows), row_totals(full))
    return [(r, _CACHE[(db, r.id)][1]) for r in rows]


_AGGREGATES = cast(Table, TelemetryAggregate.__table__)


def flush(session: Session, batch: AggregateBatch) -> int:
    """Merge ``batch`` into ``telemetry_aggregates`` inside the caller's transaction; returns the groups written.

    Raises what the database raises (the caller's unit of work rolls the batch back, windows included).
    """
    if not batch.groups:
        return 0
    now = utcnow()
    keys = sorted(batch.groups)
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # executemany of one statement (compiled once, cached; the drivers batch the rows) rather than a VALUES
    # list per batch, which SQLAlchemy compiled again every time
    stmt = (
        insert(_AGGREGATES)
        .on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
        .returning(*(_AGGREGATES.c[c] for c in KEY_COLUMNS))
    )
    inserted = {tuple(r) for r in session.execute(stmt, [_row(k, batch.groups[k], now) for k in keys])}
    existing = [k for k in keys if k not in inserted]
    if existing:
        _merge_existing(session, batch, existing, now)
    if batch.devices:
        _upsert_devices(session, batch, dialect)
    batch.clear()
    return len(keys)


def _upsert_devices(session: Session, batch: AggregateBatch, dialect: str) -> None:
    """One upsert (executemany, batched by the driver) keeping, per device and bundle, the newest window end."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = [
        {"device_id": d, "bundle_sha256": sha, "cohort": cohort, "last_window_end": end}
        for (d, sha), (cohort, end) in sorted(batch.devices.items())
    ]
    stmt = insert(cast(Table, TelemetryDevice.__table__))
    newest = func.greatest if dialect == "postgresql" else func.max  # SQLite's two-argument max() is scalar
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "bundle_sha256"],
            set_={
                "cohort": stmt.excluded.cohort,
                "last_window_end": newest(stmt.table.c.last_window_end, stmt.excluded.last_window_end),
            },
        ),
        rows,
    )


def _merge_existing(session: Session, batch: AggregateBatch, keys: list[AggKey], now: datetime) -> None:
    wanted = set(keys)
    rows = session.scalars(
        select(TelemetryAggregate)
        .where(
            TelemetryAggregate.bundle_sha256.in_({k[0] for k in keys}),
            TelemetryAggregate.bucket_start.in_({k[3] for k in keys}),
        )
        .order_by(*(getattr(TelemetryAggregate, c) for c in KEY_COLUMNS))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    for row in rows:
        key: AggKey = (row.bundle_sha256, row.hardware_profile, row.cohort, row.bucket_start, row.shadow_sha256)
        if key not in wanted:
            continue
        group = batch.groups[key]
        merged = row_totals(row)
        merged.merge(group.totals)
        values = _row(
            key, Group(row.model_name, row.version, row.attributed or group.attributed, row.shadow_version, merged), now
        )
        for name, value in values.items():
            if name not in KEY_COLUMNS:
                setattr(row, name, value)
    session.flush()


def add_windows(
    batch: AggregateBatch,
    windows: Iterable[tuple[str, Mapping[str, Any], datetime, str, Mapping[str, Any] | None, str | None]],
    config: AggregationConfig,
) -> None:
    """Add stored windows to ``batch``: (device id, window JSON, window end, device profile, device labels, bundle
    profile or None). The migration's back-fill and the bench use it."""
    for device_id, payload, window_end, device_profile, labels, bundle_profile in windows:
        batch.add(window_part(payload, window_end, device_id, device_profile, labels, bundle_profile, config))
