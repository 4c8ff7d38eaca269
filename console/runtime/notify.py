"""Notifications, runtime: a durable outbox in the store, the webhook and e-mail senders, and a dispatcher
that retries with back-off and records every attempt.

Why an outbox: a delivery is a row (`notification_deliveries`) before anything is sent, written in the
same transaction that accepts the Kafka batch it came from, so a crash loses none and a replay adds none
(the delivery id is derived from channel, alert, event and level). Every attempt is a row of
`notification_attempts` (outcome, status code, error text without secrets, duration).

Why it never slows the console: the dispatcher is one asyncio task; database calls run on a small thread
pool of its own, e-mail on another, webhooks on httpx's async client; each channel has its own bound of
attempts in flight and its own claim, so a channel that is down (refusing, or hanging until the timeout)
holds only its own slots while the others are delivered.

Several console processes may share one store: a delivery is claimed by moving its next attempt time
past a lease with a conditional UPDATE, so only one process attempts it at a time. A process that dies
mid-attempt leaves the lease to expire and the delivery is attempted again: receivers dedupe on the
X-Clinhub-Delivery header (the same on every retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import SecretStr
from sqlalchemy import Engine, Table, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from console.domain.notify import (
    DELIVERY_HEADER,
    ESCALATION_EVENT,
    EVENT_HEADER,
    EmailChannel,
    Notice,
    NotificationConfig,
    PlannedDelivery,
    RetryPolicy,
    WebhookChannel,
    canonical_alert_id,
    email_message,
    is_stale,
    notice_from_alert,
    notice_from_escalation,
    notice_from_payload,
    parse_notification_config,
    plan_deliveries,
    signed_headers,
    utc,
)
from console.runtime.alert_source import ALERT, AlertSource, SourceRecord, source_config
from core.contract import TopicNames
from core.exceptions import ConfigurationError
from core.settings import ConsoleSettings, KafkaSettings
from schemas.wire import ConfluentRegistry
from sinks.models import Alert, NotificationAttempt, NotificationDelivery

log = logging.getLogger("clinhub.console.notify")

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Attempt outcomes: the `outcome` label of clinhub_notification_attempts_total, a bounded set.
OUTCOME_DELIVERED = "delivered"
OUTCOME_HTTP_ERROR = "http_error"  # the receiver answered, not 2xx
OUTCOME_REFUSED = "refused"  # the SMTP server refused the message or its recipients
OUTCOME_TIMEOUT = "timeout"
OUTCOME_CONNECTION = "connection_error"  # refused, reset, unreachable, TLS
OUTCOME_ERROR = "error"  # anything else, the hub's own bugs included
OUTCOMES = (
    OUTCOME_DELIVERED,
    OUTCOME_HTTP_ERROR,
    OUTCOME_REFUSED,
    OUTCOME_TIMEOUT,
    OUTCOME_CONNECTION,
    OUTCOME_ERROR,
)
DEFAULT_MAX_NOTICE_AGE = dt.timedelta(hours=6)
ERROR_TEXT_LIMIT = 500
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

T = TypeVar("T")
Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- metrics -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotifyMetrics:
    """Labels are channel names (from the configuration, bounded), outcomes and error classes; never a
    patient, alert or delivery id."""

    attempts: Counter  # clinhub_notification_attempts_total{channel,outcome}
    failures: Counter  # clinhub_notification_failures_total{channel}: deliveries given up
    pending: Gauge  # clinhub_notification_pending{channel}: deliveries waiting (retries included)
    attempt_seconds: Histogram  # clinhub_notification_attempt_seconds{channel}
    source_errors: Counter  # clinhub_notification_source_errors_total{error}: batches not queued yet


def make_notify_metrics(registry: CollectorRegistry) -> NotifyMetrics:
    return NotifyMetrics(
        attempts=Counter(
            "clinhub_notification_attempts",
            "Notification delivery attempts, by channel and outcome.",
            ["channel", "outcome"],
            registry=registry,
        ),
        failures=Counter(
            "clinhub_notification_failures",
            "Notifications given up after the last attempt, by channel.",
            ["channel"],
            registry=registry,
        ),
        pending=Gauge(
            "clinhub_notification_pending",
            "Notifications waiting to be delivered (first attempts and retries), by channel.",
            ["channel"],
            registry=registry,
        ),
        attempt_seconds=Histogram(
            "clinhub_notification_attempt_seconds",
            "Time of one delivery attempt, by channel.",
            ["channel"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        ),
        source_errors=Counter(
            "clinhub_notification_source_errors",
            "Batches of alerts and escalations that could not be queued yet (retried), by error class.",
            ["error"],
            registry=registry,
        ),
    )


# --- the outbox --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery this process holds the lease of: attempt it, then record the attempt."""

    delivery_id: str
    channel: str
    channel_kind: str
    alert_id: str
    event: str
    payload: str
    attempts: int  # made before this one


