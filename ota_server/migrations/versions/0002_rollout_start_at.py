"""rollout scheduled start

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 07:06:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ota_server.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("start_at", ota_server.models.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("start_at")
