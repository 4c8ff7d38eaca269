"""Notifications, pure: channel configuration, routing, delivery ids, payloads, webhook signatures and the
retry schedule. No I/O and no clock: callers pass the document text, the secrets and `now`.

A delivery is one (channel, alert, event, escalation level); its id is derived from those, so a replayed
alert or escalation maps to the delivery already queued and nothing is sent twice. Payloads carry the
pseudonymous regional patient id and the clinical facts of the alert, never a name or an MRN.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from console.exceptions import ConsoleError
from core.exceptions import ConfigurationError
from core.settings import ConsoleSettings

Event = Literal["alert", "escalation"]
Severity = Literal["CRITICAL", "HIGH", "MODERATE"]  # org.clinhub.alert.Severity
ALERT_EVENT: Event = "alert"
ESCALATION_EVENT: Event = "escalation"
EVENTS: tuple[Event, ...] = (ALERT_EVENT, ESCALATION_EVENT)
SEVERITIES: tuple[Severity, ...] = ("CRITICAL", "HIGH", "MODERATE")
ALL_INSTITUTIONS = "*"  # in `institutions`: every institution (a regional channel); never implied

TIMESTAMP_HEADER = "X-Clinhub-Timestamp"
SIGNATURE_HEADER = "X-Clinhub-Signature"
DELIVERY_HEADER = "X-Clinhub-Delivery"  # the delivery id: the same on every retry, for receivers to dedupe
EVENT_HEADER = "X-Clinhub-Event"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300

# Fixed forever: delivery ids derived from it are what makes a replay find the delivery already queued.
DELIVERY_NAMESPACE = uuid.UUID("6f1c2a8e-4b7d-5e90-a3c1-0d9e8f7b6a54")

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")

# --- configuration -----------------------------------------------------------------------------------------

ChannelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]  # a metric label: bounded


class _Channel(BaseModel):
    """What every channel has: its name and which alerts it wants."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ChannelName
    # Required: a channel sees one institution's alerts unless it says "*" (a regional channel).
    institutions: tuple[Annotated[str, Field(pattern=r"^(\*|[A-Za-z0-9_-]+)$")], ...] = Field(min_length=1)
    wards: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()  # empty: every ward
    severities: tuple[Severity, ...] = ()  # empty: every severity
    events: tuple[Event, ...] = Field(default=EVENTS, min_length=1)

    @field_validator("wards", "severities", mode="before")
    @classmethod
    def _none_is_all(cls, value: Any) -> Any:
        return () if value is None else value

    def matches(self, notice: Notice) -> bool:
        """Whether this channel wants the notice. A ward filter matches only a known ward in its list."""
        if notice.event not in self.events:
            return False
        if ALL_INSTITUTIONS not in self.institutions and notice.institution_id not in self.institutions:
            return False
        if self.severities and notice.severity.upper() not in self.severities:
            return False
        if self.wards:
            return notice.ward is not None and notice.ward.casefold() in {w.casefold() for w in self.wards}
        return True


class WebhookChannel(_Channel):
    """HTTP POST of the JSON payload, signed with HMAC-SHA256 (`signed_headers`)."""

    kind: Literal["webhook"]
    url: str
    # The signing key for this channel; None: the console's CLINHUB_CONSOLE_WEBHOOK_SECRET(_FILE)
    secret_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _https_or_loopback(cls, url: str) -> str:
        """Payloads carry clinical data: plain HTTP only to this machine."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ValueError("must be https (plain http only to a loopback host)")
        return url


class EmailChannel(_Channel):
    """An e-mail through the console's SMTP server (CLINHUB_CONSOLE_SMTP_*)."""

    kind: Literal["email"]
    to: tuple[str, ...] = Field(min_length=1)

    @field_validator("to")
    @classmethod
    def _addresses(cls, to: tuple[str, ...]) -> tuple[str, ...]:
        for address in to:
            if not _ADDRESS.fullmatch(address):
                raise ValueError(f"{address!r} is not an e-mail address")
        return to


Channel = WebhookChannel | EmailChannel