@dataclass(frozen=True)
class Claim:
    deliveries: list[ClaimedDelivery]
    next_due: dt.datetime | None  # the earliest pending attempt of the channels that have room left
    pending: dict[str, int]  # pending deliveries per channel


@dataclass(frozen=True)
class AttemptResult:
    outcome: str
    status_code: int | None = None
    error: str | None = None  # without secrets: no URL, key or password
    retry_after: float | None = None  # a receiver's Retry-After, seconds

    @property
    def delivered(self) -> bool:
        return self.outcome == OUTCOME_DELIVERED


D = cast(Table, NotificationDelivery.__table__)
A = cast(Table, NotificationAttempt.__table__)


class Outbox:
    """The notification tables. Synchronous (call it from a thread): the dispatcher runs it on its own
    pool, the alert source on its own thread."""

    def __init__(
        self,
        engine: Engine,
        config: NotificationConfig,
        max_notice_age: dt.timedelta = DEFAULT_MAX_NOTICE_AGE,
    ) -> None:
        self.engine = engine
        self.config = config
        self.max_notice_age = max_notice_age
        dialect = engine.dialect.name
        self._insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)

    # enqueue

    def accept(self, records: Sequence[SourceRecord], now: dt.datetime) -> list[str]:
        """Queue the deliveries of a batch of alerts and escalations in one transaction; returns the ids
        queued now (none for a replay). Committed when it returns: then the batch's offsets may go."""
        with self.engine.begin() as connection:
            batch_alerts: dict[str, Notice] = {}
            planned: list[PlannedDelivery] = []
            stale = 0
            for source in records:
                if source.event == ALERT:
                    notice = notice_from_alert(source.record)
                    batch_alerts[notice.alert_id] = notice
                else:
                    alert_id = canonical_alert_id(source.record["alert_id"])
                    alert = batch_alerts.get(alert_id) or self._known_alert(connection, alert_id)
                    notice = notice_from_escalation(source.record, alert)
                if is_stale(notice, now, self.max_notice_age):
                    stale += 1
                    continue
                planned.extend(plan_deliveries(self.config, notice))
            queued = self._insert_deliveries(connection, planned, now)
        if stale:
            log.info(
                "notifications: %d alerts or escalations older than %s not notified",
                stale,
                self.max_notice_age,
            )
        return queued

    def enqueue(self, deliveries: Sequence[PlannedDelivery], now: dt.datetime) -> list[str]:
        """Queue planned deliveries; one already queued (same id) is left as it is."""
        with self.engine.begin() as connection:
            return self._insert_deliveries(connection, deliveries, now)

    def _insert_deliveries(
        self, connection: Connection, deliveries: Sequence[PlannedDelivery], now: dt.datetime
    ) -> list[str]:
        queued = []
        for delivery in deliveries:
            row = {
                "delivery_id": delivery.delivery_id,
                "channel": delivery.channel,
                "channel_kind": delivery.channel_kind,
                "alert_id": delivery.notice.alert_id,
                "institution_id": delivery.notice.institution_id,
                "ward": delivery.notice.ward,
                "severity": delivery.notice.severity,
                "event": delivery.notice.event,
                "payload": delivery.payload,
                "status": PENDING,
                "attempts": 0,
                "next_attempt_time": now,
                "created_time": now,
            }
            if self._insert is not None:
                statement = self._insert(D).values(row).on_conflict_do_nothing(index_elements=["delivery_id"])
                if connection.execute(statement).rowcount == 1:
                    queued.append(delivery.delivery_id)
            elif (
                connection.execute(
                    select(D.c.delivery_id).where(D.c.delivery_id == delivery.delivery_id)
                ).first()
                is None
            ):
                connection.execute(insert(D).values(row))
                queued.append(delivery.delivery_id)
        return queued

    def _known_alert(self, connection: Connection, alert_id: str) -> Notice | None:
        """An escalation's alert: from the store, else from a delivery made of it (the store may lag)."""
        row = connection.execute(select(Alert.__table__).where(Alert.alert_id == alert_id)).mappings().first()
        if row is not None:
            return notice_from_alert(dict(row))
        text = connection.execute(
            select(D.c.payload).where(D.c.alert_id == alert_id, D.c.event != ESCALATION_EVENT).limit(1)
        ).scalar()
        return notice_from_payload(text) if text is not None else None

    # dispatch

    def claim(self, limits: Mapping[str, int], now: dt.datetime, lease_seconds: float) -> Claim:
        """Take up to `limits[channel]` due deliveries of each channel, leased for `lease_seconds`."""
        claimed: list[ClaimedDelivery] = []
        roomy: list[str] = []
        leased_until = now + dt.timedelta(seconds=lease_seconds)
        with self.engine.begin() as connection:
            for channel, limit in limits.items():
                if limit <= 0:
                    continue
                due = connection.execute(
                    select(D)
                    .where(D.c.status == PENDING, D.c.channel == channel, D.c.next_attempt_time <= now)
                    .order_by(D.c.next_attempt_time, D.c.created_time)
                    .limit(limit)
                ).mappings()
                taken = 0
                for row in list(due):
                    won = connection.execute(
                        update(D)
                        .where(
                            D.c.delivery_id == row["delivery_id"],
                            D.c.status == PENDING,
                            D.c.next_attempt_time <= now,
                        )
                        .values(next_attempt_time=leased_until)
                    ).rowcount
                    if won == 1:
                        taken += 1
                        claimed.append(
                            ClaimedDelivery(
                                delivery_id=row["delivery_id"],
                                channel=row["channel"],
                                channel_kind=row["channel_kind"],
                                alert_id=row["alert_id"],
                                event=row["event"],
                                payload=row["payload"],
                                attempts=row["attempts"],
                            )
                        )
                if taken < limit:
                    roomy.append(channel)
            next_due = None
            if roomy:
                next_due = connection.execute(
                    select(func.min(D.c.next_attempt_time)).where(
                        D.c.status == PENDING, D.c.channel.in_(roomy)
                    )
                ).scalar()
            pending: dict[str, int] = dict(
                connection.execute(
                    select(D.c.channel, func.count()).where(D.c.status == PENDING).group_by(D.c.channel)
                ).all()
            )
        return Claim(claimed, utc(next_due) if next_due is not None else None, pending)

    def release(self, delivery_ids: Sequence[str], now: dt.datetime) -> None:
        """Give claimed deliveries back without an attempt (a stopping dispatcher)."""
        if delivery_ids:
            with self.engine.begin() as connection:
                connection.execute(
                    update(D)
                    .where(D.c.delivery_id.in_(delivery_ids), D.c.status == PENDING)
                    .values(next_attempt_time=now)
                )

    def record(
        self,
        delivery: ClaimedDelivery,
        result: AttemptResult,
        duration_ms: float,
        now: dt.datetime,
        policy: RetryPolicy,
    ) -> tuple[str, int, float | None]:
        """Record one attempt and decide what follows: (status, attempts made, seconds to the next one)."""
        with self.engine.begin() as connection:
            current = connection.execute(
                select(D.c.status, D.c.attempts).where(D.c.delivery_id == delivery.delivery_id)
            ).one()
            attempt = current.attempts + 1
            connection.execute(
                insert(A).values(
                    delivery_id=delivery.delivery_id,
                    channel=delivery.channel,
                    attempt=attempt,
                    time=now,
                    outcome=result.outcome,
                    status_code=result.status_code,
                    error=result.error,
                    duration_ms=duration_ms,
                )
            )
            if current.status != PENDING:  # finished by another process meanwhile: keep its outcome
                connection.execute(
                    update(D).where(D.c.delivery_id == delivery.delivery_id).values(attempts=attempt)
                )
                return current.status, attempt, None
            delay = None if result.delivered else policy.delay(attempt, result.retry_after)
            status = DELIVERED if result.delivered else (PENDING if delay is not None else FAILED)
            connection.execute(
                update(D)
                .where(D.c.delivery_id == delivery.delivery_id)
                .values(
                    status=status,
                    attempts=attempt,
                    next_attempt_time=now + dt.timedelta(seconds=delay) if delay is not None else None,
                    delivered_time=now if result.delivered else None,
                    last_error=None if result.delivered else result.error or result.outcome,
                )
            )
        return status, attempt, delay


# --- senders -----------------------------------------------------------------------------------------------


class Sender(Protocol):
    async def send(self, delivery: ClaimedDelivery) -> AttemptResult: ...

    async def aclose(self) -> None: ...


def _scrubbed(text: str, *secrets: str | None) -> str:
    """Error text fit for the outbox and the logs: the channel's URL and every secret replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text[:ERROR_TEXT_LIMIT]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the back-off decides


class WebhookSender:
    """POST of the payload, signed per attempt; 2xx is delivered, anything else is retried."""

    def __init__(
        self, channel: WebhookChannel, secret: bytes, timeout: float, clock: Clock = utc_now
    ) -> None:
        self.channel = channel
        self._secret = secret
        self.timeout = timeout
        self.clock = clock
        # One client per channel: its pool is its own. No redirects (a payload goes where it is configured),
        # no proxy from the environment (the URL says where).
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def send(self, delivery: ClaimedDelivery) -> AttemptResult:
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "clinhub-notify/1",
            DELIVERY_HEADER: delivery.delivery_id,
            EVENT_HEADER: delivery.event,
            **signed_headers(body, self._secret, self.clock()),
        }
        try:
            async with asyncio.timeout(self.timeout * 2):  # a receiver that trickles bytes is cut off too
                response = await self._client.post(self.channel.url, content=body, headers=headers)
        except (httpx.TimeoutException, TimeoutError) as exc:
            return AttemptResult(
                OUTCOME_TIMEOUT, error=self._error(exc) or f"no answer within {self.timeout} s"
            )
        except httpx.TransportError as exc:
            return AttemptResult(OUTCOME_CONNECTION, error=self._error(exc))
        except httpx.HTTPError as exc:
            return AttemptResult(OUTCOME_ERROR, error=self._error(exc))
        if response.is_success:
            return AttemptResult(OUTCOME_DELIVERED, status_code=response.status_code)
        return AttemptResult(
            OUTCOME_HTTP_ERROR,
            status_code=response.status_code,
            error=f"HTTP {response.status_code} {response.reason_phrase}"[:ERROR_TEXT_LIMIT],
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )

    def _error(self, exc: BaseException) -> str:
        return _scrubbed(
            f"{type(exc).__name__}: {exc}".rstrip(": "),
            self.channel.url,
            self._secret.decode(errors="ignore"),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    sender: str
    username: str | None
    password: SecretStr | None
    starttls: bool
    timeout: float

    @classmethod
    def from_settings(cls, console: ConsoleSettings) -> SmtpServer:
        return cls(
            host=console.smtp_host,
            port=console.smtp_port,
            sender=console.smtp_sender,
            username=console.smtp_username,
            password=console.smtp_password,
            starttls=console.smtp_starttls,
            timeout=console.notify_timeout_seconds,
        )


def _deliver_mail(server: SmtpServer, message: EmailMessage) -> dict[str, Any]:
    """Blocking: one SMTP session (on the e-mail thread pool); returns the recipients refused, if any."""
    with smtplib.SMTP(server.host, server.port, timeout=server.timeout) as client:
        if server.starttls:
            client.starttls(context=ssl.create_default_context())
        if server.username and server.password:
            client.login(server.username, server.password.get_secret_value())
        return dict(client.send_message(message))


class EmailSender:
    """The payload as a plain-text e-mail through the console's SMTP server, on a thread pool of its own."""

    def __init__(
        self, channel: EmailChannel, server: SmtpServer, executor: ThreadPoolExecutor, clock: Clock = utc_now
    ) -> None:
        self.channel = channel
        self.server = server
        self.executor = executor
        self.clock = clock

    async def send(self, delivery: ClaimedDelivery) -> AttemptResult:
        message = email_message(delivery.payload, self.channel.to, self.server.sender, self.clock())
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.server.timeout * 3):  # the socket timeout bounds each step
                refused = await loop.run_in_executor(self.executor, _deliver_mail, self.server, message)
        except smtplib.SMTPRecipientsRefused as exc:
            return AttemptResult(
                OUTCOME_REFUSED, error=self._error(f"every recipient refused ({len(exc.recipients)})")
            )
        except smtplib.SMTPResponseException as exc:
            return AttemptResult(
                OUTCOME_REFUSED, status_code=exc.smtp_code, error=self._error(str(exc.smtp_error))
            )
        except (TimeoutError, smtplib.SMTPServerDisconnected) as exc:
            outcome = OUTCOME_TIMEOUT if isinstance(exc, TimeoutError) else OUTCOME_CONNECTION
            return AttemptResult(outcome, error=self._error(f"{type(exc).__name__}: {exc}"))
        except smtplib.SMTPException as exc:
            return AttemptResult(OUTCOME_ERROR, error=self._error(f"{type(exc).__name__}: {exc}"))
        except OSError as exc:  # refused, unreachable, TLS
            return AttemptResult(OUTCOME_CONNECTION, error=self._error(f"{type(exc).__name__}: {exc}"))
        if refused:  # some recipients took it: delivered, and the rest said why
            return AttemptResult(
                OUTCOME_DELIVERED, status_code=250, error=self._error(f"refused: {sorted(refused)}")
            )
        return AttemptResult(OUTCOME_DELIVERED, status_code=250)

    def _error(self, text: str) -> str:
        password = self.server.password.get_secret_value() if self.server.password else None
        return _scrubbed(text, password)

    async def aclose(self) -> None:
        return None


