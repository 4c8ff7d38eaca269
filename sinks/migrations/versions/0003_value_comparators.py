"""results that are bounds: observations and alerts carry the comparator beside the value

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:40:00

A laboratory result outside the analyser's measuring range is a bound ("> 600 mg/dL"), not a
measurement. From 0003 on the store keeps its comparator (<, <=, >=, >) beside the value; rows written
before hold null, which means what it always meant: the value is the measurement.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("observations", "alerts")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("value_comparator", sa.String(length=2), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("value_comparator")
