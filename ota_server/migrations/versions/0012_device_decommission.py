"""devices get ``decommissioned_at``: set once by ``edgeota device decommission``

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 08:45:00

A decommissioned device keeps its row, its deployments, models and audit history; its token stops
authenticating, ``edgeota broker config`` leaves it out of the Mosquitto password file, rollouts no
longer target it and device lists hide it unless asked for every device. Rows from before this
revision are active devices (null).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("decommissioned_at", UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("decommissioned_at")
