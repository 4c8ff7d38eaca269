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


class AccessDeniedError(HubError):
    """A service (Kafka, the database) refused this component's identity: wrong credentials, or no right
    to what it tried. Neither an outage to wait out nor bad input to dead-letter: retrying changes
    nothing until an operator acts, so the component stops and says who was refused what."""


class KafkaAccessError(AccessDeniedError):
    """The broker refused this principal: wrong credentials, or no ACL for what it tried. Retrying
    changes nothing until an operator acts, so it is reported at once, naming who and what."""

    def __init__(
        self, principal: str | None, reason: str, topic: str | None = None, group: str | None = None
    ) -> None:
        on = f" on {topic}" if topic else f" on group {group}" if group else ""
        super().__init__(f"Kafka refused principal {principal or '(none)'}{on}: {reason}")
        self.principal = principal
        self.topic = topic
        self.group = group
        self.reason = reason


class KafkaAuthenticationError(KafkaAccessError):
    """The principal's credentials were refused (librdkafka reports it only to its error callback)."""


class KafkaAuthorizationError(KafkaAccessError):
    """The principal may not do this on that topic or group (TOPIC_AUTHORIZATION_FAILED and the like)."""
