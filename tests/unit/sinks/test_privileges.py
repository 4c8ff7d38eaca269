"""The store's role map covers every table, and never lets an application role change the audit log."""

from __future__ import annotations

from sinks.models import Base
from sinks.privileges import (
    AUDIT_TABLE,
    CLINICAL_TABLES,
    CONSOLE,
    CONSOLE_TABLES,
    DATABASE_PRIVILEGES,
    PRIVILEGES,
    STORE,
    VERSION_TABLE,
    database_grant_statements,
    grant_statements,
)


def test_every_table_of_the_schema_has_a_place_in_the_role_map() -> None:
    """A new table must be sorted into clinical or console tables, or no role could use it."""
    assert set(Base.metadata.tables) == set(CLINICAL_TABLES) | set(CONSOLE_TABLES)
    for role in (STORE, CONSOLE):
        assert PRIVILEGES[role][VERSION_TABLE] == ("SELECT",)


def test_no_application_role_may_update_or_delete_audit_rows() -> None:
    for role, tables in PRIVILEGES.items():
        assert not {"UPDATE", "DELETE", "TRUNCATE"} & set(tables.get(AUDIT_TABLE, ())), role


def test_the_console_only_reads_clinical_tables_and_the_store_never_touches_console_tables() -> None:
    assert all(PRIVILEGES[CONSOLE][table] == ("SELECT",) for table in CLINICAL_TABLES)
    assert not set(PRIVILEGES[STORE]) & set(CONSOLE_TABLES)


def test_grant_statements_revoke_everything_first() -> None:
    statements = grant_statements("r", {"b": ("SELECT",), "a": ("SELECT", "INSERT")})
    assert statements == [
        'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "r"',
        'GRANT SELECT, INSERT ON TABLE "a" TO "r"',
        'GRANT SELECT ON TABLE "b" TO "r"',
    ]


def test_only_the_store_may_make_temporary_tables_and_both_roles_connect() -> None:
    """The store stages its batches in temporary tables (sinks.staging); the console has no use for one."""
    assert set(DATABASE_PRIVILEGES) == set(PRIVILEGES)
    assert DATABASE_PRIVILEGES[STORE] == ("CONNECT", "TEMPORARY")
    assert DATABASE_PRIVILEGES[CONSOLE] == ("CONNECT",)
    assert database_grant_statements(STORE, "db") == [
        'REVOKE ALL ON DATABASE "db" FROM "clinhub_store"',
        'GRANT CONNECT, TEMPORARY ON DATABASE "db" TO "clinhub_store"',
    ]
