"""Telling the broker's refusals from outages in what Kafka clients report, by error name or number
(no client imported here).

librdkafka reports a refused password only to the client's `error_cb`, then keeps retrying, so a
producer's messages would wait for their delivery timeout and a consumer would see nothing. `ClientErrors`
is that callback: it remembers the refusal so that callers fail within seconds with a typed error.
aiokafka (Faust's client) raises error classes of its own, told apart by Kafka's error numbers
(`refusal_in` reads either client's errors).

A refusal is not an outage: retrying changes nothing until an operator acts. An authorisation refusal
counts at once (the broker authenticated the principal, then its ACLs said no). For a client that runs
for long, an authentication refusal counts only once it has lasted (`ClientErrors(patience=...)`): a
broker that has just started may refuse a password for a moment, before it has loaded its SCRAM
credentials, and a broker restart must not stop a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
# Kafka's error numbers, which aiokafka's error classes carry as `errno` (aiokafka/errors.py)
AUTHORIZATION_CODES = {
    29: "TOPIC_AUTHORIZATION_FAILED",
    30: "GROUP_AUTHORIZATION_FAILED",
    31: "CLUSTER_AUTHORIZATION_FAILED",
    53: "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
}
SASL_AUTHENTICATION_FAILED = 58
# aiokafka's own refusal of the broker's SCRAM answer (no Kafka error number)
AUTHENTICATION_CLASSES = frozenset({"AuthenticationFailedError"})


def error_name(error: Any) -> str:
    name = getattr(error, "name", None)
    return str(name()) if callable(name) else ""


def refusal(
    error: Any, principal: str | None, topic: str | None = None, group: str | None = None
) -> KafkaAccessError | None:
    """The typed error for a librdkafka error that is a refusal of the principal; None otherwise.
    A refused group is named instead of the topic when it is known."""
    name = error_name(error)
    text = error.str() if hasattr(error, "str") else str(error)
    if name in AUTHENTICATION:
        return KafkaAuthenticationError(principal, text, topic)
    if name == "GROUP_AUTHORIZATION_FAILED" and group is not None:
        return KafkaAuthorizationError(principal, text, group=group)
    if name in AUTHORIZATION:
        return KafkaAuthorizationError(principal, text, topic)
    return None


def _named(value: Any) -> str:
    if isinstance(value, set | frozenset | list | tuple):
        return ", ".join(sorted(str(item) for item in value))
    return str(value)


def _aiokafka_refusal(
    exc: BaseException, principal: str | None, topic: str | None, group: str | None
) -> KafkaAccessError | None:
    code = getattr(type(exc), "errno", None)
    what = _named(exc.args[0]) if exc.args else None
    if code == SASL_AUTHENTICATION_FAILED or type(exc).__name__ in AUTHENTICATION_CLASSES:
        detail = f": {what}" if what else ""
        return KafkaAuthenticationError(principal, f"SASL_AUTHENTICATION_FAILED{detail}", topic)
    if code not in AUTHORIZATION_CODES:
        return None
    reason = AUTHORIZATION_CODES[code]
    if code == 29:  # the topics refused
        return KafkaAuthorizationError(principal, reason, what or topic)
    if code == 30:  # the group refused
        return KafkaAuthorizationError(principal, reason, group=what or group)
    return KafkaAuthorizationError(principal, f"{reason} ({what})" if what else reason, topic)


def refusal_in(
    exc: BaseException | None, principal: str | None, topic: str | None = None, group: str | None = None
) -> KafkaAccessError | None:
    """The typed refusal that `exc` is, or was caused by (`raise ... from`), whichever client raised it:
    the hub's own, librdkafka's `KafkaException` or one of aiokafka's errors. None for anything else (an
    outage, a bug). `topic` and `group` name what was asked for when the error itself does not say."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KafkaAccessError):
            return exc
        if exc.args and callable(getattr(exc.args[0], "name", None)):  # librdkafka's KafkaError inside
            found = refusal(exc.args[0], principal, topic, group)
        else:
            found = _aiokafka_refusal(exc, principal, topic, group)
        if found is not None:
            return found
        exc = exc.__cause__
    return None


class ClientErrors:
    """A librdkafka `error_cb` that remembers a refusal of the principal (never the password).

    With `patience` 0 (a client's first connection: the SDK, a gateway, a worker's start-up check) a
    refusal counts at once, and the first is logged at ERROR. With `patience` (the clients of a running
    worker, which share one) an authentication refusal counts once refusals have gone on for `patience`
    seconds, each within twice that of the one before, with no `succeeded()` between; the start of such
    a run is logged once at WARNING and the caller says what it does when it counts. An authorisation
    refusal counts at once either way. A refusal that counted stays.
    """

    def __init__(
        self, principal: str | None, patience: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.principal = principal
        self.patience = patience
        self._clock = clock
        self._refused: KafkaAccessError | None = None
        self._since: float | None = None  # first authentication refusal of the current run
        self._last: float | None = None  # the latest one
        self._lock = threading.Lock()

    def __call__(self, error: Any) -> None:
        refused = refusal(error, self.principal)
        if refused is not None:
            self.observe(refused)

    def observe(self, refused: KafkaAccessError) -> None:
        """A refusal any client of this principal met (librdkafka's error callback, or a caller)."""
        now = self._clock()
        waits = self.patience > 0 and isinstance(refused, KafkaAuthenticationError)
        with self._lock:
            starts_run = waits and (self._last is None or now - self._last > 2 * self.patience)
            if starts_run:
                self._since = now
            if waits:
                self._last = now
            counts = not waits or (self._since is not None and now - self._since >= self.patience)
            first = counts and self._refused is None
            if counts:
                self._refused = refused
        if starts_run:
            log.warning("%s; a worker stops if this lasts %.0fs", refused, self.patience)
        elif first and self.patience == 0:
            log.error("%s", refused)

    def succeeded(self) -> None:
        """A new connection of this principal authenticated: an authentication run so far was transient."""
        with self._lock:
            self._since = self._last = None

    @property
    def refused(self) -> KafkaAccessError | None:
        with self._lock:
            return self._refused

    def raise_if_refused(self) -> None:
        refused = self.refused
        if refused is not None:
            raise refused
