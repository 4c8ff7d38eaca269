"""alert history: each state change of an alert, from alerts.state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00

Until 0004 a suppressed repeat republished the whole alert on alerts.critical, and the alerts row took
the highest suppressed_repeats it saw. From 0004 on an alert travels once and its changes (opened,
repeat, note, escalated, acknowledged) come as AlertState records on alerts.state; the store keeps each
in alert_history, one row per state id, and the alerts row takes its repeat count from them. Rows of
alerts stored before keep the count they had; their history starts with the first change after 0004.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

T = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alert_history",
        sa.Column("state_id", sa.String(length=36), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("suppressed_repeats", sa.Integer(), nullable=False),
        sa.Column("escalation_level", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.String(length=128), nullable=True),
        sa.Column("next_deadline_time", T, nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=True),
        sa.Column("acknowledged_time", T, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("changed_time", T, nullable=False),
        sa.Column("correlation_id", sa.String(length=64), nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("state_id", name=op.f("pk_alert_history")),
    )
    op.create_index(
        op.f("ix_alert_history_alert_id_changed_time"), "alert_history", ["alert_id", "changed_time"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_alert_history_alert_id_changed_time"), table_name="alert_history")
    op.drop_table("alert_history")
