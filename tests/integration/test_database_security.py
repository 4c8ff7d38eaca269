"""The regional store on the real, secured PostgreSQL: TLS and scram-sha-256 only, one role per component
with least privilege, the audit log append-only for every application role."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from clinhub.infra import postgres
from clinhub.infra.tls import ensure_ca
from core.settings import DatabaseSettings
from sinks.exceptions import StoreAccessError, StoreRejectedError, StoreUnavailableError
from sinks.privileges import CONSOLE, OWNER, STORE
from sinks.sql import SqlStoreSink
from sinks.store import engine_for, ensure_current, upgrade
from tests.integration.conftest import HubEnv
from tests.integration.test_credential_loss import publish_lab
from tests.integration.test_lab_path import rows_for, wait_for
from tests.unit.sinks.factory import realistic_batch

pytestmark = pytest.mark.integration


@pytest.fixture
def database(postgres_cluster: postgres.PostgresLayout) -> Iterator[DatabaseSettings]:
    """A migrated database of its own, the owner's settings (with every role's secrets beside them)."""
    settings = postgres.create_database(postgres_cluster, f"sec_{uuid.uuid4().hex[:12]}")
    owner = engine_for(settings)
    upgrade(owner)
    owner.dispose()
    yield settings


def connect(settings: DatabaseSettings) -> Iterator[Engine]:
    engine = engine_for(settings)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def owner(database: DatabaseSettings) -> Iterator[Engine]:
    yield from connect(database)


@pytest.fixture
def store(database: DatabaseSettings) -> Iterator[Engine]:
    yield from connect(database.for_role(STORE))


@pytest.fixture
def console(database: DatabaseSettings) -> Iterator[Engine]:
    yield from connect(database.for_role(CONSOLE))


def refused(engine: Engine, statement: str, params: dict[str, object] | None = None) -> str:
    """The server's refusal of `statement` (it must be refused)."""
    with pytest.raises(DBAPIError) as error, engine.begin() as connection:
        connection.execute(text(statement), params or {})
    return str(error.value.orig)


def add_audit_row(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_log (time, username, action, outcome) "
                "VALUES (:time, 'dr.test', 'login', 'ok')"
            ),
            {"time": dt.datetime.now(dt.UTC)},
        )


def test_each_component_connects_as_its_own_role_and_none_is_a_superuser(
    owner: Engine, store: Engine, console: Engine
) -> None:
    for engine, role in ((owner, OWNER), (store, STORE), (console, CONSOLE)):
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_user")).scalar_one() == role
            superuser = connection.execute(
                text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            ).scalar_one()
            assert superuser is False, role
            assert connection.execute(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ).scalar_one()
    ensure_current(store)  # both check the schema revision before they start
    ensure_current(console)


def test_a_connection_without_tls_is_refused(database: DatabaseSettings) -> None:
    plain = database.model_copy(update={"ssl_mode": "disable"})
    engine = engine_for(plain)
    try:
        with pytest.raises(OperationalError) as error, engine.connect():
            pass
        assert "no encryption" in str(error.value.orig) or "pg_hba.conf rejects" in str(error.value.orig)
    finally:
        engine.dispose()


def test_a_wrong_password_is_refused(database: DatabaseSettings) -> None:
    wrong = database.for_role(STORE).model_copy(
        update={"password": SecretStr("not-the-password"), "password_file": None}
    )
    engine = engine_for(wrong)
    try:
        with pytest.raises(OperationalError) as error, engine.connect():
            pass
        assert "password authentication failed" in str(error.value.orig)
        assert "not-the-password" not in str(error.value)
    finally:
        engine.dispose()


def test_a_server_certificate_from_another_ca_is_refused(database: DatabaseSettings, tmp_path: Path) -> None:
    other_ca = ensure_ca(tmp_path / "other-ca", name="someone else's CA")
    engine = engine_for(database.model_copy(update={"ssl_ca_location": other_ca.cert}))
    try:
        with pytest.raises(OperationalError) as error, engine.connect():
            pass
        assert "certificate verify failed" in str(error.value.orig)
    finally:
        engine.dispose()


