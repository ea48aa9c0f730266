"""dashboard: browser sessions and saved device filters

Revision ID: 0014
Revises: 0012 (0013 is not used)
Create Date: 2026-12-07 08:45:00

Adds ``ui_sessions`` (one row per signed-in browser: the sha256 of the cookie secret, the token that signed in,
its role, the CSRF token, the expiry) and ``ui_saved_filters`` (named device filters per token).

Adds the index ``ix_deployments_rollout_summary`` on deployments (rollout_id, mode, retried, state, stage, reason,
bundle_sha256, reverted_by): every grouped count of a rollout's status and rollout page (per state, per stage, per
reason, per bundle, the revert join) and its failed-device lists read this index alone instead of one table row per
deployment (10,000 rows for a rollout of 10,000 devices).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ui_sessions_token", "ui_sessions", ["token_id"], unique=False)
    op.create_table(
        "ui_saved_filters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("query", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_id", "name", name="uq_ui_saved_filters_name"),
    )
    op.create_index(
        "ix_deployments_rollout_summary",
        "deployments",
        ["rollout_id", "mode", "retried", "state", "stage", "reason", "bundle_sha256", "reverted_by"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_rollout_summary", table_name="deployments")
    op.drop_table("ui_saved_filters")
    op.drop_index("ix_ui_sessions_token", table_name="ui_sessions")
    op.drop_table("ui_sessions")