class NotificationConfig(BaseModel):
    """The channels document (CLINHUB_CONSOLE_NOTIFICATIONS_FILE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: tuple[Annotated[Channel, Field(discriminator="kind")], ...]

    @model_validator(mode="after")
    def _unique_names(self) -> NotificationConfig:
        seen: set[str] = set()
        for index, channel in enumerate(self.channels):
            if channel.name in seen:
                raise _DuplicateNameError(index, channel.name)
            seen.add(channel.name)
        return self

    def channel(self, name: str) -> Channel | None:
        return next((c for c in self.channels if c.name == name), None)

    def route(self, notice: Notice) -> list[Channel]:
        """The channels that want this notice, in configuration order."""
        return [channel for channel in self.channels if channel.matches(notice)]


class _DuplicateNameError(ValueError):
    def __init__(self, index: int, name: str) -> None:
        super().__init__(f"channel name {name!r} is used twice")
        self.index = index


def _field_path(loc: Sequence[int | str]) -> str:
    """pydantic's location as the document's path: channels[1].url (without the union's tag)."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif i == 2 and loc[0] == "channels" and part in ("webhook", "email"):
            continue  # the discriminated union's branch, not a field
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_notification_config(text: str) -> NotificationConfig:
    """The channels document, or ConfigurationError naming the first field it cannot accept."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError("notifications", f"not JSON: {exc}") from exc
    try:
        return NotificationConfig.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
                loc = (*loc, "kind")
            ctx_error = (error.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _DuplicateNameError):
                loc = ("channels", ctx_error.index, "name")
            message = str(ctx_error) if ctx_error is not None else error["msg"]
            problems.append((_field_path(loc) or "channels", message))
        field, reason = problems[0]
        if len(problems) > 1:
            reason += "; also " + "; ".join(f"{f}: {r}" for f, r in problems[1:])
        raise ConfigurationError(field, reason) from None


# --- notices and routing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """An alert or one of its escalations, as notifications see it: routing keys and clinical facts.

    `level` is 0 for the alert itself. The facts (analyte, value, ...) of an escalation come from its
    alert when the console knows it, and are None otherwise.
    """

    event: str
    alert_id: str
    regional_patient_id: str
    institution_id: str
    ward: str | None
    severity: str
    message: str
    occurred_time: dt.datetime  # raised (alert) or escalated (escalation)
    level: int = 0
    recipient: str | None = None
    next_deadline_time: dt.datetime | None = None
    analyte: str | None = None
    loinc_code: str | None = None
    value: float | None = None
    value_comparator: str | None = None
    unit: str | None = None
    limit_kind: str | None = None
    limit_value: float | None = None
    result_time: dt.datetime | None = None


def canonical_alert_id(value: Any) -> str:
    """The store's form of an alert id (lower-case hyphenated UUID text), whatever form it came in."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return str(value).lower()


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value))


def notice_from_alert(record: Mapping[str, Any]) -> Notice:
    """A CriticalValueAlert as fastavro decodes it (or an alerts row of the store, same field names)."""
    return Notice(
        event=ALERT_EVENT,
        alert_id=canonical_alert_id(record["alert_id"]),
        regional_patient_id=str(record["regional_patient_id"]),
        institution_id=str(record["institution_id"]),
        ward=record.get("ward"),
        severity=_enum(record["severity"]),
        message=str(record["message"]),
        occurred_time=record["raised_time"],
        next_deadline_time=record.get("deadline_time"),
        analyte=record.get("analyte"),
        loinc_code=record.get("loinc_code"),
        value=record.get("value"),
        value_comparator=record.get("value_comparator"),
        unit=record.get("unit"),
        limit_kind=_enum(record["limit_kind"]) if record.get("limit_kind") is not None else None,
        limit_value=record.get("limit_value"),
        result_time=record.get("result_time"),
    )


def notice_from_escalation(record: Mapping[str, Any], alert: Notice | None) -> Notice:
    """An AlertEscalation, with the ward and facts of its alert when known (routing by ward needs them)."""
    return Notice(
        event=ESCALATION_EVENT,
        alert_id=canonical_alert_id(record["alert_id"]),
        regional_patient_id=str(record["regional_patient_id"]),
        institution_id=str(record["institution_id"]),
        ward=alert.ward if alert else None,
        severity=_enum(record["severity"]),
        message=str(record["message"]),
        occurred_time=record["escalated_time"],
        level=int(record["level"]),
        recipient=str(record["recipient"]),
        next_deadline_time=record.get("next_deadline_time"),
        analyte=alert.analyte if alert else None,
        loinc_code=alert.loinc_code if alert else None,
        value=alert.value if alert else None,
        value_comparator=alert.value_comparator if alert else None,
        unit=alert.unit if alert else None,
        limit_kind=alert.limit_kind if alert else None,
        limit_value=alert.limit_value if alert else None,
        result_time=alert.result_time if alert else None,
    )


def utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC instant; a naive one is UTC already (the store's SQLite form)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def is_stale(notice: Notice, now: dt.datetime, max_age: dt.timedelta) -> bool:
    """Too old to notify (a first start reading a topic's history): the console's queue still shows it."""
    return utc(now) - utc(notice.occurred_time) > max_age


def delivery_id(channel: str, alert_id: str, event: str, level: int) -> str:
    """The same (channel, alert, event, level) always gives the same id: replays queue nothing new."""
    return str(uuid.uuid5(DELIVERY_NAMESPACE, f"{channel}|{canonical_alert_id(alert_id)}|{event}|{level}"))


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")


PAYLOAD_FIELDS = (
    "delivery_id",
    "channel",
    "event",
    "alert_id",
    "regional_patient_id",
    "institution_id",
    "ward",
    "analyte",
    "loinc_code",
    "value",
    "value_comparator",
    "unit",
    "limit_kind",
    "limit_value",
    "severity",
    "message",
    "result_time",
    "occurred_time",
    "escalation_level",
    "escalation_recipient",
    "next_deadline_time",
)


def payload(notice: Notice, channel: str) -> str:
    """The JSON body of a delivery (also the source of its e-mail): compact and key-sorted, so every retry
    sends the same bytes. The fields of PAYLOAD_FIELDS and nothing else: no name, no MRN."""
    document = {
        "delivery_id": delivery_id(channel, notice.alert_id, notice.event, notice.level),
        "channel": channel,
        "event": notice.event,
        "alert_id": notice.alert_id,
        "regional_patient_id": notice.regional_patient_id,
        "institution_id": notice.institution_id,
        "ward": notice.ward,
        "analyte": notice.analyte,
        "loinc_code": notice.loinc_code,
        "value": notice.value,
        "value_comparator": notice.value_comparator,
        "unit": notice.unit,
        "limit_kind": notice.limit_kind,
        "limit_value": notice.limit_value,
        "severity": notice.severity,
        "message": notice.message,
        "result_time": _time(notice.result_time),
        "occurred_time": _time(notice.occurred_time),
        "escalation_level": notice.level,
        "escalation_recipient": notice.recipient,
        "next_deadline_time": _time(notice.next_deadline_time),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _parsed_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def notice_from_payload(text: str) -> Notice:
    """The notice a delivery's payload was made of: the facts of an alert for its escalations, when the
    store does not hold the alert (yet)."""
    document = json.loads(text)
    occurred = _parsed_time(document["occurred_time"])
    if occurred is None:
        raise ValueError("payload without occurred_time")
    return Notice(
        event=document["event"],
        alert_id=document["alert_id"],
        regional_patient_id=document["regional_patient_id"],
        institution_id=document["institution_id"],
        ward=document["ward"],
        severity=document["severity"],
        message=document["message"],
        occurred_time=occurred,
        level=document["escalation_level"],
        recipient=document["escalation_recipient"],
        next_deadline_time=_parsed_time(document["next_deadline_time"]),
        analyte=document["analyte"],
        loinc_code=document["loinc_code"],
        value=document["value"],
        value_comparator=document["value_comparator"],
        unit=document["unit"],
        limit_kind=document["limit_kind"],
        limit_value=document["limit_value"],
        result_time=_parsed_time(document["result_time"]),
    )


@dataclass(frozen=True)
class PlannedDelivery:
    """One row of the outbox to be: which channel, for which alert and level, and the body to send."""

    delivery_id: str
    channel: str
    channel_kind: str
    notice: Notice
    payload: str


def plan_deliveries(config: NotificationConfig, notice: Notice) -> list[PlannedDelivery]:
    """One delivery per channel that wants the notice."""
    return [
        PlannedDelivery(
            delivery_id=delivery_id(channel.name, notice.alert_id, notice.event, notice.level),
            channel=channel.name,
            channel_kind=channel.kind,
            notice=notice,
            payload=payload(notice, channel.name),
        )
        for channel in config.route(notice)
    ]


# --- e-mail ------------------------------------------------------------------------------------------------


def email_message(payload_text: str, to: Iterable[str], sender: str, now: dt.datetime) -> EmailMessage:
    """A plain-text e-mail of a delivery's payload. The subject says what and where, not who; the
    Message-ID is derived from the delivery id, so a mail system can drop a retried copy."""
    document = json.loads(payload_text)
    what = "ESCALATION" if document["event"] == ESCALATION_EVENT else "ALERT"
    where = document["institution_id"] + (f"/{document['ward']}" if document.get("ward") else "")
    subject = f"[clinhub] {document['severity']} {what}: {document.get('analyte') or document['message']}"
    message = EmailMessage()
    message["Subject"] = f"{subject} ({where})"
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Date"] = format_datetime(now.astimezone(dt.UTC))
    message["Message-ID"] = f"<{document['delivery_id']}@clinhub>"
    message[DELIVERY_HEADER] = document["delivery_id"]
    lines = [document["message"], ""]
    lines += [f"{name}: {document[name]}" for name in PAYLOAD_FIELDS if document.get(name) is not None]
    message.set_content("\n".join(lines) + "\n")
    return message


# --- webhook signatures ------------------------------------------------------------------------------------


class SignatureRejectedError(ConsoleError):
    """A webhook request whose signature or timestamp a receiver must refuse; says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key(secret: bytes | str) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def signature(body: bytes, secret: bytes | str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of `<timestamp>.` + body: the timestamp is signed too, so it cannot be replaced."""
    return hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, secret: bytes | str, now: dt.datetime) -> dict[str, str]:
    """The signature headers of one attempt (a retry is signed again, with its own time)."""
    timestamp = int(now.timestamp())
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"{SIGNATURE_VERSION}={signature(body, secret, timestamp)}",
    }