# --- the dispatcher ----------------------------------------------------------------------------------------


class Dispatcher:
    """Claims due deliveries per channel, attempts them (at most `per_channel` at once per channel) and
    records each attempt; wakes when something is queued, an attempt ends, or the next retry is due."""

    def __init__(
        self,
        outbox: Outbox,
        senders: Mapping[str, Sender],
        policy: RetryPolicy,
        metrics: NotifyMetrics,
        *,
        timeout_seconds: float,
        per_channel: int = 4,
        poll_seconds: float = 1.0,
        clock: Clock = utc_now,
        db_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.outbox = outbox
        self.senders = dict(senders)
        self.policy = policy
        self.metrics = metrics
        self.per_channel = per_channel
        self.poll_seconds = poll_seconds
        self.lease_seconds = timeout_seconds * 3 + 30  # past the longest attempt (send + record)
        self.clock = clock
        self._db_executor = db_executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="notify-db")
        self._own_executor = db_executor is None
        self._in_flight: dict[str, set[asyncio.Task[None]]] = {name: set() for name in self.senders}
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        for name in self.senders:
            self.metrics.pending.labels(name).set(0)
            self.metrics.failures.labels(name)
            for outcome in OUTCOMES:
                self.metrics.attempts.labels(name, outcome)

    async def db(self, call: Callable[..., T], *args: Any) -> T:
        """A database call off the event loop, on the notifier's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._db_executor, call, *args)

    def wake(self) -> None:
        """Look for due deliveries now; callable from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    def in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._in_flight.values())

    async def run(self) -> None:
        """Until stop() (or cancelled); a database that is down is waited for: the rows wait too."""
        self._loop = asyncio.get_running_loop()
        outage = 0
        while not self._stopping:
            self._wake.clear()
            now = self.clock()
            limits = {name: self.per_channel - len(tasks) for name, tasks in self._in_flight.items()}
            try:
                claim = await self.db(self.outbox.claim, limits, now, self.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - the store: retried with back-off, logged once per outage
                outage += 1
                if outage == 1:
                    log.warning("notifications: cannot read the outbox (%s); retrying", type(exc).__name__)
                await self._sleep(min(self.poll_seconds * outage, 30.0))
                continue
            if outage:
                log.info("notifications: outbox readable again")
                outage = 0
            if self._stopping:  # claimed while stopping: hand them back at once rather than at lease end
                await self.db(self.outbox.release, [d.delivery_id for d in claim.deliveries], self.clock())
                break
            for name in self.senders:
                self.metrics.pending.labels(name).set(claim.pending.get(name, 0))
            for delivery in claim.deliveries:
                self._start(delivery)
            wait = self.poll_seconds
            if claim.next_due is not None:
                wait = min(wait, max((claim.next_due - self.clock()).total_seconds(), 0.01))
            await self._sleep(wait)

    def stop(self) -> None:
        """Ask run() to return after its current step; attempts in flight go on (see drain)."""
        self._stopping = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _start(self, delivery: ClaimedDelivery) -> None:
        if delivery.channel not in self.senders:  # a channel removed from the configuration
            log.warning(
                "notifications: delivery %s is for unknown channel %s", delivery.delivery_id, delivery.channel
            )
            return
        task = asyncio.create_task(self._attempt(delivery), name=f"notify-{delivery.channel}")
        tasks = self._in_flight[delivery.channel]
        tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            tasks.discard(finished)
            self._wake.set()

        task.add_done_callback(done)

    async def _attempt(self, delivery: ClaimedDelivery) -> None:
        started = time.monotonic()
        try:
            result = await self.senders[delivery.channel].send(delivery)
        except Exception as exc:
            log.exception("notifications: sender of channel %s failed", delivery.channel)
            result = AttemptResult(OUTCOME_ERROR, error=f"{type(exc).__name__} in the sender")
        seconds = time.monotonic() - started
        self.metrics.attempts.labels(delivery.channel, result.outcome).inc()
        self.metrics.attempt_seconds.labels(delivery.channel).observe(seconds)
        status, attempt, delay = await self._record(delivery, result, seconds * 1000)
        if status == FAILED:
            self.metrics.failures.labels(delivery.channel).inc()
            log.error(
                "notification %s (alert %s, %s) to channel %s given up after %d attempts: %s",
                delivery.delivery_id,
                delivery.alert_id,
                delivery.event,
                delivery.channel,
                attempt,
                result.error or result.outcome,
            )
        elif status == PENDING:
            log.warning(
                "notification %s to channel %s: attempt %d %s (%s); next in %.1f s",
                delivery.delivery_id,
                delivery.channel,
                attempt,
                result.outcome,
                result.error or result.status_code,
                delay or 0.0,
            )

    async def _record(
        self, delivery: ClaimedDelivery, result: AttemptResult, duration_ms: float
    ) -> tuple[str, int, float | None]:
        """Record the attempt, waiting out a store outage: the lease keeps the delivery meanwhile."""
        failures = 0
        while True:
            try:
                return await self.db(
                    self.outbox.record, delivery, result, duration_ms, self.clock(), self.policy
                )
            except Exception as exc:  # noqa: BLE001 - the store: retried until it answers
                failures += 1
                if failures == 1:
                    log.warning(
                        "notifications: cannot record attempt of %s (%s); retrying",
                        delivery.delivery_id,
                        type(exc).__name__,
                    )
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))

    async def drain(self, grace_seconds: float) -> None:
        """Let attempts in flight finish (and be recorded) for up to `grace_seconds`, then cancel them:
        a cancelled one keeps its lease and is attempted again after it."""
        tasks = [task for group in self._in_flight.values() for task in group]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        if self._own_executor:
            self._db_executor.shutdown(wait=False, cancel_futures=True)


