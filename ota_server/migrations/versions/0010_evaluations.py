"""evaluations: candidate-vs-serving evaluations of releases, and the blessing gate's record per rollout

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 08:45:00

Adds ``evaluations`` (one uploaded evaluation record of a candidate release against a baseline release, with
the server's verdict) and ``rollout_blessings`` (per rollout and release it may serve, what the blessing gate found when it started, and the
override reason that let it start, if any). Models: ``ota_server.services.evaluations``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("candidate_release_id", sa.String(length=32), nullable=False),
        sa.Column("baseline_release_id", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("blessed", sa.Boolean(), nullable=False),
        sa.Column("dataset_digest", sa.String(length=64), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["candidate_release_id"], ["releases.id"]),
        sa.ForeignKeyConstraint(["baseline_release_id"], ["releases.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_evaluations_candidate_created", "evaluations", ["candidate_release_id", "created_at"], unique=False
    )
    op.create_index("ix_evaluations_baseline_release_id", "evaluations", ["baseline_release_id"], unique=False)
    op.create_table(
        "rollout_blessings",
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("release_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("evaluation_id", sa.String(length=32), nullable=True),
        sa.Column("overridden", sa.Boolean(), nullable=False),
        sa.Column("override_reason", sa.Text(), nullable=False),
        sa.Column("checked_by", sa.String(length=128), nullable=False),
        sa.Column("checked_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "release_id"),
    )


def downgrade() -> None:
    op.drop_table("rollout_blessings")
    op.drop_index("ix_evaluations_baseline_release_id", table_name="evaluations")
    op.drop_index("ix_evaluations_candidate_created", table_name="evaluations")
    op.drop_table("evaluations")
