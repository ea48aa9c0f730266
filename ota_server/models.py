"""SQLAlchemy 2 typed models. Every schema change goes through an Alembic migration."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEntry(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    entity_type: Mapped[str] = mapped_column(String(32), index=True)
    entity_id: Mapped[str] = mapped_column(String(128), index=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("release_id", "hardware_profile"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    release_counter: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    signing_key_id: Mapped[str] = mapped_column(String(16))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_profile: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    token_hash: Mapped[str] = mapped_column(String(64))
    mqtt_password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(nullable=True)
    presence_online: Mapped[bool] = mapped_column(Boolean, default=False)
    boot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    agent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The newest status report or check-in applied (boot, per-boot seq, device clock): an older
    # check-in (re-sent under ingest lag) must not undo what a newer report said.
    report_boot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    report_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    report_sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Set once by `edgeota device decommission`: the device's credentials stop working, it leaves every
    # rollout, lists hide it; the row (and its history) stays. Migration 0012.
    decommissioned_at: Mapped[datetime | None] = mapped_column(nullable=True)


class DeviceModel(Base):
    """What a device runs per model, as last reconciled from its check-ins and reports."""

    __tablename__ = "device_models"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(128))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    release_counter: Mapped[int] = mapped_column(BigInteger)
    previous_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_bundle_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)
    targets: Mapped[list[Any]] = mapped_column(JSON, default=list)
    no_bundle: Mapped[list[Any]] = mapped_column(JSON, default=list)
    skipped: Mapped[list[Any]] = mapped_column(JSON, default=list)
    current_stage: Mapped[int] = mapped_column(Integer, default=0)
    stage_started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    soak_started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    approved_stages: Mapped[list[Any]] = mapped_column(JSON, default=list)
    start_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reason: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    """For people only: no decision reads it (the typed facts are the columns)."""
    halted_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The gate that halted the rollout (``engine_logic.Gate``), or None; cleared when it runs again."""
    reverted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The server ordered the rollout's updated devices back to their previous bundle."""
    gate_results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """The latest evaluation of the plan's telemetry gates (``{"stage", "at", "gates": [...]}``), for people and
    the status API; decisions evaluate the gates afresh each tick and never read this."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class Deployment(Base):
    """One attempt of one bundle on one device.

    State changes only through :mod:`ota_server.rollout` (rules in ``rollout.deployment_rules``).
    Per (rollout, device, mode) attempts are numbered from 1; a retry (plan ``max_retries``) adds the
    next attempt and marks the failed one ``retried``, so exactly one row per (rollout, device, mode)
    has ``retried`` false: the one the rollout engine and the status counts look at.
    """

    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id", "mode", "attempt", name="uq_deployments_attempt"),
        Index("ix_deployments_device_state", "device_id", "state"),
        Index("ix_deployments_state", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    rollout_id: Mapped[str | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True, index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    mode: Mapped[str] = mapped_column(String(16))
    stage: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    bundle_sha256: Mapped[str] = mapped_column(ForeignKey("bundles.sha256"))
    release_counter: Mapped[int] = mapped_column(BigInteger)
    previous_bundle_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="ok")
    detail: Mapped[str] = mapped_column(Text, default="")
    assignment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    retried: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reverted_by: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    """The rollback deployment the server ordered to undo this install (see ``rollout.deployment_rules``)."""
    allow_downgrade: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The server permits this install below the release counter the device runs (a bandit arm older than the
    device's release, migration 0011): it is sent with mode ``rollback``, the contract's signed permission."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    notified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceMessage(Base):
    """Ids of device reports already stored, so a re-sent report is acked but not applied twice."""

    __tablename__ = "device_messages"

    msg_id: Mapped[str] = mapped_column(String(140), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class StatusEvent(Base):
    """Status history of a device: every applied deployment report."""

    __tablename__ = "status_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    deployment_id: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(default=utcnow)


class TelemetryRecord(Base):
    __tablename__ = "telemetry_windows"
    __table_args__ = (UniqueConstraint("device_id", "boot_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    boot_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    bundle_sha256: Mapped[str] = mapped_column(String(64), index=True)
    window_start: Mapped[datetime] = mapped_column()
    window_end: Mapped[datetime] = mapped_column()
    request_count: Mapped[int] = mapped_column(BigInteger)
    error_count: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryAggregate(Base):
    """Telemetry windows merged by addition per bundle x hardware profile x cohort x time bucket.

    Maintained by ingest in the same transaction as the window rows (one merge per group per batch), so
    the gates and the fleet summary read a few rows instead of every window's payload. Windows with a
    shadow summary form their own rows (per shadowed candidate), so the shadow gate filters in SQL.
    """

    __tablename__ = "telemetry_aggregates"
    __table_args__ = (
        UniqueConstraint(
            "bundle_sha256",
            "hardware_profile",
            "cohort",
            "bucket_start",
            "shadow_sha256",
            name="uq_telemetry_aggregate",
        ),
        Index("ix_telemetry_aggregates_bucket", "bucket_start"),
        Index("ix_telemetry_aggregates_shadow", "shadow_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[str] = mapped_column(String(128))
    """The value of the configured cohort label (``telemetry_cohort_label``) on the device; "" when absent."""
    bucket_start: Mapped[datetime] = mapped_column()
    """``window_end`` rounded down to ``telemetry_bucket_seconds``."""
    shadow_sha256: Mapped[str] = mapped_column(String(64))
    """The candidate bundle the windows' devices shadowed ("" when none): the shadow gate's filter."""
    shadow_version: Mapped[str] = mapped_column(String(128))
    shadow_compared: Mapped[int] = mapped_column(BigInteger)
    shadow_agree: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    attributed: Mapped[bool] = mapped_column(Boolean)
    """The bundle sha named a stored bundle when the windows arrived (the release is known)."""
    windows: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    nan_outputs: Mapped[int] = mapped_column(BigInteger)
    attributed_requests: Mapped[int] = mapped_column(BigInteger)
    latency_counts: Mapped[list[Any]] = mapped_column(JSON)
    histograms: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Features, output classes and confidence, spool drops (``TelemetryTotals.histograms_json``)."""
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredSample(Base):
    """One raw-input sample a device uploaded for retraining (the file lies under ``data_dir/samples``).

    ``stream`` is ``uniform`` (a random share of requests) or ``hard`` (rows the model flagged, ``reason``
    ``low_confidence`` or ``shadow_disagreement``); ``predictions`` and ``confidences`` hold one value per row
    (null when the device could not tell; a confidence is null for a row with non-finite outputs).
    """

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("device_id", "bundle_sha256", "sha256"),
        Index("ix_samples_model_version", "model_name", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    stream: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    predictions: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    confidences: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    sampled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """The device's clock when the request was served (null for samples without metadata)."""
    prediction_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The prediction id the agent returned for the request (null when it had none): joins ``feedback``."""
    request_rows: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    """The request's row of each sample row (null: row i of the request); migration 0008."""
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class TelemetryDevice(Base):
    """The newest window end per device and bundle: distinct devices are not additive, so the fleet summary
    counts them here (one row per device and bundle) instead of over every window row."""

    __tablename__ = "telemetry_devices"
    __table_args__ = (Index("ix_telemetry_devices_bundle", "bundle_sha256", "last_window_end"),)

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    cohort: Mapped[str] = mapped_column(String(128))
    last_window_end: Mapped[datetime] = mapped_column()


class EngineLease(Base):
    """A lease row: only the holder of an unexpired lease runs the rollout engine."""

    __tablename__ = "engine_lease"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column()


class Feedback(Base):
    """The true label (or a reward) an application reported for one prediction a device served.

    One row per (device, prediction id, row): a later report for the same prediction replaces its label or
    reward (``row`` is the row of a batched request, 0 otherwise). ``predicted`` is the device's top-1 answer
    (the class index as text), ``correct`` whether it matched ``label`` (null when no label was given);
    ``reward`` is an application's own reward in [0, 1] (the bandit reads it, or ``correct``);
    ``cohort`` is the value of the telemetry cohort label on the device ("" when absent); ``source`` says
    who reported it (``device``: through the agent, ``api``: to the server directly).
    """

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("device_id", "prediction_id", "row", name="uq_feedback_prediction"),
        Index("ix_feedback_release", "model_name", "version", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    prediction_id: Mapped[str] = mapped_column(String(64))
    row: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[str] = mapped_column(String(128), default="")
    predicted: Mapped[str | None] = mapped_column(String(128), nullable=True)
    label: Mapped[str | None] = mapped_column(String(128), nullable=True)
    correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    predicted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RolloutArm(Base):
    """One arm of a bandit rollout (``ota_server.rollout.bandit``): a release and what the engine last judged.

    ``state`` changes only by the arm rules (``ota_server.rollout.bandit_logic.ARM_RULES``): ``active`` ->
    ``dropped`` (failed its health gates), ``winner`` or ``retired`` (another arm won). The posterior, share and
    probability columns are the latest allocation step's (``bandit_steps`` keeps every step), for the status API.
    """

    __tablename__ = "rollout_arms"
    __table_args__ = (UniqueConstraint("rollout_id", "release_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
    alpha: Mapped[float] = mapped_column(Float, default=1.0)
    beta: Mapped[float] = mapped_column(Float, default=1.0)
    rewards: Mapped[int] = mapped_column(BigInteger, default=0)
    reward_sum: Mapped[float] = mapped_column(Float, default=0.0)
    prob_best: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    devices: Mapped[int] = mapped_column(Integer, default=0)
    gate_results: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class BanditStep(Base):
    """One allocation step of a bandit rollout, append-only: the posteriors, the seed of its Thompson draws
    (so the step can be recomputed), the target shares and the devices it moved."""

    __tablename__ = "bandit_steps"
    __table_args__ = (UniqueConstraint("rollout_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    seed: Mapped[int] = mapped_column(BigInteger)
    arms: Mapped[list[Any]] = mapped_column(JSON)
    moves: Mapped[list[Any]] = mapped_column(JSON)
    leader: Mapped[str | None] = mapped_column(String(32), nullable=True)
    leader_since: Mapped[datetime | None] = mapped_column(nullable=True)
