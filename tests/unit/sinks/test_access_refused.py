"""A refused role is told apart from refused data and from a database that is away for a while."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from sinks.sql import access_refused, is_transient


class DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def test_a_missing_grant_and_a_wrong_password_are_refusals() -> None:
    denied = ProgrammingError("INSERT ...", {}, DriverError("permission denied for table alerts", "42501"))
    assert access_refused(denied)
    at_connect = OperationalError(
        None, None, DriverError('failed: FATAL:  password authentication failed for user "x"', None)
    )
    assert access_refused(at_connect)
    no_entry = OperationalError(None, None, DriverError('FATAL:  no pg_hba.conf entry for host "h"', None))
    assert access_refused(no_entry)


def test_bad_data_and_a_server_going_away_are_not() -> None:
    duplicate = IntegrityError("INSERT ...", {}, DriverError("duplicate key value", "23505"))
    assert not access_refused(duplicate)
    shutdown = OperationalError(
        None, None, DriverError("FATAL:  terminating connection due to administrator command", "57P01")
    )
    assert not access_refused(shutdown)
    assert is_transient(shutdown)
    refused_port = OperationalError(None, None, DriverError("connection refused", None))
    assert not access_refused(refused_port)
