"""Errors an institution's code sees when publishing."""

from __future__ import annotations

from core.exceptions import HubError, KafkaAccessError, ServiceUnavailableError


class PublishError(HubError):
    """Root of this package's errors."""


class DeliveryFailedError(PublishError):
    """The broker did not durably accept the event (or did not answer in time); it was not published."""

    def __init__(self, event_id: str, reason: str, retriable: bool) -> None:
        super().__init__(f"event {event_id} not delivered: {reason}")
        self.event_id = event_id
        self.reason = reason
        self.retriable = retriable


class AccessRefusedError(DeliveryFailedError):
    """The broker refused the principal (credentials, or no ACL for the topic): not published, and
    sending again changes nothing until an operator acts. `refused` names the principal and topic."""

    def __init__(self, event_id: str, refused: KafkaAccessError) -> None:
        super().__init__(event_id, str(refused), retriable=False)
        self.refused = refused
        self.principal = refused.principal
        self.topic = refused.topic


class ClusterUnreachableError(PublishError, ServiceUnavailableError):
    """`Publisher.connect` found no broker answering in time: nothing was sent; try again later."""

    def __init__(self, reason: str, timeout: float) -> None:
        super().__init__(f"no Kafka broker answered within {timeout:g}s: {reason}")
        self.reason = reason
        self.timeout = timeout
        self.retry_after = 1.0


class TransactionFailedError(PublishError):
    """A transaction of events was not committed: readers of committed data see none of them. Sending
    the same events again is safe (the hub de-duplicates on event id)."""

    def __init__(self, event_ids: list[str], reason: str) -> None:
        super().__init__(f"transaction of {len(event_ids)} event(s) not committed: {reason}")
        self.event_ids = event_ids
        self.reason = reason
        self.retriable = True


class UndeliveredOnCloseError(PublishError):
    """close() ran out of time with events still queued; they are listed so nothing goes silently."""

    def __init__(self, event_ids: list[str]) -> None:
        super().__init__(f"{len(event_ids)} event(s) still undelivered at close: {', '.join(event_ids[:10])}")
        self.event_ids = event_ids