class Headers(Protocol):
    """A request's headers: a dict, httpx or Starlette headers, or http.server's message."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def verify_signature(
    body: bytes,
    headers: Headers,
    secret: bytes | str,
    now: dt.datetime,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """For receivers: raise SignatureRejectedError unless the body is signed with `secret` at a time within
    `tolerance_seconds` of `now` (a replayed request is stale). Dedupe on X-Clinhub-Delivery as well: a
    replay inside the window carries a delivery id already seen. Several `v1=` values (key rotation) are
    accepted, comma-separated."""
    folded = {name.lower(): value for name, value in headers.items()}
    stamp, signed = folded.get(TIMESTAMP_HEADER.lower()), folded.get(SIGNATURE_HEADER.lower())
    if not stamp or not signed:
        raise SignatureRejectedError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    try:
        timestamp = int(stamp.strip())
    except ValueError:
        raise SignatureRejectedError(f"{TIMESTAMP_HEADER} is not a Unix time") from None
    skew = now.timestamp() - timestamp
    if abs(skew) > tolerance_seconds:
        when = "old" if skew > 0 else "in the future"
        raise SignatureRejectedError(
            f"timestamp is {abs(skew):.0f} s {when} (tolerance {tolerance_seconds} s)"
        )
    expected = signature(body, secret, timestamp)
    offered = [
        value.strip()[len(SIGNATURE_VERSION) + 1 :]
        for value in signed.split(",")
        if value.strip().startswith(f"{SIGNATURE_VERSION}=")
    ]
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise SignatureRejectedError("signature does not match the body")


# --- retries -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with a cap: first_delay, 2x, 4x, ... up to max_delay; give up after
    max_attempts attempts in all."""

    max_attempts: int
    max_delay_seconds: float
    first_delay_seconds: float = 2.0

    @classmethod
    def from_settings(cls, console: ConsoleSettings) -> RetryPolicy:
        return cls(
            max_attempts=console.notify_max_attempts, max_delay_seconds=console.notify_retry_max_seconds
        )

    def delay(self, attempts_made: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after `attempts_made` failed attempts; None: give up. A receiver's Retry-After
        is honoured when longer, within the cap."""
        if attempts_made >= self.max_attempts:
            return None
        wait = min(self.max_delay_seconds, self.first_delay_seconds * 2 ** max(attempts_made - 1, 0))
        if retry_after is not None and retry_after > wait:
            wait = min(self.max_delay_seconds, retry_after)
        return wait

    def schedule(self) -> list[float]:
        """Every wait between attempts, in order (max_attempts - 1 of them)."""
        return [self.delay(n) or 0.0 for n in range(1, self.max_attempts)]
