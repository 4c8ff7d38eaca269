"""Telling the broker's refusals from outages in librdkafka's reports, by error name (no client here).

librdkafka reports a refused password only to the client's `error_cb`, then keeps retrying, so a
producer's messages would wait for their delivery timeout and a consumer would see nothing. `ClientErrors`
is that callback: it remembers the refusal so that callers fail within seconds with a typed error.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.exceptions import KafkaAccessError, KafkaAuthenticationError, KafkaAuthorizationError

log = logging.getLogger("clinhub.kafka")

AUTHENTICATION = frozenset({"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED"})
AUTHORIZATION = frozenset(
    {
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    }
)


def error_name(error: Any) -> str:
    name = getattr(error, "name", None)
    return str(name()) if callable(name) else ""


def refusal(error: Any, principal: str | None, topic: str | None = None) -> KafkaAccessError | None:
    """The typed error for a librdkafka error that is a refusal of the principal; None otherwise."""
    name = error_name(error)
    text = error.str() if hasattr(error, "str") else str(error)
    if name in AUTHENTICATION:
        return KafkaAuthenticationError(principal, text, topic)
    if name in AUTHORIZATION:
        return KafkaAuthorizationError(principal, text, topic)
    return None


class ClientErrors:
    """A librdkafka `error_cb` that remembers a refused authentication (once logged, never the password)."""

    def __init__(self, principal: str | None) -> None:
        self.principal = principal
        self._refused: KafkaAccessError | None = None
        self._lock = threading.Lock()

    def __call__(self, error: Any) -> None:
        refused = refusal(error, self.principal)
        if refused is None:
            return
        with self._lock:
            first = self._refused is None
            self._refused = refused
        if first:
            log.error("%s", refused)

    @property
    def refused(self) -> KafkaAccessError | None:
        with self._lock:
            return self._refused

    def raise_if_refused(self) -> None:
        refused = self.refused
        if refused is not None:
            raise refused
