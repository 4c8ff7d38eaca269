"""The clinical handler over plain-dict tables: an alert goes once on alerts.critical, and each of its
changes (opened, suppressed repeats, escalation, acknowledgement) as an AlertState on alerts.state,
keyed by alert id."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from core.contract import alert_key
from schemas.wire import ConfluentRegistry
from streams.domain.escalation import OpenAlerts, due_escalations, escalation_record
from streams.runtime.clinical import ClinicalHandler, ClinicalTables
from streams.runtime.messages import RawMessage
from streams.runtime.outputs import Output
from tests.factories import lab_record, normalised
from tests.unit.streams.runtime.test_app import NOW, make_components, stage_of


class Clinical:
    """A ClinicalHandler over dict tables, its outputs captured and decoded."""

    def __init__(self, name: str) -> None:
        self.components = make_components(ConfluentRegistry({"url": f"mock://{name}"}))
        self.sent: list[Output] = []

        async def capture(outputs: Sequence[Output]) -> None:
            self.sent.extend(outputs)

        self.tables = ClinicalTables(analytes={}, open_alerts={}, wards={})
        self.stage = stage_of("clinical", self.components, capture)
        self.handler = ClinicalHandler(self.stage, self.tables, self.components.reference.policy)
        self.offset = 0

    def message(self, topic: str, key: str, record: str, value: dict[str, Any]) -> RawMessage:
        self.offset += 1
        encoded = self.components.codecs.encode(record, value)
        return RawMessage(topic, 0, self.offset, key.encode(), encoded)

    def handle(self, *messages: RawMessage) -> None:
        asyncio.run(self.handler.handle(list(messages)))

    def on(self, topic: str, record: str) -> list[tuple[bytes | None, dict[str, Any]]]:
        decode = self.components.codecs.decoders[record]
        return [(o.key, decode(o.value)) for o in self.sent if o.topic == topic]


def _potassium(value: float, minutes_ago: int) -> dict[str, Any]:
    raw = lab_record(
        "H001", "K", value, "mmol/L", mrn="MRN-STATES", at=NOW - dt.timedelta(minutes=minutes_ago)
    )
    return normalised("lab", raw)


@pytest.mark.parametrize("batches", ["one batch each", "all in one batch"])
def test_a_critical_result_and_three_suppressed_repeats_make_one_alert_and_its_states(batches: str) -> None:
    clinical = Clinical(f"states-{batches.replace(' ', '-')}")
    labs = [_potassium(6.9, 40), _potassium(6.8, 30), _potassium(6.7, 20), _potassium(6.6, 10)]
    patient = labs[0]["regional_patient_id"]
    messages = [clinical.message("norm.lab", patient, "lab", lab) for lab in labs]
    if batches == "all in one batch":
        clinical.handle(*messages)
    else:
        for message in messages:
            clinical.handle(message)

    ((alert_key_, alert),) = clinical.on("alerts.critical", "alert")  # exactly one, never republished
    assert alert_key_ == patient.encode()
    alert_id = str(alert["alert_id"])
    states = clinical.on("alerts.state", "alert_state")
    assert {key for key, _ in states} == {alert_key(alert_id)}, "every state keyed by the alert id"
    assert {str(state["alert_id"]) for _, state in states} == {alert_id}
    assert [(s["change"], s["suppressed_repeats"], s["status"]) for _, s in states] == [
        ("OPENED", 0, "OPEN"),
        ("REPEAT", 1, "OPEN"),
        ("REPEAT", 2, "OPEN"),
        ("REPEAT", 3, "OPEN"),
    ]
    assert len({str(s["state_id"]) for _, s in states}) == 4
    opened = states[0][1]
    assert opened["next_deadline_time"] == alert["deadline_time"]
    assert opened["changed_time"] == alert["raised_time"]
    assert opened["correlation_id"] == labs[0]["envelope"]["correlation_id"]
    assert [s["correlation_id"] for _, s in states[1:]] == [
        lab["envelope"]["correlation_id"] for lab in labs[1:]
    ]
    tracked = OpenAlerts.from_dict(clinical.tables.open_alerts[patient]).alerts[alert_id]
    assert tracked.suppressed_repeats == 3, "the escalation state knows the repeats, for the next state"


def test_a_replayed_batch_publishes_the_same_states_and_a_redelivered_result_none() -> None:
    clinical = Clinical("states-replay")
    labs = [_potassium(6.9, 40), _potassium(6.8, 30)]
    patient = labs[0]["regional_patient_id"]
    messages = [clinical.message("norm.lab", patient, "lab", lab) for lab in labs]
    clinical.handle(*messages)
    first = [(o.topic, o.key, o.value) for o in clinical.sent]
    # a crash before the state was written: the batch is read again over the state as it was
    clinical.tables.analytes.clear()
    clinical.tables.open_alerts.clear()
    clinical.sent.clear()
    clinical.handle(*messages)
    assert [(o.topic, o.key, o.value) for o in clinical.sent] == first, "same alert, same state ids"
    assert [topic for topic, _, _ in first] == ["alerts.critical", "alerts.state", "alerts.state"]
    clinical.sent.clear()
    clinical.handle(*messages)  # the state was written this time: duplicates publish nothing
    assert clinical.sent == []


def _ack(clinical: Clinical, alert: dict[str, Any], ack_id: str, minutes: int) -> RawMessage:
    record = {
        "ack_id": ack_id,
        "alert_id": str(alert["alert_id"]),
        "acknowledged_by": "DR0042",
        "role": "attending",
        "channel": "PHONE",
        "read_back": True,
        "acknowledged_time": NOW + dt.timedelta(minutes=minutes),
        "note": None,
        "regional_patient_id": alert["regional_patient_id"],
    }
    return clinical.message("alerts.ack", alert["regional_patient_id"], "ack", record)


def test_an_escalation_and_an_acknowledgement_each_publish_the_alert_state() -> None:
    clinical = Clinical("states-lifecycle")
    lab = _potassium(6.9, 40)
    patient = lab["regional_patient_id"]
    clinical.handle(clinical.message("norm.lab", patient, "lab", lab))
    clinical.handle(clinical.message("norm.lab", patient, "lab", _potassium(6.8, 30)))
    ((_, alert),) = clinical.on("alerts.critical", "alert")
    alert_id = str(alert["alert_id"])

    later = NOW + dt.timedelta(minutes=16)
    policy = clinical.components.reference.policy.escalation
    (escalation,) = due_escalations(OpenAlerts.from_dict(clinical.tables.open_alerts[patient]), later, policy)
    escalated = clinical.message("alerts.escalation", patient, "escalation", escalation_record(escalation))
    clinical.handle(escalated)
    clinical.handle(escalated)  # read twice (a replay): applied once, published once
    ack_id = str(uuid.uuid4())
    clinical.handle(_ack(clinical, alert, ack_id, minutes=20))
    clinical.handle(_ack(clinical, alert, str(uuid.uuid4()), minutes=25))  # already acknowledged

    states = [state for _, state in clinical.on("alerts.state", "alert_state")]
    assert [(s["change"], s["status"], s["suppressed_repeats"], s["escalation_level"]) for s in states] == [
        ("OPENED", "OPEN", 0, 0),
        ("REPEAT", "OPEN", 1, 0),
        ("ESCALATED", "OPEN", 1, 1),
        ("ACKNOWLEDGED", "ACKNOWLEDGED", 1, 1),
    ]
    escalated_state, acknowledged = states[2], states[3]
    assert escalated_state["recipient"] == escalation.recipient
    assert escalated_state["next_deadline_time"] == escalation.next_deadline_time
    assert escalated_state["changed_time"] == escalation.escalated_time
    assert (acknowledged["acknowledged_by"], acknowledged["next_deadline_time"]) == ("DR0042", None)
    assert acknowledged["acknowledged_time"] == NOW + dt.timedelta(minutes=20)
    assert acknowledged["changed_time"] == NOW + dt.timedelta(minutes=20)
    assert acknowledged["recipient"] == escalation.recipient, "the whole state, not only the change"
    keys = {output.key for output in clinical.sent if output.topic == "alerts.state"}
    assert keys == {alert_key(alert_id)}
    assert len(clinical.on("alerts.critical", "alert")) == 1


def test_an_acknowledgement_of_an_unknown_alert_publishes_nothing() -> None:
    clinical = Clinical("states-unknown-ack")
    alert = {"alert_id": uuid.uuid4(), "regional_patient_id": "rp-nobody"}
    clinical.handle(_ack(clinical, alert, str(uuid.uuid4()), minutes=1))
    assert clinical.sent == []
