"""Why an event was rejected; every rejection becomes a dead-letter record carrying these fields."""

from __future__ import annotations

from core.exceptions import HubError, ServiceUnavailableError


class StreamError(HubError):
    """Root of this package's errors."""


class RejectedEvent(StreamError):
    """The event cannot be accepted as it is. `field` names the field, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownUnitError(RejectedEvent):
    """The unit is not one we know how to convert for this analyte: rejected, never guessed."""


class ImplausibleValueError(RejectedEvent):
    """The value is outside what is physiologically possible: a data error, not a critical result."""


class ImplausibleTimeError(RejectedEvent):
    """A time far in the future or before 1900."""


class ReferenceDataError(StreamError):
    """A terminology, unit or rule file is malformed; the processor refuses to start."""


class OutputDeliveryError(StreamError, ServiceUnavailableError):
    """The broker refused (or timed out) some of a batch's outputs; the batch is retried, not acked."""

    def __init__(self, topic: str, reason: str, failed: int) -> None:
        super().__init__(f"{failed} output message(s) not delivered, first to {topic}: {reason}")
        self.topic = topic
        self.reason = reason
        self.failed = failed


class ChangelogDeliveryError(StreamError, ServiceUnavailableError):
    """The broker refused (or timed out) some table changelog records; they are sent again with their
    keys' current values, and the batch waiting for them is retried, not acked."""

    def __init__(self, topic: str, reason: str, failed: int) -> None:
        super().__init__(f"{failed} changelog record(s) not delivered, first to {topic}: {reason}")
        self.topic = topic
        self.reason = reason
        self.failed = failed


class StageFailedError(StreamError):
    """A stage met an error that is neither bad input nor an unavailable service: a bug of the hub.

    After a bounded number of attempts the stage stops and reports itself unhealthy; its batch stays
    unacknowledged, so the events wait in Kafka until the fix and are processed after the restart.
    """

    def __init__(self, stage: str, doing: str, attempts: int, cause: BaseException) -> None:
        super().__init__(f"stage {stage}: {doing} failed {attempts} times: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.doing = doing
        self.attempts = attempts
        self.cause = cause