# --- the notifier ------------------------------------------------------------------------------------------


@dataclass
class Notifier:
    """What the console wires in: `await start()` when it starts, `await stop()` when it stops."""

    config: NotificationConfig
    outbox: Outbox
    dispatcher: Dispatcher
    senders: Mapping[str, Sender]
    clock: Clock = utc_now
    source: AlertSource | None = None
    grace_seconds: float = 10.0
    _executors: list[ThreadPoolExecutor] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    @property
    def channels(self) -> list[str]:
        return [channel.name for channel in self.config.channels]

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the notifier is already started")
        self._task = asyncio.create_task(self.dispatcher.run(), name="console-notify-dispatcher")
        await asyncio.sleep(0)  # the dispatcher knows its loop before the source can wake it
        if self.source is not None:
            self.source.start()
        log.info("notifications: %d channels (%s)", len(self.channels), ", ".join(self.channels))

    async def stop(self) -> None:
        """Stop reading Kafka (committing what is queued), let attempts in flight finish, close senders."""
        if self.source is not None:
            await asyncio.to_thread(self.source.stop)
        if self._task is not None:
            self.dispatcher.stop()
            _done, running = await asyncio.wait([self._task], timeout=self.grace_seconds)
            for task in running:  # the store hangs: stop waiting for it
                task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.dispatcher.drain(self.grace_seconds)
        for sender in self.senders.values():
            await sender.aclose()
        self.dispatcher.close()
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """False once the dispatcher or the Kafka source has stopped on its own."""
        dispatching = self._task is not None and not self._task.done()
        return dispatching and (self.source is None or self.source.running)

    async def enqueue(self, notice: Notice) -> list[str]:
        """Queue the deliveries of one notice outside Kafka (a test, a manual resend of an alert not yet
        notified); returns the ids queued now, none when they were queued before."""
        planned = plan_deliveries(self.config, notice)
        queued = await self.dispatcher.db(self.outbox.enqueue, planned, self.clock())
        self.dispatcher.wake()
        return queued


