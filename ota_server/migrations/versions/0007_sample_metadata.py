"""raw-input samples get a row each: sampling stream, predictions and confidences, for dataset export

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 06:30:00

Adds the ``samples`` table: one row per stored sample file (``data_dir/samples/...``) with the stream
that kept it (``uniform`` or ``hard``), the hard stream's reason, the per-row predictions and
confidences the device reported, and the device's time. Samples stored before this revision have no
row (their files stay listable and downloadable as before); ``edgeota dataset export`` reads rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("hardware_profile", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("predictions", sa.JSON(), nullable=True),
        sa.Column("confidences", sa.JSON(), nullable=True),
        sa.Column("sampled_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "bundle_sha256", "sha256"),
    )
    op.create_index("ix_samples_device_id", "samples", ["device_id"], unique=False)
    op.create_index("ix_samples_received_at", "samples", ["received_at"], unique=False)
    op.create_index("ix_samples_model_version", "samples", ["model_name", "version"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_samples_model_version", table_name="samples")
    op.drop_index("ix_samples_received_at", table_name="samples")
    op.drop_index("ix_samples_device_id", table_name="samples")
    op.drop_table("samples")
