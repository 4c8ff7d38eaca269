"""The console's errors; each carries the data a page or an API answer needs to say what went wrong."""

from __future__ import annotations

from core.exceptions import HubError


class ConsoleError(HubError):
    """Root of the console's errors."""


class AuthenticationError(ConsoleError):
    """No valid session or token, a wrong password, or a disabled account (never says which)."""

    def __init__(self, reason: str = "not signed in") -> None:
        super().__init__(reason)
        self.reason = reason


class PermissionDeniedError(ConsoleError):
    """The user may not see or do this; `what` names the resource kind, never its content."""

    def __init__(self, what: str, reason: str, audited: bool = False) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.audited = audited  # written to the audit log where it was raised


class NotFoundError(ConsoleError):
    def __init__(self, what: str, identifier: str) -> None:
        super().__init__(f"no {what} {identifier}")
        self.what = what
        self.identifier = identifier


class InvalidInputError(ConsoleError):
    """A form or API field the console cannot accept: names the field and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ReadBackMismatchError(InvalidInputError):
    """The read-back does not match the alert: the acknowledgement is not sent."""


class AlertClosedError(ConsoleError):
    """The alert is already acknowledged (by this user or anyone else): says by whom and when."""

    def __init__(self, alert_id: str, acknowledged_by: str | None, acknowledged_time: str | None) -> None:
        super().__init__(
            f"alert {alert_id} was already acknowledged by {acknowledged_by} at {acknowledged_time}"
        )
        self.alert_id = alert_id
        self.acknowledged_by = acknowledged_by
        self.acknowledged_time = acknowledged_time


class PublishFailedError(ConsoleError):
    """Kafka did not confirm the acknowledgement: nothing was acknowledged; try again."""

    def __init__(self, reason: str, retry_after: float = 5.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
