"""Who may do what in the regional store on PostgreSQL: one role per component, least privilege.

The owner role runs the migrations and owns every table, so only it can alter the schema. The store stage
writes the clinical tables; the console reads them and writes only its own (accounts, sessions, the audit
log, notification deliveries); acknowledgements reach the store through Kafka, never from the console.
No application role may update, delete or truncate an audit row (and a trigger refuses it even to the
owner). SQLite, the embedded store, has no roles: these apply to PostgreSQL only.
"""

from __future__ import annotations

from collections.abc import Mapping

OWNER = "clinhub_owner"
STORE = "clinhub_store"
CONSOLE = "clinhub_console"

READ = ("SELECT",)
WRITE = ("SELECT", "INSERT", "UPDATE")

CLINICAL_TABLES = (
    "observations",
    "patients",
    "identifier_links",
    "patient_aliases",
    "patient_names",
    "ingest_log",
    "encounters",
    "encounter_events",
    "medication_orders",
    "diagnoses",
    "alerts",
    "alert_escalations",
    "alert_acknowledgements",
    "alert_history",
    "dead_letters",
)
CONSOLE_TABLES = (
    "console_users",
    "console_sessions",
    "audit_log",
    "notification_deliveries",
    "notification_attempts",
)
AUDIT_TABLE = "audit_log"
# Both roles check the schema's revision before they start (sinks.store.ensure_current)
VERSION_TABLE = "alembic_version"

# role -> table -> privileges. A table missing from a role's map is out of its reach.
PRIVILEGES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    STORE: {
        **dict.fromkeys(CLINICAL_TABLES, WRITE),
        # a merge of two regional ids removes the alias rows it folds (sinks/sql.py)
        "patient_aliases": (*WRITE, "DELETE"),
        VERSION_TABLE: READ,
    },
    CONSOLE: {
        **dict.fromkeys(CLINICAL_TABLES, READ),
        "console_users": WRITE,
        # a logout, a password change or a disabled account ends sessions
        "console_sessions": (*WRITE, "DELETE"),
        AUDIT_TABLE: ("SELECT", "INSERT"),
        "notification_deliveries": WRITE,
        "notification_attempts": WRITE,
        VERSION_TABLE: READ,
    },
}
APPLICATION_ROLES = tuple(PRIVILEGES)
# role -> its privileges on the database itself. The store writes its batches through temporary staging
# tables of its own session (sinks.staging: COPY, then INSERT ... SELECT), which takes TEMPORARY.
DATABASE_PRIVILEGES: Mapping[str, tuple[str, ...]] = {
    STORE: ("CONNECT", "TEMPORARY"),
    CONSOLE: ("CONNECT",),
}


def database_grant_statements(role: str, database: str) -> list[str]:
    """GRANT statements giving `role` exactly its privileges on `database` (after a REVOKE ALL)."""
    return [
        f'REVOKE ALL ON DATABASE "{database}" FROM "{role}"',
        f'GRANT {", ".join(DATABASE_PRIVILEGES[role])} ON DATABASE "{database}" TO "{role}"',
    ]


def grant_statements(role: str, tables: Mapping[str, tuple[str, ...]]) -> list[str]:
    """GRANT statements giving `role` exactly `tables`' privileges (after a REVOKE ALL of everything)."""
    statements = [f'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{role}"']
    statements += [
        f'GRANT {", ".join(privileges)} ON TABLE "{table}" TO "{role}"'
        for table, privileges in sorted(tables.items())
    ]
    return statements