def _read_secret(path: Path, setting: str) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigurationError(setting, f"cannot read the key file: {exc.strerror}") from exc
    if not secret:
        raise ConfigurationError(setting, "the key file is empty")
    return secret


def load_channels(console: ConsoleSettings) -> NotificationConfig | None:
    """The channels of CLINHUB_CONSOLE_NOTIFICATIONS_FILE; None when it is not set."""
    path = console.notifications_file
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError("notifications_file", f"cannot read {path}: {exc.strerror}") from exc
    try:
        return parse_notification_config(text)
    except ConfigurationError as exc:
        raise ConfigurationError(exc.setting, f"{exc.reason} (in {path})") from None


def channel_secrets(config: NotificationConfig, console: ConsoleSettings) -> dict[str, bytes]:
    """The signing key of each webhook channel: its own secret_file, else the console's webhook key. A
    webhook without a key is refused: receivers must be able to tell the hub's requests from forgeries."""
    default: bytes | None = None
    if console.webhook_secret is not None and console.webhook_secret.get_secret_value():
        default = console.webhook_secret.get_secret_value().encode()
    elif console.webhook_secret_file is not None:
        default = _read_secret(console.webhook_secret_file, "webhook_secret_file")
    secrets: dict[str, bytes] = {}
    for index, channel in enumerate(config.channels):
        if not isinstance(channel, WebhookChannel):
            continue
        if channel.secret_file is not None:
            secrets[channel.name] = _read_secret(channel.secret_file, f"channels[{index}].secret_file")
        elif default is not None:
            secrets[channel.name] = default
        else:
            raise ConfigurationError(
                f"channels[{index}].secret_file",
                f"webhook channel {channel.name} has no signing key: give it a secret_file or set "
                "CLINHUB_CONSOLE_WEBHOOK_SECRET or CLINHUB_CONSOLE_WEBHOOK_SECRET_FILE",
            )
    return secrets


