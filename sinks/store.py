"""Engine factory and schema migrations (Alembic) for the regional store."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from core.settings import DatabaseSettings
from sinks.exceptions import StoreAccessError, StoreOutOfDateError
from sinks.privileges import PRIVILEGES, database_grant_statements, grant_statements
from sinks.sql import access_refused

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str | URL, echo: bool = False) -> Engine:
    """One engine per process; SQLite gets WAL and a busy timeout so readers never block the sink."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        path = url.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=5)


def connection_url(database: DatabaseSettings) -> URL:
    """The URL with the settings' user, password and TLS (a user or sslmode in the URL itself wins)."""
    url = make_url(database.url.get_secret_value())
    if url.get_backend_name() != "postgresql":
        return url
    if url.username is None and database.username is not None:
        password = database.secret_password()
        url = url.set(username=database.username, password=password.get_secret_value() if password else None)
    query = dict(url.query)
    query.setdefault("sslmode", database.ssl_mode)
    if database.ssl_ca_location is not None and database.ssl_mode != "disable":
        query.setdefault("sslrootcert", str(database.ssl_ca_location))
    return url.set(query=query)


def engine_for(database: DatabaseSettings) -> Engine:
    """The engine of one component, connecting as the role its settings name."""
    return make_engine(connection_url(database), database.echo)


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None  # noqa: S101 - the repository always ships at least one migration
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate, then (PostgreSQL) give each application role that exists exactly its privileges."""
    command.upgrade(alembic_config(engine), revision)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            apply_privileges(connection)


def apply_privileges(connection: Connection) -> list[str]:
    """Run as the owner after each migration, so new tables get their grants; returns the roles granted.
    Nobody else may create in the schema or connect to the database."""
    database = connection.execute(text("SELECT current_database()")).scalar_one()
    existing = set(connection.execute(text("SELECT rolname FROM pg_roles")).scalars())
    # an upgrade to an earlier revision has fewer tables
    present = set(
        connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
    )
    connection.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    connection.execute(text(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC'))
    granted = []
    for role, tables in PRIVILEGES.items():
        if role not in existing:
            logger.warning("database role %s does not exist: its component cannot connect as itself", role)
            continue
        for statement in database_grant_statements(role, database):
            connection.execute(text(statement))
        connection.execute(text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
        connection.execute(text(f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM "{role}"'))
        tables = {table: privileges for table, privileges in tables.items() if table in present}
        for statement in grant_statements(role, tables):
            connection.execute(text(statement))
        for table, privileges in tables.items():
            if "INSERT" in privileges:
                for sequence in _sequences_of(connection, table):
                    connection.execute(text(f'GRANT USAGE ON SEQUENCE "{sequence}" TO "{role}"'))
        granted.append(role)
    return granted


def _sequences_of(connection: Connection, table: str) -> list[str]:
    """The sequences feeding the table's serial or identity columns."""
    return list(
        connection.execute(
            text(
                "SELECT s.relname FROM pg_class s JOIN pg_depend d ON d.objid = s.oid "
                "JOIN pg_class t ON d.refobjid = t.oid "
                "WHERE s.relkind = 'S' AND t.relname = :table AND d.deptype IN ('a', 'i')"
            ),
            {"table": table},
        ).scalars()
    )


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)


def ensure_current(engine: Engine) -> None:
    """Refuse to run against a database whose schema is behind (or ahead of) the code, or that refuses
    this component's role (the first connection a component makes)."""
    try:
        current = current_revision(engine)
    except DBAPIError as exc:
        if access_refused(exc):
            orig = " ".join(str(exc.orig).split())
            raise StoreAccessError(engine.url.username, orig) from exc
        raise
    head = head_revision()
    if current != head:
        raise StoreOutOfDateError(current, head)
