"""Notifications, pure: the channels document and its errors, routing, delivery ids, payloads, webhook
signatures (a replay refused) and the back-off schedule."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from console.domain.notify import (
    DELIVERY_HEADER,
    PAYLOAD_FIELDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    EmailChannel,
    Notice,
    RetryPolicy,
    SignatureRejectedError,
    WebhookChannel,
    delivery_id,
    email_message,
    is_stale,
    notice_from_alert,
    notice_from_escalation,
    parse_notification_config,
    payload,
    plan_deliveries,
    signed_headers,
    verify_signature,
)
from core.exceptions import ConfigurationError
from core.settings import ConsoleSettings
from tests import factories

NOW = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)
ALERT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "notify-alert"))
SECRET = b"a test key of the receiver, 32 bytes"

DOCUMENT: dict[str, Any] = {
    "channels": [
        {
            "name": "h001-icu-webhook",
            "kind": "webhook",
            "url": "https://ehr.h001.example/hooks/clinhub",
            "institutions": ["H001"],
            "wards": ["ICU"],
            "severities": ["CRITICAL"],
            "events": ["alert", "escalation"],
        },
        {
            "name": "h001-escalations-mail",
            "kind": "email",
            "to": ["duty-manager@h001.example"],
            "institutions": ["H001"],
            "events": ["escalation"],
        },
        {
            "name": "region-webhook",
            "kind": "webhook",
            "url": "http://127.0.0.1:8999/hook",
            "institutions": ["*"],
            "severities": ["CRITICAL", "HIGH"],
        },
    ]
}


def alert_record(**changes: Any) -> dict[str, Any]:
    """A CriticalValueAlert as fastavro decodes it."""
    fields = {
        "alert_id": uuid.UUID(ALERT_ID),
        "regional_patient_id": "rp-0f3a",
        "result_time": NOW - dt.timedelta(minutes=2),
        **changes,
    }
    return factories.alert_record(NOW - dt.timedelta(minutes=1), **fields)


def escalation_record(level: int = 1, **changes: Any) -> dict[str, Any]:
    record = {
        "escalation_id": uuid.uuid4(),
        "alert_id": uuid.UUID(ALERT_ID),
        "regional_patient_id": "rp-0f3a",
        "institution_id": "H001",
        "level": level,
        "recipient": "attending physician",
        "severity": "CRITICAL",
        "message": "Potassium 6.90 mmol/L above critical high 6.2",
        "escalated_time": NOW,
        "next_deadline_time": NOW + dt.timedelta(minutes=15),
    }
    record.update(changes)
    return record


def config_error(document: Any) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        parse_notification_config(document if isinstance(document, str) else json.dumps(document))
    return caught.value


def with_channel(**changes: Any) -> dict[str, Any]:
    channel = {**DOCUMENT["channels"][0], **changes}
    return {"channels": [{k: v for k, v in channel.items() if v is not None}]}


# --- configuration -----------------------------------------------------------------------------------------


def test_the_channels_document_loads_as_frozen_typed_channels() -> None:
    config = parse_notification_config(json.dumps(DOCUMENT))
    icu, mail, region = config.channels
    assert isinstance(icu, WebhookChannel) and icu.wards == ("ICU",) and icu.secret_file is None
    assert isinstance(mail, EmailChannel) and mail.to == ("duty-manager@h001.example",)
    assert mail.wards == () and mail.severities == () and mail.events == ("escalation",)
    assert region.events == ("alert", "escalation"), "absent events: both"
    with pytest.raises(ValueError, match="frozen"):
        icu.url = "https://elsewhere.example"
    assert config.channel("region-webhook") is region and config.channel("nope") is None


@pytest.mark.parametrize(
    ("document", "field", "reason"),
    [
        (with_channel(url="http://ehr.h001.example/hook"), "channels[0].url", "https"),
        (with_channel(url="ftp://127.0.0.1/x"), "channels[0].url", "http(s) URL"),
        (with_channel(kind="sms"), "channels[0].kind", "sms"),
        (with_channel(kind=None), "channels[0].kind", "kind"),
        (with_channel(institutions=None), "channels[0].institutions", "required"),
        (with_channel(institutions=[]), "channels[0].institutions", "at least 1"),
        (with_channel(severities=["LOW"]), "channels[0].severities[0]", "CRITICAL"),
        (with_channel(events=["acknowledged"]), "channels[0].events[0]", "alert"),
        (with_channel(events=[]), "channels[0].events", "at least 1"),
        (with_channel(name="ICU webhook"), "channels[0].name", "pattern"),
        (with_channel(colour="red"), "channels[0].colour", "not permitted"),
        (
            {
                "channels": [
                    {"name": "m", "kind": "email", "to": ["not an address"], "institutions": ["H001"]}
                ]
            },
            "channels[0].to",
            "not an e-mail address",
        ),
        ({"channels": [DOCUMENT["channels"][0], DOCUMENT["channels"][0]]}, "channels[1].name", "used twice"),
        ({"channel": []}, "channels", "required"),
        ("{not json", "notifications", "not JSON"),
    ],
)
def test_a_document_the_console_cannot_use_is_refused_naming_the_field(
    document: Any, field: str, reason: str
) -> None:
    error = config_error(document)
    assert error.setting == field
    assert reason in error.reason


def test_every_problem_of_a_document_is_reported_not_just_the_first() -> None:
    error = config_error(with_channel(url="http://ehr.example/x", severities=["LOW"]))
    assert error.setting == "channels[0].severities[0]"
    assert "channels[0].url" in error.reason


# --- routing -----------------------------------------------------------------------------------------------


def routed(notice: Notice) -> list[str]:
    return [c.name for c in parse_notification_config(json.dumps(DOCUMENT)).route(notice)]


def test_an_alert_goes_to_the_channels_of_its_institution_ward_severity_and_event() -> None:
    alert = notice_from_alert(alert_record())
    assert routed(alert) == ["h001-icu-webhook", "region-webhook"], "not the escalation-only e-mail"
    assert routed(notice_from_alert(alert_record(ward="WARD-3"))) == ["region-webhook"]
    assert routed(notice_from_alert(alert_record(ward="icu"))) == ["h001-icu-webhook", "region-webhook"]
    assert routed(notice_from_alert(alert_record(severity="HIGH"))) == ["region-webhook"]
    assert routed(notice_from_alert(alert_record(severity="MODERATE"))) == []
    assert routed(notice_from_alert(alert_record(institution_id="H002"))) == ["region-webhook"]


def test_a_ward_filter_never_matches_an_alert_of_unknown_ward() -> None:
    assert routed(notice_from_alert(alert_record(ward=None))) == ["region-webhook"]


def test_an_escalation_is_routed_by_the_ward_and_facts_of_its_alert() -> None:
    alert = notice_from_alert(alert_record())
    escalation = notice_from_escalation(escalation_record(level=2, recipient="department head"), alert)
    assert (escalation.event, escalation.level, escalation.recipient) == ("escalation", 2, "department head")
    assert (escalation.ward, escalation.analyte, escalation.value) == ("ICU", "Potassium", 6.9)
    assert routed(escalation) == ["h001-icu-webhook", "h001-escalations-mail", "region-webhook"]
    unknown = notice_from_escalation(escalation_record(), None)
    assert unknown.ward is None and unknown.analyte is None
    assert routed(unknown) == ["h001-escalations-mail", "region-webhook"]


def test_a_notice_older_than_the_window_is_stale() -> None:
    alert = notice_from_alert(alert_record(raised_time=NOW - dt.timedelta(hours=7)))
    assert is_stale(alert, NOW, dt.timedelta(hours=6))
    assert not is_stale(notice_from_alert(alert_record()), NOW, dt.timedelta(hours=6))
    # a naive time, as the store reads one back from SQLite
    naive = notice_from_alert(alert_record(raised_time=dt.datetime(2026, 12, 3, 9, 59)))
    assert not is_stale(naive, NOW, dt.timedelta(minutes=5))


# --- delivery ids and payloads -----------------------------------------------------------------------------


def test_a_delivery_id_is_the_same_for_the_same_channel_alert_event_and_level_only() -> None:
    one = delivery_id("h001-icu-webhook", ALERT_ID, "alert", 0)
    assert one == delivery_id("h001-icu-webhook", ALERT_ID.upper(), "alert", 0), "alert ids in any case"
    assert uuid.UUID(one).version == 5
    others = {
        delivery_id("region-webhook", ALERT_ID, "alert", 0),
        delivery_id("h001-icu-webhook", str(uuid.uuid4()), "alert", 0),
        delivery_id("h001-icu-webhook", ALERT_ID, "escalation", 1),
        delivery_id("h001-icu-webhook", ALERT_ID, "escalation", 2),
    }
    assert one not in others and len(others) == 4


def test_planned_deliveries_are_identical_when_the_alert_is_replayed() -> None:
    config = parse_notification_config(json.dumps(DOCUMENT))
    first = plan_deliveries(config, notice_from_alert(alert_record()))
    again = plan_deliveries(config, notice_from_alert(alert_record(source_event_id=uuid.uuid4())))
    assert [(d.delivery_id, d.payload) for d in first] == [(d.delivery_id, d.payload) for d in again]
    assert [(d.channel, d.channel_kind) for d in first] == [
        ("h001-icu-webhook", "webhook"),
        ("region-webhook", "webhook"),
    ]


def test_the_payload_carries_the_alert_and_escalation_but_never_a_name_or_mrn() -> None:
    alert = notice_from_alert(alert_record(value_comparator=">"))
    escalation = notice_from_escalation(escalation_record(), alert)
    document = json.loads(payload(escalation, "h001-icu-webhook"))
    assert tuple(sorted(document)) == tuple(sorted(PAYLOAD_FIELDS))
    assert document == {
        "delivery_id": delivery_id("h001-icu-webhook", ALERT_ID, "escalation", 1),
        "channel": "h001-icu-webhook",
        "event": "escalation",
        "alert_id": ALERT_ID,
        "regional_patient_id": "rp-0f3a",
        "institution_id": "H001",
        "ward": "ICU",
        "analyte": "Potassium",
        "loinc_code": "2823-3",
        "value": 6.9,
        "value_comparator": ">",
        "unit": "mmol/L",
        "limit_kind": "HIGH",
        "limit_value": 6.2,
        "severity": "CRITICAL",
        "message": "Potassium 6.90 mmol/L above critical high 6.2",
        "result_time": "2026-12-03T09:58:00.000Z",
        "occurred_time": "2026-12-03T10:00:00.000Z",
        "escalation_level": 1,
        "escalation_recipient": "attending physician",
        "next_deadline_time": "2026-12-03T10:15:00.000Z",
    }
    assert not {"name", "mrn", "patient_mrn", "patient_name", "national_id"} & set(document)


def test_the_email_says_what_and_where_in_its_subject_and_everything_in_its_body() -> None:
    alert = notice_from_alert(alert_record())
    text = payload(alert, "mail")
    message = email_message(text, ["a@h001.example", "b@h001.example"], "clinhub@h001.example", NOW)
    assert message["Subject"] == "[clinhub] CRITICAL ALERT: Potassium (H001/ICU)"
    assert message["To"] == "a@h001.example, b@h001.example"
    did = delivery_id("mail", ALERT_ID, "alert", 0)
    assert message["Message-ID"] == f"<{did}@clinhub>" and message[DELIVERY_HEADER] == did
    body = message.get_content()
    assert body.startswith("Potassium 6.90 mmol/L above critical high 6.2\n")
    assert f"alert_id: {ALERT_ID}" in body and "value: 6.9" in body and "rp-0f3a" not in message["Subject"]


# --- signatures --------------------------------------------------------------------------------------------


def test_a_signed_body_verifies_with_the_same_key_within_the_tolerance() -> None:
    body = payload(notice_from_alert(alert_record()), "h001-icu-webhook").encode()
    headers = signed_headers(body, SECRET, NOW)
    assert headers[TIMESTAMP_HEADER] == str(int(NOW.timestamp()))
    assert headers[SIGNATURE_HEADER].startswith("v1=") and len(headers[SIGNATURE_HEADER]) == 3 + 64
    verify_signature(body, headers, SECRET, NOW + dt.timedelta(seconds=299))
    verify_signature(body, {k.lower(): v for k, v in headers.items()}, SECRET.decode(), NOW)  # any case
    rotated = {**headers, SIGNATURE_HEADER: f"v1={'0' * 64},{headers[SIGNATURE_HEADER]}"}
    verify_signature(body, rotated, SECRET, NOW)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda body, headers: (body + b" ", headers), "does not match"),
        (lambda body, headers: (body.replace(b"6.9", b"4.9"), headers), "does not match"),
        (lambda body, headers: (body, {**headers, TIMESTAMP_HEADER: str(int(NOW.timestamp()) - 1)}), "match"),
        (lambda body, headers: (body, {**headers, SIGNATURE_HEADER: "v0=" + "a" * 64}), "does not match"),
        (lambda body, headers: (body, {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]}), "missing"),
        (lambda body, headers: (body, {**headers, TIMESTAMP_HEADER: "yesterday"}), "Unix time"),
    ],
)
def test_a_tampered_request_is_refused(tamper: Any, reason: str) -> None:
    body = payload(notice_from_alert(alert_record()), "h001-icu-webhook").encode()
    tampered_body, tampered_headers = tamper(body, signed_headers(body, SECRET, NOW))
    with pytest.raises(SignatureRejectedError, match=reason):
        verify_signature(tampered_body, tampered_headers, SECRET, NOW)


def test_a_wrong_key_is_refused() -> None:
    body = b'{"alert_id":"x"}'
    with pytest.raises(SignatureRejectedError, match="does not match"):
        verify_signature(body, signed_headers(body, SECRET, NOW), b"another key", NOW)


def test_a_replayed_request_is_refused_once_stale_and_one_from_the_future_too() -> None:
    body = payload(notice_from_alert(alert_record()), "h001-icu-webhook").encode()
    captured = signed_headers(body, SECRET, NOW)
    with pytest.raises(SignatureRejectedError, match="301 s old"):
        verify_signature(body, captured, SECRET, NOW + dt.timedelta(seconds=301))
    with pytest.raises(SignatureRejectedError, match="in the future"):
        verify_signature(body, captured, SECRET, NOW - dt.timedelta(seconds=301))
    with pytest.raises(SignatureRejectedError, match="old"):
        verify_signature(body, captured, SECRET, NOW + dt.timedelta(seconds=31), tolerance_seconds=30)


# --- back-off ----------------------------------------------------------------------------------------------


def test_the_back_off_doubles_up_to_its_cap_and_gives_up_after_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=8, max_delay_seconds=30, first_delay_seconds=2)
    assert policy.schedule() == [2, 4, 8, 16, 30, 30, 30]
    assert policy.delay(1) == 2 and policy.delay(7) == 30
    assert policy.delay(8) is None and policy.delay(9) is None


def test_a_receivers_retry_after_is_honoured_within_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, max_delay_seconds=60, first_delay_seconds=2)
    assert policy.delay(1, retry_after=20) == 20
    assert policy.delay(1, retry_after=600) == 60
    assert policy.delay(3, retry_after=1) == 8, "never sooner than the back-off"


def test_the_policy_comes_from_the_console_settings() -> None:
    policy = RetryPolicy.from_settings(ConsoleSettings(notify_max_attempts=3, notify_retry_max_seconds=5))
    assert (policy.max_attempts, policy.max_delay_seconds) == (3, 5)
    assert policy.schedule() == [2, 4]


def test_the_example_channels_file_is_a_valid_document() -> None:
    example = Path(__file__).resolve().parents[4] / "deploy" / "notifications.example.json"
    config = parse_notification_config(example.read_text())
    assert {channel.kind for channel in config.channels} == {"webhook", "email"}
