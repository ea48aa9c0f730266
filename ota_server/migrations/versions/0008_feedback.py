"""feedback: true labels and rewards applications report for predictions, for field accuracy and the bandit

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 08:45:00

Adds the ``feedback`` table: one row per (device, prediction id, row of a batched request) with the
release that served the prediction, the device's cohort, the predicted and true labels, whether they
match, an optional reward, and who reported it. Samples get ``prediction_id`` and ``request_rows`` (null for samples stored before, and
for requests without a prediction id), so a dataset export fills in labels from ``feedback``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("bundle_sha256", sa.String(length=64), nullable=False),
        sa.Column("hardware_profile", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=128), nullable=False),
        sa.Column("predicted", sa.String(length=128), nullable=True),
        sa.Column("label", sa.String(length=128), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("predicted_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "prediction_id", "row", name="uq_feedback_prediction"),
    )
    op.create_index("ix_feedback_device_id", "feedback", ["device_id"], unique=False)
    op.create_index("ix_feedback_release", "feedback", ["model_name", "version", "received_at"], unique=False)
    # samples name the prediction they came from, so an export can fill in the label reported for it
    op.add_column("samples", sa.Column("prediction_id", sa.String(length=64), nullable=True))
    op.add_column("samples", sa.Column("request_rows", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("request_rows")
        batch.drop_column("prediction_id")
    op.drop_index("ix_feedback_release", table_name="feedback")
    op.drop_index("ix_feedback_device_id", table_name="feedback")
    op.drop_table("feedback")
