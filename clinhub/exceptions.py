"""Errors of the command line and the local services it starts."""

from __future__ import annotations

from core.exceptions import HubError


class ServiceError(HubError):
    """A local service (Kafka, registry, PostgreSQL) could not be installed, started or reached."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason
