"""deployment attempts (per-device retries) and an index on deployment state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:30:00

Adds ``deployments.attempt`` (1 for every existing row) and ``deployments.retried`` (false), and
replaces the unique (rollout_id, device_id, mode) by (rollout_id, device_id, mode, attempt). The
old constraint was created without a name: PostgreSQL named it itself, SQLite keeps it nameless,
so its name is looked up (and a naming convention lets the SQLite table copy drop it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_OLD_COLUMNS = ["rollout_id", "device_id", "mode"]
_CONVENTION = {"uq": "uq_%(table_name)s_%(column_0_name)s_%(column_1_name)s_%(column_2_name)s"}


def _old_unique_name() -> str | None:
    for uc in sa.inspect(op.get_bind()).get_unique_constraints("deployments"):
        if list(uc["column_names"]) == _OLD_COLUMNS:
            return uc["name"] or "uq_deployments_rollout_id_device_id_mode"
    return None


def upgrade() -> None:
    old = _old_unique_name()
    with op.batch_alter_table("deployments", naming_convention=_CONVENTION) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("retried", sa.Boolean(), server_default=sa.false(), nullable=False))
        if old is not None:
            batch_op.drop_constraint(old, type_="unique")
        batch_op.create_unique_constraint("uq_deployments_attempt", [*_OLD_COLUMNS, "attempt"])
        batch_op.create_index("ix_deployments_state", ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch_op:
        batch_op.drop_index("ix_deployments_state")
        batch_op.drop_constraint("uq_deployments_attempt", type_="unique")
        batch_op.create_unique_constraint("uq_deployments_rollout_id_device_id_mode", _OLD_COLUMNS)
        batch_op.drop_column("retried")
        batch_op.drop_column("attempt")
