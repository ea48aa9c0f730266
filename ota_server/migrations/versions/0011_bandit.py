"""bandit rollouts: rollout_arms, bandit_steps, deployments.allow_downgrade

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 08:45:00

A bandit rollout (``strategy: bandit``) splits its devices between two or more releases of one model and
moves them by Thompson sampling on the rewards applications report (``feedback``). Adds:

- ``rollout_arms``: one row per (rollout, release): the arm's state (active, dropped, winner, retired), why it
  ended, and the latest step's posterior, probability of being best, target share and device count.
- ``bandit_steps``: every allocation step, append-only: the seed of its draws, the arms' figures, the moves.
- ``deployments.allow_downgrade`` (false): the server permits this install below the device's release counter
  (moving a device to an older arm); it is sent with mode ``rollback``.

Existing rollouts have no arms and are unchanged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from ota_server.models import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (no batch copy): a SQLite table copy of ``deployments`` would fail with foreign keys on.
    op.add_column("deployments", sa.Column("allow_downgrade", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "rollout_arms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("release_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("ended_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("beta", sa.Float(), nullable=False),
        sa.Column("rewards", sa.BigInteger(), nullable=False),
        sa.Column("reward_sum", sa.Float(), nullable=False),
        sa.Column("prob_best", sa.Float(), nullable=True),
        sa.Column("target_share", sa.Float(), nullable=True),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("gate_results", sa.JSON(), nullable=True),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "release_id"),
    )
    op.create_index("ix_rollout_arms_rollout_id", "rollout_arms", ["rollout_id"], unique=False)
    op.create_table(
        "bandit_steps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("moves", sa.JSON(), nullable=False),
        sa.Column("leader", sa.String(length=32), nullable=True),
        sa.Column("leader_since", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rollout_id", "step"),
    )
    op.create_index("ix_bandit_steps_rollout_id", "bandit_steps", ["rollout_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_bandit_steps_rollout_id", table_name="bandit_steps")
    op.drop_table("bandit_steps")
    op.drop_index("ix_rollout_arms_rollout_id", table_name="rollout_arms")
    op.drop_table("rollout_arms")
    op.drop_column("deployments", "allow_downgrade")
