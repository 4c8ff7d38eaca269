"""The root of every error the hub raises on purpose."""

from __future__ import annotations


class HubError(Exception):
    """Root exception: every package's own errors derive from it, so callers can catch one type."""


class ConfigurationError(HubError):
    """A setting is missing or has a value the hub cannot use."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason


class ServiceUnavailableError(HubError):
    """A service the hub depends on (broker, registry, database) cannot do its part right now.

    Whatever raised it is retried, without limit, with back-off: waiting loses nothing, since the input
    stays unacknowledged in Kafka. Any other exception in a stage is a bug and is not retried for ever.
    """

    retry_after: float = 1.0