def test_the_store_role_cannot_alter_the_schema_or_delete_audit_rows(owner: Engine, store: Engine) -> None:
    add_audit_row(owner)
    assert "must be owner" in refused(store, "ALTER TABLE observations ADD COLUMN extra text")
    assert "must be owner" in refused(store, "DROP TABLE alerts")
    assert "permission denied for schema public" in refused(store, "CREATE TABLE mine (x int)")
    assert "permission denied for table audit_log" in refused(store, "DELETE FROM audit_log")
    assert "permission denied for table audit_log" in refused(store, "UPDATE audit_log SET outcome = 'x'")
    assert "permission denied for table audit_log" in refused(store, "TRUNCATE audit_log")
    assert "permission denied for table console_users" in refused(store, "SELECT * FROM console_users")
    assert "permission denied for table observations" in refused(store, "DELETE FROM observations")
    with owner.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audit_log")).scalar_one() == 1


def test_the_console_writes_audit_rows_but_cannot_change_them_or_clinical_data(
    owner: Engine, console: Engine
) -> None:
    add_audit_row(console)
    assert "permission denied for table audit_log" in refused(console, "DELETE FROM audit_log")
    assert "permission denied for table audit_log" in refused(console, "UPDATE audit_log SET outcome = 'x'")
    assert "permission denied for table audit_log" in refused(console, "TRUNCATE audit_log")
    assert "permission denied for table alert_acknowledgements" in refused(
        console, "DELETE FROM alert_acknowledgements"
    )
    assert "permission denied for table observations" in refused(
        console, "UPDATE observations SET unit = 'x'"
    )
    assert "permission denied for table alerts" in refused(
        console, "INSERT INTO alerts (alert_id) VALUES ('forged')"
    )
    assert "must be owner" in refused(console, "ALTER TABLE audit_log DISABLE TRIGGER ALL")
    with console.connect() as connection:  # it reads what it shows: alerts, acknowledgements, audit
        for table in ("alerts", "alert_acknowledgements", "observations", "audit_log"):
            connection.execute(text(f"SELECT count(*) FROM {table}"))  # noqa: S608 - fixed names
    with owner.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM audit_log")).scalar_one() == 1


def test_only_the_store_may_make_temporary_tables_and_it_stages_its_batches_in_them(
    owner: Engine, store: Engine, console: Engine, database: DatabaseSettings
) -> None:
    """TEMPORARY on the database is the store's alone (sinks.privileges.DATABASE_PRIVILEGES): its batches go
    through staging tables of its session (sinks.staging). Without it the store is a refused role."""
    assert "permission denied to create temporary tables" in refused(
        console, "CREATE TEMPORARY TABLE t (x int)"
    )
    batch = realistic_batch(seed=8, count=20)
    assert SqlStoreSink(store).write_records(batch).total_written > 0

    with owner.begin() as connection:
        name = connection.execute(text("SELECT current_database()")).scalar_one()
        connection.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM "{STORE}"'))
    for fresh in connect(database.for_role(STORE)):  # a new session: the old one keeps its tables
        with pytest.raises(StoreAccessError) as error:
            SqlStoreSink(fresh).write_records(realistic_batch(seed=9, count=20))
        assert error.value.role == STORE
        assert "permission denied to create temporary tables" in error.value.reason


def test_not_even_the_owner_may_change_an_audit_row(owner: Engine) -> None:
    add_audit_row(owner)
    assert "append-only" in refused(owner, "UPDATE audit_log SET outcome = 'x'")
    assert "append-only" in refused(owner, "DELETE FROM audit_log")


def test_a_database_admits_only_the_roles_granted_on_it(postgres_cluster: postgres.PostgresLayout) -> None:
    """CONNECT is revoked from PUBLIC when a database is made; the migration grants it to the roles."""
    other = postgres.create_database(postgres_cluster, f"other_{uuid.uuid4().hex[:8]}")
    engine = engine_for(other.for_role(STORE))
    try:
        with pytest.raises(OperationalError) as error, engine.connect():
            pass
        assert "permission denied for database" in str(error.value.orig)
        owner = engine_for(other)
        upgrade(owner)
        owner.dispose()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT current_user")).scalar_one() == STORE
    finally:
        engine.dispose()


def test_granting_twice_changes_nothing_and_each_role_keeps_only_its_privileges(
    database: DatabaseSettings, owner: Engine
) -> None:
    upgrade(owner)  # a second `clinhub db upgrade` re-applies the same grants
    with owner.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee IN (:store, :console) ORDER BY 1, 2, 3"
            ),
            {"store": STORE, "console": CONSOLE},
        ).all()
    granted = {(grantee, table, privilege) for grantee, table, privilege in rows}
    assert (CONSOLE, "audit_log", "INSERT") in granted
    assert not {
        (g, t, p) for g, t, p in granted if t == "audit_log" and p in {"UPDATE", "DELETE", "TRUNCATE"}
    }
    assert not {(g, t, p) for g, t, p in granted if p in {"TRUNCATE", "REFERENCES", "TRIGGER"}}
    assert not {(g, t, p) for g, t, p in granted if g == CONSOLE and t == "observations" and p != "SELECT"}
    assert (STORE, "observations", "INSERT") in granted


def test_a_wrong_password_stops_a_component_at_start_with_a_typed_error(database: DatabaseSettings) -> None:
    wrong = database.for_role(STORE).model_copy(
        update={"password": SecretStr("not-the-password"), "password_file": None}
    )
    engine = engine_for(wrong)
    try:
        with pytest.raises(StoreAccessError) as error:
            ensure_current(engine)
        assert error.value.role == STORE
        assert "password authentication failed" in str(error.value)
        assert "not-the-password" not in str(error.value)
    finally:
        engine.dispose()


def test_a_missing_grant_is_a_refused_role_not_refused_data(owner: Engine, store: Engine) -> None:
    """Were it taken for bad data, every record would be bisected into the dead letters."""
    with owner.begin() as connection:
        connection.execute(text(f'REVOKE INSERT ON observations FROM "{STORE}"'))
    with pytest.raises(StoreAccessError) as error:
        SqlStoreSink(store).write_records(realistic_batch(seed=7, count=20))
    assert error.value.role == STORE
    assert "permission denied for table" in error.value.reason
    assert not isinstance(error.value, StoreRejectedError | StoreUnavailableError)
    with owner.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM observations")).scalar_one() == 0


def test_a_worker_whose_database_role_loses_a_grant_stops_and_loses_nothing(hub: HubEnv) -> None:
    """The store stage's writes refused (its INSERT on observations revoked while it runs): the worker
    exits non-zero naming the role, nothing dead-lettered, and once the grant is back the event is stored."""
    worker = hub.start_worker()
    first = publish_lab(hub, 4.0)
    wait_for(lambda: rows_for(hub, first) == 1, hub, 120, what="the first event stored")

    with hub.engine.begin() as connection:
        connection.execute(text(f'REVOKE INSERT ON observations FROM "{STORE}"'))
    revoked = time.monotonic()
    second = publish_lab(hub, 4.1)
    while worker.poll() is None:
        assert time.monotonic() - revoked < 60, f"still running:\n{hub.worker_log()}"
        time.sleep(0.2)
    hub.workers.remove(worker)
    log = hub.worker_log()
    assert worker.returncode != 0, log[-3000:]
    assert f"error: the database refused role {STORE}: " in log, log[-3000:]
    assert "permission denied for table observations" in log
    assert rows_for(hub, second) == 0
    assert hub.consume_all(hub.topics.deadletter_topic, 3, lambda m: False) == [], "no dead letter"

    upgrade(hub.engine)  # `clinhub db upgrade` gives every role its grants again
    hub.start_worker()
    wait_for(lambda: rows_for(hub, second) == 1, hub, 120, what="the second event stored after the restart")
    assert rows_for(hub, first) == 1
