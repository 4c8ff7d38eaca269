"""Errors of the regional store."""

from __future__ import annotations

from core.exceptions import AccessDeniedError, HubError, ServiceUnavailableError


class SinkError(HubError):
    """Root of this package's errors."""


class StoreUnavailableError(SinkError, ServiceUnavailableError):
    """The database cannot be reached or refused the transaction for a transient reason; retry later."""

    def __init__(self, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class StoreRejectedError(SinkError):
    """The database refused the data itself (constraint, length, type); retrying the same rows cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreAccessError(SinkError, AccessDeniedError):
    """The database refused this component's role: a wrong password, or a privilege it lacks. Neither
    the data's fault (no dead letter) nor transient (no silent retry): the stage stops and says so."""

    def __init__(self, role: str | None, reason: str) -> None:
        super().__init__(f"the database refused role {role or '(unnamed)'}: {reason}")
        self.role = role
        self.reason = reason


class StoreOutOfDateError(SinkError):
    """The database schema is behind the code; the hub refuses to start until it is upgraded."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"database schema is at revision {current or '(empty)'}, the code needs {head}; "
            "run `clinhub db upgrade` to migrate it"
        )
        self.current = current
        self.head = head
