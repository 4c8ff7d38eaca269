"""patient names: the name an institution sent for its MRN, the newest by event time

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 20:10:00

From LabResult v4, VitalSigns, EncounterEvent, MedicationOrder and Diagnosis v3 on, events may carry the
patient's name as the institution wrote it (patient_family_name, patient_given_name). The store keeps it
in patient_names only, one row per institution and MRN, from the newest event (event time, then event
id) that carried a name: an older event delivered late never overwrites a newer name. The console shows
it to that institution's users, beside the MRN. Nothing stored before 0006 had a name, so nothing is
backfilled; a downgrade drops the names.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

T = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "patient_names",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("patient_mrn", sa.String(length=64), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("family_name", sa.UnicodeText(), nullable=True),
        sa.Column("given_name", sa.UnicodeText(), nullable=True),
        sa.Column("event_time", T, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("institution_id", "patient_mrn", name=op.f("pk_patient_names")),
    )
    op.create_index(op.f("ix_patient_names_regional_patient_id"), "patient_names", ["regional_patient_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_patient_names_regional_patient_id"), table_name="patient_names")
    op.drop_table("patient_names")
