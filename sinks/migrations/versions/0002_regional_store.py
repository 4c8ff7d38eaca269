"""regional store: every clinical kind, identities, alert lifecycle, ingest log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 15:20:00

0001 kept one observation row per event id (a correction was a second row). From 0002 on, a row is
one result at its latest version, keyed by its natural key; the upgrade keeps the latest version of
each 0001 result and records every 0001 event id in the ingest log, so redeliveries stay no-ops.

0001's alerts table was also the publishing outbox (`published_time` NULL until Kafka confirmed the
alert). From 0002 on, the clinical agent publishes alerts itself and the store takes them from the
alerts topic, so the column goes. A downgrade brings it back stamped with the raised time: every alert
a 0002 store holds has been on Kafka, and 0001 code would otherwise publish them all again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

T = sa.DateTime(timezone=True)


def _new_observations() -> None:
    op.create_table(
        "observations",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("result_id", sa.String(length=128), nullable=False),
        sa.Column("component", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_time", T, nullable=False),
        sa.Column("source_system", sa.String(length=64), nullable=False),
        sa.Column("correlation_id", sa.String(length=64), nullable=True),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=True),
        sa.Column("local_code", sa.String(length=64), nullable=False),
        sa.Column("loinc_code", sa.String(length=16), nullable=True),
        sa.Column("analyte", sa.Text(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(length=32), nullable=True),
        sa.Column("original_value", sa.Float(), nullable=True),
        sa.Column("original_unit", sa.String(length=32), nullable=True),
        sa.Column("value_text", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("abnormal_flag", sa.String(length=8), nullable=True),
        sa.Column("flags", sa.String(length=256), nullable=False),
        sa.Column("effective_time", T, nullable=False),
        sa.Column("specimen_collected_time", T, nullable=True),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint(
            "institution_id", "category", "result_id", "component", name=op.f("pk_observations")
        ),
    )
    op.create_index(
        op.f("ix_observations_regional_patient_id_effective_time"),
        "observations",
        ["regional_patient_id", "effective_time"],
    )
    op.create_index(
        op.f("ix_observations_regional_patient_id_loinc_code_effective_time"),
        "observations",
        ["regional_patient_id", "loinc_code", "effective_time"],
    )


def _old_observations() -> None:
    op.create_table(
        "observations",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("source_system", sa.String(length=64), nullable=False),
        sa.Column("result_id", sa.String(length=128), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=True),
        sa.Column("local_code", sa.String(length=64), nullable=False),
        sa.Column("loinc_code", sa.String(length=16), nullable=True),
        sa.Column("analyte", sa.String(length=128), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("unit", sa.String(length=32), nullable=True),
        sa.Column("original_value", sa.Float(), nullable=True),
        sa.Column("original_unit", sa.String(length=32), nullable=True),
        sa.Column("value_text", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("abnormal_flag", sa.String(length=8), nullable=True),
        sa.Column("flags", sa.String(length=128), nullable=False),
        sa.Column("result_time", T, nullable=False),
        sa.Column("event_time", T, nullable=False),
        sa.Column("specimen_collected_time", T, nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_observations")),
    )
    op.create_index(
        op.f("ix_observations_institution_id_result_id"), "observations", ["institution_id", "result_id"]
    )
    op.create_index(
        op.f("ix_observations_regional_patient_id_result_time"),
        "observations",
        ["regional_patient_id", "result_time"],
    )


def _set_aside_observations(indexes: list[str], saved: str) -> None:
    """Rename observations out of the way; index and primary-key names are global, so free them too."""
    for name in indexes:
        op.drop_index(name, table_name="observations")
    op.rename_table("observations", saved)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {saved} RENAME CONSTRAINT pk_observations TO pk_{saved}")


def _alert_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("ward", sa.String(length=64), nullable=True),
        sa.Column("previous_value", sa.Float(), nullable=True),
        sa.Column("previous_time", T, nullable=True),
        sa.Column("suppressed_repeats", sa.Integer(), server_default="0", nullable=False),
        sa.Column("escalation_level", sa.Integer(), server_default="0", nullable=False),
        sa.Column("escalated_time", T, nullable=True),
        sa.Column("escalation_recipient", sa.String(length=128), nullable=True),
        sa.Column("next_deadline_time", T, nullable=True),
        sa.Column("acknowledged_time", T, nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=True),
        sa.Column("ack_channel", sa.String(length=16), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("birth_year", sa.Integer(), nullable=True),
        sa.Column("sex", sa.String(length=16), nullable=True),
        sa.Column("demographics_time", T, nullable=True),
        sa.Column("created_time", T, nullable=False),
        sa.PrimaryKeyConstraint("regional_patient_id", name=op.f("pk_patients")),
    )
    op.create_table(
        "identifier_links",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("patient_mrn", sa.String(length=64), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("linked_time", T, nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("institution_id", "patient_mrn", name=op.f("pk_identifier_links")),
    )
    op.create_index(
        op.f("ix_identifier_links_regional_patient_id"), "identifier_links", ["regional_patient_id"]
    )
    op.create_table(
        "patient_aliases",
        sa.Column("alias_id", sa.String(length=40), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("linked_time", T, nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("alias_id", name=op.f("pk_patient_aliases")),
    )
    op.create_index(
        op.f("ix_patient_aliases_regional_patient_id"), "patient_aliases", ["regional_patient_id"]
    )
    op.create_table(
        "ingest_log",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=True),
        sa.Column("event_time", T, nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_ingest_log")),
    )
    op.create_table(
        "encounters",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_time", T, nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("encounter_class", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("last_event_type", sa.String(length=16), nullable=False),
        sa.Column("ward", sa.String(length=64), nullable=True),
        sa.Column("bed", sa.String(length=64), nullable=True),
        sa.Column("attending_clinician", sa.String(length=64), nullable=True),
        sa.Column("occurred_time", T, nullable=False),
        sa.Column("admit_time", T, nullable=True),
        sa.Column("discharge_time", T, nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("institution_id", "encounter_id", name=op.f("pk_encounters")),
    )
    op.create_index(op.f("ix_encounters_regional_patient_id"), "encounters", ["regional_patient_id"])
    op.create_table(
        "encounter_events",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("event_type", sa.String(length=16), nullable=False),
        sa.Column("encounter_class", sa.String(length=16), nullable=False),
        sa.Column("ward", sa.String(length=64), nullable=True),
        sa.Column("bed", sa.String(length=64), nullable=True),
        sa.Column("prior_ward", sa.String(length=64), nullable=True),
        sa.Column("prior_bed", sa.String(length=64), nullable=True),
        sa.Column("attending_clinician", sa.String(length=64), nullable=True),
        sa.Column("occurred_time", T, nullable=False),
        sa.Column("admit_time", T, nullable=True),
        sa.Column("discharge_time", T, nullable=True),
        sa.Column("event_time", T, nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_encounter_events")),
    )
    op.create_index(
        op.f("ix_encounter_events_institution_id_encounter_id"),
        "encounter_events",
        ["institution_id", "encounter_id"],
    )
    op.create_index(
        op.f("ix_encounter_events_regional_patient_id_occurred_time"),
        "encounter_events",
        ["regional_patient_id", "occurred_time"],
    )
    op.create_table(
        "medication_orders",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_time", T, nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=True),
        sa.Column("drug_code", sa.String(length=64), nullable=False),
        sa.Column("drug_code_system", sa.String(length=64), nullable=True),
        sa.Column("drug_display", sa.Text(), nullable=True),
        sa.Column("regional_drug_code", sa.String(length=64), nullable=True),
        sa.Column("dose_value", sa.Float(), nullable=True),
        sa.Column("dose_unit", sa.String(length=32), nullable=True),
        sa.Column("route", sa.String(length=32), nullable=True),
        sa.Column("frequency", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("ordered_time", T, nullable=False),
        sa.Column("start_time", T, nullable=True),
        sa.Column("end_time", T, nullable=True),
        sa.Column("prescriber", sa.String(length=64), nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("institution_id", "order_id", name=op.f("pk_medication_orders")),
    )
    op.create_index(
        op.f("ix_medication_orders_regional_patient_id_ordered_time"),
        "medication_orders",
        ["regional_patient_id", "ordered_time"],
    )
    op.create_table(
        "diagnoses",
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("diagnosis_id", sa.String(length=128), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_time", T, nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("encounter_id", sa.String(length=128), nullable=True),
        sa.Column("icd10_code", sa.String(length=16), nullable=False),
        sa.Column("code_system", sa.String(length=16), nullable=False),
        sa.Column("display", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("recorded_time", T, nullable=False),
        sa.Column("clinician", sa.String(length=64), nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("institution_id", "diagnosis_id", name=op.f("pk_diagnoses")),
    )
    op.create_index(
        op.f("ix_diagnoses_regional_patient_id_recorded_time"),
        "diagnoses",
        ["regional_patient_id", "recorded_time"],
    )
    op.create_table(
        "alert_escalations",
        sa.Column("escalation_id", sa.String(length=36), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=False),
        sa.Column("institution_id", sa.String(length=32), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.String(length=128), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("escalated_time", T, nullable=False),
        sa.Column("next_deadline_time", T, nullable=False),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("escalation_id", name=op.f("pk_alert_escalations")),
    )
    op.create_index(op.f("ix_alert_escalations_alert_id"), "alert_escalations", ["alert_id"])
    op.create_table(
        "alert_acknowledgements",
        sa.Column("ack_id", sa.String(length=36), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("regional_patient_id", sa.String(length=40), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=64), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("read_back", sa.Boolean(), nullable=False),
        sa.Column("acknowledged_time", T, nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("ingested_time", T, nullable=False),
        sa.PrimaryKeyConstraint("ack_id", name=op.f("pk_alert_acknowledgements")),
    )
    op.create_index(op.f("ix_alert_acknowledgements_alert_id"), "alert_acknowledgements", ["alert_id"])

    with op.batch_alter_table("alerts") as batch_op:
        for column in _alert_columns():
            batch_op.add_column(column)
        batch_op.drop_index(batch_op.f("ix_alerts_published_time"))
        batch_op.drop_column("published_time")

    _set_aside_observations(
        ["ix_observations_institution_id_result_id", "ix_observations_regional_patient_id_result_time"],
        "observations_0001",
    )
    _new_observations()
    # The latest version of each 0001 result (0001 stored every version as its own row).
    op.execute(
        """
        INSERT INTO observations (
            institution_id, category, result_id, component, event_id, event_time, source_system,
            correlation_id, regional_patient_id, encounter_id, local_code, loinc_code, analyte, value,
            unit, original_value, original_unit, value_text, status, abnormal_flag, flags,
            effective_time, specimen_collected_time, device_id, ingested_time)
        SELECT o.institution_id, 'laboratory', o.result_id, '', o.event_id, o.event_time,
            o.source_system, NULL, o.regional_patient_id, o.encounter_id, o.local_code, o.loinc_code,
            o.analyte, o.value, o.unit, o.original_value, o.original_unit, o.value_text, o.status,
            o.abnormal_flag, o.flags, o.result_time, o.specimen_collected_time, NULL, o.ingested_time
        FROM observations_0001 o
        WHERE NOT EXISTS (
            SELECT 1 FROM observations_0001 n
            WHERE n.institution_id = o.institution_id AND n.result_id = o.result_id
              AND (n.event_time > o.event_time OR (n.event_time = o.event_time AND n.event_id > o.event_id)))
        """
    )
    op.execute(
        """
        INSERT INTO ingest_log (event_id, kind, institution_id, event_time, ingested_time)
        SELECT event_id, 'lab', institution_id, event_time, ingested_time FROM observations_0001
        """
    )
    op.execute(
        """
        INSERT INTO patients (regional_patient_id, birth_year, sex, demographics_time, created_time)
        SELECT regional_patient_id, NULL, NULL, NULL, MIN(ingested_time)
        FROM observations_0001 GROUP BY regional_patient_id
        """
    )
    op.drop_table("observations_0001")


def downgrade() -> None:
    """Back to 0001: lab rows keep their latest version; vitals and the new tables are dropped."""
    _set_aside_observations(
        [
            "ix_observations_regional_patient_id_effective_time",
            "ix_observations_regional_patient_id_loinc_code_effective_time",
        ],
        "observations_0002",
    )
    _old_observations()
    op.execute(
        """
        INSERT INTO observations (
            event_id, institution_id, source_system, result_id, regional_patient_id, encounter_id,
            local_code, loinc_code, analyte, value, unit, original_value, original_unit, value_text,
            status, abnormal_flag, flags, result_time, event_time, specimen_collected_time, ingested_time)
        SELECT event_id, institution_id, source_system, result_id, regional_patient_id, encounter_id,
            local_code, loinc_code, analyte, value, unit, original_value, original_unit, value_text,
            status, abnormal_flag, flags, effective_time, event_time, specimen_collected_time, ingested_time
        FROM observations_0002 WHERE category = 'laboratory'
        """
    )
    op.drop_table("observations_0002")
    with op.batch_alter_table("alerts") as batch_op:
        for column in reversed(_alert_columns()):
            batch_op.drop_column(column.name)
        batch_op.add_column(sa.Column("published_time", T, nullable=True))
        batch_op.create_index(batch_op.f("ix_alerts_published_time"), ["published_time"])
    op.execute("UPDATE alerts SET published_time = raised_time")
    for table in (
        "alert_acknowledgements",
        "alert_escalations",
        "diagnoses",
        "medication_orders",
        "encounter_events",
        "encounters",
        "ingest_log",
        "patient_aliases",
        "identifier_links",
        "patients",
    ):
        op.drop_table(table)  # their indexes go with them
