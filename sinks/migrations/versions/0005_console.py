"""console: accounts, sessions, append-only audit log, notification deliveries, dead letters, alert feed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00

The clinician console's tables (none holds clinical data), the dead letters the store now keeps for
institutions' integration staff, and alerts.changed_time, by which the console's live feed finds the
alerts changed since a client's last event. The audit log refuses UPDATE and DELETE by trigger on both
SQLite and PostgreSQL, so no application path can rewrite it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

T = sa.DateTime(timezone=True)

_PG_REFUSE = """
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END;
$$ LANGUAGE plpgsql
"""


def _audit_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_REFUSE)
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )
        return
    for operation in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_log_no_{operation.lower()} BEFORE {operation} ON audit_log "
            f"BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: {operation} refused'); END"
        )


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("changed_time", T, nullable=True))
        batch.create_index(batch.f("ix_alerts_changed_time"), ["changed_time"])
    op.create_table(
        "dead_letters",
        sa.Column("deadletter_id", sa.String(length=36), nullable=False),
        sa.Column("original_topic", sa.String(length=255), nullable=False),
        sa.Column("original_partition", sa.Integer(), nullable=False),
        sa.Column("original_offset", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=True),
        sa.Column("error_class", sa.String(length=128), nullable=False),
        sa.Column("field", sa.String(length=255), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=True),
        sa.Column("correlation_id", sa.String(length=64), nullable=True),
        sa.Column("processor", sa.String(length=64), nullable=False),
        sa.Column("possibly_critical", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("loinc_code", sa.String(length=16), nullable=True),
        sa.Column("failed_time", T, nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("deadletter_id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        op.f("ix_dead_letters_institution_id_failed_time"), "dead_letters", ["institution_id", "failed_time"]
    )
    op.create_table(
        "console_users",
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=True),
        sa.Column("wards", sa.Text(), server_default="", nullable=False),
        sa.Column("chain_level", sa.Integer(), nullable=True),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("created_time", T, nullable=False),
        sa.Column("changed_time", T, nullable=False),
        sa.PrimaryKeyConstraint("username", name=op.f("pk_console_users")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_time", T, nullable=False),
        sa.Column("expires_time", T, nullable=False),
        sa.Column("last_seen_time", T, nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_console_sessions")),
    )
    op.create_index(op.f("ix_console_sessions_username"), "console_sessions", ["username"])
    op.create_table(
        "audit_log",
        sa.Column("audit_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", T, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=True),
        sa.Column("alert_id", sa.String(length=36), nullable=True),
        sa.Column("institution_id", sa.String(length=32), nullable=True),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_time"), "audit_log", ["time"])
    op.create_index(op.f("ix_audit_log_username_time"), "audit_log", ["username", "time"])
    _audit_triggers()
    op.create_table(
        "notification_deliveries",
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("channel_kind", sa.String(length=16), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("ward", sa.String(length=64), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_time", T, nullable=True),
        sa.Column("created_time", T, nullable=False),
        sa.Column("delivered_time", T, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_notification_deliveries")),
    )
    op.create_index(
        op.f("ix_notification_deliveries_status_next_attempt_time"),
        "notification_deliveries",
        ["status", "next_attempt_time"],
    )
    op.create_index(op.f("ix_notification_deliveries_alert_id"), "notification_deliveries", ["alert_id"])
    op.create_table(
        "notification_attempts",
        sa.Column("attempt_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("time", T, nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("attempt_id", name=op.f("pk_notification_attempts")),
    )
    op.create_index(op.f("ix_notification_attempts_delivery_id"), "notification_attempts", ["delivery_id"])
    op.create_index(op.f("ix_notification_attempts_time"), "notification_attempts", ["time"])


def downgrade() -> None:
    for table in ("notification_attempts", "notification_deliveries"):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    else:
        op.drop_table("audit_log")  # its triggers go with it
    for table in ("console_sessions", "console_users", "dead_letters"):
        op.drop_table(table)
    with op.batch_alter_table("alerts") as batch:
        batch.drop_index(batch.f("ix_alerts_changed_time"))
        batch.drop_column("changed_time")
