"""telemetry aggregates (bundle x profile x cohort x time bucket) and rollouts.gate_results

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 07:00:00

- ``telemetry_aggregates``: windows merged by addition per bundle sha x hardware profile x cohort x
  time bucket (x shadowed candidate), maintained by ingest from now on. Back-filled here from every
  stored window, in chunks, with the same code ingest runs, so gates and the summary see the past too.
  The back-fill groups by the cohort label and bucket of ``EDGEOTA_SERVER_TELEMETRY_COHORT_LABEL`` and
  ``EDGEOTA_SERVER_TELEMETRY_BUCKET_SECONDS`` when set in the environment (defaults ``cohort``, 300 s);
  a server configured otherwise in a file groups new windows by its own settings.
- ``telemetry_devices``: per device and bundle, its cohort and newest window end (the summary's distinct
  device count), back-filled the same way.
- ``rollouts.gate_results`` (null): the latest verdict of each telemetry gate, for the status API.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from ota_server.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
CHUNK = 5000


def upgrade() -> None:
    op.create_table(
        "telemetry_aggregates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("hardware_profile", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=128), nullable=False),
        sa.Column("bucket_start", UTCDateTime(timezone=True), nullable=False),
        sa.Column("shadow_sha256", sa.String(length=64), nullable=False),
        sa.Column("shadow_version", sa.String(length=128), nullable=False),
        sa.Column("shadow_compared", sa.BigInteger(), nullable=False),
        sa.Column("shadow_agree", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("attributed", sa.Boolean(), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("nan_outputs", sa.BigInteger(), nullable=False),
        sa.Column("attributed_requests", sa.BigInteger(), nullable=False),
        sa.Column("latency_counts", sa.JSON(), nullable=False),
        sa.Column("histograms", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "bundle_sha256",
            "hardware_profile",
            "cohort",
            "bucket_start",
            "shadow_sha256",
            name="uq_telemetry_aggregate",
        ),
    )
    op.create_index("ix_telemetry_aggregates_bucket", "telemetry_aggregates", ["bucket_start"], unique=False)
    op.create_index("ix_telemetry_aggregates_shadow", "telemetry_aggregates", ["shadow_sha256"], unique=False)
    op.create_table(
        "telemetry_devices",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=128), nullable=False),
        sa.Column("last_window_end", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "bundle_sha256"),
    )
    op.create_index(
        "ix_telemetry_devices_bundle", "telemetry_devices", ["bundle_sha256", "last_window_end"], unique=False
    )
    op.add_column("rollouts", sa.Column("gate_results", sa.JSON(), nullable=True))
    _backfill()


def _backfill() -> None:
    """Merge every stored window into the new table (chunks of ``CHUNK`` windows, one flush each)."""
    from ota_server.services.telemetry_aggregates import AggregateBatch, AggregationConfig, add_windows, flush

    config = AggregationConfig(
        os.environ.get("EDGEOTA_SERVER_TELEMETRY_COHORT_LABEL", "cohort"),
        int(os.environ.get("EDGEOTA_SERVER_TELEMETRY_BUCKET_SECONDS", "300")),
    )
    session = Session(bind=op.get_bind())
    windows = sa.table(
        "telemetry_windows",
        sa.column("id", sa.Integer()),
        sa.column("device_id", sa.String()),
        sa.column("bundle_sha256", sa.String()),
        sa.column("window_end", UTCDateTime(timezone=True)),
        sa.column("payload", sa.JSON()),
    )
    devices = sa.table(
        "devices",
        sa.column("id", sa.String()),
        sa.column("hardware_profile", sa.String()),
        sa.column("labels", sa.JSON()),
    )
    bundles = sa.table("bundles", sa.column("sha256", sa.String()), sa.column("hardware_profile", sa.String()))
    profiles = {sha: p for sha, p in session.execute(sa.select(bundles.c.sha256, bundles.c.hardware_profile))}
    device_rows = {
        d: (p, labels)
        for d, p, labels in session.execute(sa.select(devices.c.id, devices.c.hardware_profile, devices.c.labels))
    }
    last = 0
    while True:
        rows = list(
            session.execute(
                sa.select(
                    windows.c.id, windows.c.device_id, windows.c.bundle_sha256, windows.c.window_end, windows.c.payload
                )
                .where(windows.c.id > last)
                .order_by(windows.c.id)
                .limit(CHUNK)
            )
        )
        if not rows:
            break
        last = rows[-1].id
        batch = AggregateBatch()
        add_windows(
            batch,
            (
                (
                    r.device_id,
                    r.payload,
                    r.window_end,
                    *device_rows.get(r.device_id, ("", None)),
                    profiles.get(r.bundle_sha256),
                )
                for r in rows
            ),
            config,
        )
        flush(session, batch)
    session.flush()


def downgrade() -> None:
    op.drop_column("rollouts", "gate_results")
    op.drop_index("ix_telemetry_devices_bundle", table_name="telemetry_devices")
    op.drop_table("telemetry_devices")
    op.drop_index("ix_telemetry_aggregates_shadow", table_name="telemetry_aggregates")
    op.drop_index("ix_telemetry_aggregates_bucket", table_name="telemetry_aggregates")
    op.drop_table("telemetry_aggregates")
