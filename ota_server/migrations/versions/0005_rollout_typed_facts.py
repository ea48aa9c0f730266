"""typed facts for rollout decisions: rollouts.halted_by, rollouts.reverted, deployments.reverted_by

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 06:00:00

Decisions used to read words inside ``rollouts.detail`` (whether a revert was ordered: ``"revert" in
detail``). They now read columns:

- ``rollouts.halted_by`` (null): the gate that halted the rollout (``failure_rate``, ``min_devices``,
  ``telemetry``). Left null for existing rows: which gate fired was never stored.
- ``rollouts.reverted`` (false): the server ordered the rollout's updated devices back. Set for existing
  rows that are ``rolled_back``, or ``aborted`` with a revert (the one time the old detail is read).
- ``deployments.reverted_by`` (null, indexed): the rollback deployment that undoes an install. Filled
  for existing installs from the rollback deployment of the same rollout and device.

Existing installs that the old check-in reconciliation relabelled ``rolled_back``/``health_failed``
although the server had ordered their rollback (detail "device check-in shows ... running", a
``reverted_by`` link) get reason ``server_rollback``, so the next rollout targets those devices again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (no batch copy): on SQLite a table copy would drop ``rollouts``, which
    # ``deployments`` references, and fail with foreign keys on.
    op.add_column("rollouts", sa.Column("halted_by", sa.String(length=32), nullable=True))
    op.add_column("rollouts", sa.Column("reverted", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("deployments", sa.Column("reverted_by", sa.String(length=32), nullable=True))
    op.create_index("ix_deployments_reverted_by", "deployments", ["reverted_by"], unique=False)
    op.execute(
        sa.text(
            "UPDATE rollouts SET reverted = :yes "
            "WHERE state = 'rolled_back' OR (state = 'aborted' AND detail LIKE '%revert%')"
        ).bindparams(yes=True)
    )
    rollback_of = (
        "SELECT b.id FROM deployments b WHERE b.rollout_id = deployments.rollout_id "
        "AND b.device_id = deployments.device_id AND b.mode = 'rollback'"
    )
    op.execute(
        sa.text(
            f"UPDATE deployments SET reverted_by = ({rollback_of} ORDER BY b.created_at LIMIT 1) "
            f"WHERE mode = 'install' AND NOT retried AND EXISTS ({rollback_of})"
        )
    )
    op.execute(
        sa.text(
            "UPDATE deployments SET reason = 'server_rollback' "
            "WHERE mode = 'install' AND state = 'rolled_back' AND reason = 'health_failed' "
            "AND reverted_by IS NOT NULL AND detail LIKE 'device check-in shows %'"
        )
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_reverted_by", table_name="deployments")
    op.drop_column("deployments", "reverted_by")
    op.drop_column("rollouts", "reverted")
    op.drop_column("rollouts", "halted_by")