def make_notifier(
    config: NotificationConfig,
    console: ConsoleSettings,
    engine: Engine,
    metrics: NotifyMetrics,
    *,
    secrets: Mapping[str, bytes] | None = None,
    retry: RetryPolicy | None = None,
    clock: Clock = utc_now,
    max_notice_age: dt.timedelta = DEFAULT_MAX_NOTICE_AGE,
    per_channel: int = 4,
    poll_seconds: float = 1.0,
) -> Notifier:
    """The outbox, senders and dispatcher, without the Kafka source (`build_notifier` adds it)."""
    secrets = channel_secrets(config, console) if secrets is None else secrets
    timeout = console.notify_timeout_seconds
    emails = [channel for channel in config.channels if isinstance(channel, EmailChannel)]
    executors = []
    senders: dict[str, Sender] = {}
    if emails:
        mail_executor = ThreadPoolExecutor(
            max_workers=per_channel * len(emails), thread_name_prefix="notify-mail"
        )
        executors.append(mail_executor)
        server = SmtpServer.from_settings(console)
    for channel in config.channels:
        if isinstance(channel, WebhookChannel):
            senders[channel.name] = WebhookSender(channel, secrets[channel.name], timeout, clock)
        else:
            senders[channel.name] = EmailSender(channel, server, mail_executor, clock)
    outbox = Outbox(engine, config, max_notice_age)
    dispatcher = Dispatcher(
        outbox,
        senders,
        retry or RetryPolicy.from_settings(console),
        metrics,
        timeout_seconds=timeout,
        per_channel=per_channel,
        poll_seconds=poll_seconds,
        clock=clock,
    )
    return Notifier(config, outbox, dispatcher, senders, clock=clock, _executors=executors)


def build_notifier(
    console: ConsoleSettings,
    kafka: KafkaSettings,
    registry_config: Mapping[str, str],
    topics: TopicNames,
    group: str,
    engine: Engine,
    metrics_registry: CollectorRegistry,
    *,
    retry: RetryPolicy | None = None,
    clock: Clock = utc_now,
    max_notice_age: dt.timedelta = DEFAULT_MAX_NOTICE_AGE,
    consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
) -> Notifier | None:
    """The console's notifier over Kafka (group: `alert_source.notify_group(app_id)`); None when
    CLINHUB_CONSOLE_NOTIFICATIONS_FILE is not set. Raises ConfigurationError naming what is wrong."""
    config = load_channels(console)
    if config is None:
        return None
    metrics = make_notify_metrics(metrics_registry)
    notifier = make_notifier(
        config, console, engine, metrics, retry=retry, clock=clock, max_notice_age=max_notice_age
    )

    def counted(exc: BaseException) -> None:
        metrics.source_errors.labels(type(exc).__name__).inc()

    notifier.source = AlertSource(
        source_config(kafka.client_config(), group),
        topics,
        ConfluentRegistry(registry_config),
        notifier.outbox.accept,
        clock,
        on_accepted=notifier.dispatcher.wake,
        on_error=counted,
        retry_max_seconds=console.notify_retry_max_seconds,
        consumer_factory=consumer_factory,
    )
    return notifier


# --- the console's view ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptView:
    attempt: int
    time: dt.datetime
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: float


@dataclass(frozen=True)
class DeliveryView:
    delivery_id: str
    channel: str
    channel_kind: str
    alert_id: str
    institution_id: str
    ward: str | None
    severity: str
    event: str
    escalation_level: int
    status: str  # pending, delivered, failed
    attempts: int
    created_time: dt.datetime
    next_attempt_time: dt.datetime | None
    delivered_time: dt.datetime | None
    last_error: str | None
    attempt_log: tuple[AttemptView, ...]  # oldest first


@dataclass(frozen=True)
class ChannelHealth:
    channel: str
    channel_kind: str
    pending: int
    delivered: int
    failed: int  # deliveries given up
    failed_attempts: int  # attempts that did not deliver (retried or not)
    last_attempt_time: dt.datetime | None
    last_outcome: str | None
    last_error: str | None  # of the last attempt when it did not deliver: None once the channel delivers


@dataclass(frozen=True)
class DeliveryOverview:
    deliveries: tuple[DeliveryView, ...]  # newest first
    channels: tuple[ChannelHealth, ...]  # by channel name


def _maybe_utc(value: dt.datetime | None) -> dt.datetime | None:
    return utc(value) if value is not None else None


def delivery_overview(engine: Engine, institution_id: str | None, limit: int = 50) -> DeliveryOverview:
    """Recent deliveries with their attempts, and per channel what is pending, delivered and failed; only
    one institution's when `institution_id` is given (None: the region's). Blocking: call it in a thread."""
    limit = max(1, min(limit, 1000))
    scope = [D.c.institution_id == institution_id] if institution_id is not None else []
    with engine.connect() as connection:
        rows = (
            connection.execute(
                select(D).where(*scope).order_by(D.c.created_time.desc(), D.c.delivery_id).limit(limit)
            )
            .mappings()
            .all()
        )
        ids = [row["delivery_id"] for row in rows]
        attempts: dict[str, list[AttemptView]] = {}
        if ids:
            for a in connection.execute(
                select(A)
                .where(A.c.delivery_id.in_(ids))
                .order_by(A.c.delivery_id, A.c.attempt, A.c.attempt_id)
            ).mappings():
                attempts.setdefault(a["delivery_id"], []).append(
                    AttemptView(
                        a["attempt"],
                        utc(a["time"]),
                        a["outcome"],
                        a["status_code"],
                        a["error"],
                        a["duration_ms"],
                    )
                )
        counts = connection.execute(
            select(D.c.channel, D.c.channel_kind, D.c.status, func.count())
            .where(*scope)
            .group_by(D.c.channel, D.c.channel_kind, D.c.status)
        ).all()
        scoped_attempts = select(A).join(D, D.c.delivery_id == A.c.delivery_id).where(*scope).subquery()
        failed_attempts: dict[str, int] = dict(
            connection.execute(
                select(scoped_attempts.c.channel, func.count())
                .where(scoped_attempts.c.outcome != OUTCOME_DELIVERED)
                .group_by(scoped_attempts.c.channel)
            ).all()
        )
        latest = (
            select(scoped_attempts.c.channel, func.max(scoped_attempts.c.attempt_id).label("last"))
            .group_by(scoped_attempts.c.channel)
            .subquery()
        )
        last = {
            row.channel: (utc(row.time), row.outcome, None if row.outcome == OUTCOME_DELIVERED else row.error)
            for row in connection.execute(
                select(A.c.channel, A.c.time, A.c.outcome, A.c.error).join(
                    latest, A.c.attempt_id == latest.c.last
                )
            )
        }
    deliveries = tuple(
        DeliveryView(
            delivery_id=row["delivery_id"],
            channel=row["channel"],
            channel_kind=row["channel_kind"],
            alert_id=row["alert_id"],
            institution_id=row["institution_id"],
            ward=row["ward"],
            severity=row["severity"],
            event=row["event"],
            escalation_level=int(json.loads(row["payload"]).get("escalation_level") or 0),
            status=row["status"],
            attempts=row["attempts"],
            created_time=utc(row["created_time"]),
            next_attempt_time=_maybe_utc(row["next_attempt_time"]),
            delivered_time=_maybe_utc(row["delivered_time"]),
            last_error=row["last_error"],
            attempt_log=tuple(attempts.get(row["delivery_id"], ())),
        )
        for row in rows
    )
    per_channel: dict[str, dict[str, Any]] = {}
    for channel, kind, status, count in counts:
        entry = per_channel.setdefault(channel, {"kind": kind, PENDING: 0, DELIVERED: 0, FAILED: 0})
        entry[status] = entry.get(status, 0) + count
    channels = tuple(
        ChannelHealth(
            channel=channel,
            channel_kind=entry["kind"],
            pending=entry[PENDING],
            delivered=entry[DELIVERED],
            failed=entry[FAILED],
            failed_attempts=failed_attempts.get(channel, 0),
            last_attempt_time=last.get(channel, (None, None, None))[0],
            last_outcome=last.get(channel, (None, None, None))[1],
            last_error=last.get(channel, (None, None, None))[2],
        )
        for channel, entry in sorted(per_channel.items())
    )
    return DeliveryOverview(deliveries, channels)
