"""The console's JSON API and live feed on the real stack: results published through the SDK, judged by
the real stream worker, stored, shown, acknowledged with read-back, and the loop closed on Kafka."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from producers.publisher import make_publisher
from sinks.models import Alert, AlertAcknowledgement
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.console.conftest import ConsoleServer, console_server
from tests.integration.test_clinical import escalations_by_alert, fast_escalation
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration


def queue_ids(client: httpx.Client) -> set[str]:
    response = client.get("/api/v1/alerts")
    response.raise_for_status()
    return {alert["alert_id"] for alert in response.json()}


def wait_for_alert(
    server: ConsoleServer, client: httpx.Client, mrn: str, timeout: float = 60
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def present() -> bool:
        for alert in client.get("/api/v1/alerts").json():
            if alert["patient"]["mrn"] == mrn:
                found.update(alert)
                return True
        return False

    wait_for(present, server.hub, timeout, what=f"an alert for {mrn} in the console")
    return found


def test_a_critical_result_is_shown_acknowledged_with_read_back_and_stops_escalating(
    hub: HubEnv, tmp_path: Path
) -> None:
    worker_env = fast_escalation(tmp_path, minutes=0.2)  # 12 s to acknowledge
    hub.start_worker(worker_env)
    with console_server(hub, reference_dir=tmp_path / "reference") as server:
        publisher = make_publisher(hub.settings, "H001")
        record = lab_record("H001", "K", 6.9, "mmol/L", mrn="MRN-LOOP")
        publisher.publish_lab(record)
        publisher.close()
        clinician = server.api("dr.icu")
        alert = wait_for_alert(server, clinician, "MRN-LOOP")
        assert alert["status"] == "open"
        assert alert["institution_id"] == "H001"
        assert (alert["value"], alert["unit"]) == (6.9, "mmol/L")
        assert alert["sent_value"] == 6.9 and alert["sent_unit"] == "mmol/L"
        assert alert["limit_kind"] == "HIGH" and alert["rule_source"]
        assert [step["recipient"] for step in alert["escalation_chain"]][:2] == [
            "responsible clinician",
            "attending physician",
        ]
        assert alert["seconds_to_escalation"] is not None
        alert_id = alert["alert_id"]

        # another institution's clinician: refused by the API, and the refusal is audited
        other = server.api("dr.h2")
        assert other.get(f"/api/v1/alerts/{alert_id}").status_code == 403
        assert alert_id not in queue_ids(other)
        assert server.audit(username="dr.h2", outcome="denied", alert_id=alert_id)

        # a wrong read-back names the field and acknowledges nothing
        wrong = clinician.post(
            f"/api/v1/alerts/{alert_id}/acknowledge", json={"patient_identifier": "MRN-LOOP", "value": "5.9"}
        )
        assert wrong.status_code == 422
        assert wrong.json()["error"]["field"] == "value"
        wrong_patient = clinician.post(
            f"/api/v1/alerts/{alert_id}/acknowledge", json={"patient_identifier": "MRN-OTHER", "value": "6.9"}
        )
        assert wrong_patient.json()["error"]["field"] == "patient_identifier"

        done = clinician.post(
            f"/api/v1/alerts/{alert_id}/acknowledge",
            json={"patient_identifier": "mrn-loop", "value": "6.90", "note": "repeat sample, ECG ordered"},
        )
        assert done.status_code == 200, done.text
        assert done.json()["acknowledged_by"] == "dr.icu"
        again = clinician.post(
            f"/api/v1/alerts/{alert_id}/acknowledge", json={"patient_identifier": "MRN-LOOP", "value": "6.9"}
        )
        assert again.status_code == 409
        assert again.json()["error"]["acknowledged_by"] == "dr.icu"
        assert alert_id not in queue_ids(clinician)

        def stored() -> bool:
            with hub.engine.connect() as connection:
                by = connection.execute(
                    select(Alert.__table__.c.acknowledged_by).where(Alert.__table__.c.alert_id == alert_id)
                ).scalar_one_or_none()
            return by == "dr.icu"

        wait_for(stored, hub, 30, what="the acknowledgement in the store")
        with hub.engine.connect() as connection:
            ack = connection.execute(
                select(AlertAcknowledgement.__table__).where(
                    AlertAcknowledgement.__table__.c.alert_id == alert_id
                )
            ).one()
        assert (ack.acknowledged_by, ack.channel, ack.read_back) == ("dr.icu", "CONSOLE", True)
        assert ack.note == "repeat sample, ECG ordered"
        detail = clinician.get(f"/api/v1/alerts/{alert_id}").json()
        assert detail["alert"]["minutes_to_acknowledge"] is not None
        assert server.audit(username="dr.icu", action="acknowledge", outcome="ok", alert_id=alert_id)

        # the deadline passes: no escalation of the acknowledged alert
        time.sleep(15)
        assert alert_id not in escalations_by_alert(hub, 3)


def test_an_unacknowledged_alert_reaches_the_next_level_of_the_chain(hub: HubEnv, tmp_path: Path) -> None:
    hub.start_worker(fast_escalation(tmp_path, minutes=0.2))
    with console_server(hub, reference_dir=tmp_path / "reference") as server:
        publisher = make_publisher(hub.settings, "H001")
        publisher.publish_lab(lab_record("H001", "K", 2.1, "mmol/L", mrn="MRN-CHAIN"))
        publisher.close()
        resident, attending = server.api("dr.icu"), server.api("dr.attending")
        alert = wait_for_alert(server, resident, "MRN-CHAIN")
        assert alert["escalation_level"] == 0
        assert alert["alert_id"] not in queue_ids(attending), "level 1 sees it only once escalated"
        wait_for(
            lambda: alert["alert_id"] in queue_ids(attending), hub, 60, what="escalation to the attending"
        )
        escalated = next(
            a for a in attending.get("/api/v1/alerts").json() if a["alert_id"] == alert["alert_id"]
        )
        assert escalated["escalation_level"] >= 1
        assert escalated["current_recipient"] == "attending physician"
        assert alert["alert_id"] in queue_ids(resident), "still open for the first recipient too"


def read_events(lines: Iterator[str], want: int, timeout: float) -> list[dict[str, Any]]:
    """Parse server-sent events off a streaming response's lines until `want` of them arrived."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for line in lines:
        if line.startswith("event:"):
            current["event"] = line[6:].strip()
        elif line.startswith("id:"):
            current["id"] = line[3:].strip()
        elif line.startswith("data:"):
            current["data"] = json.loads(line[5:])
        elif line == "" and current:
            events.append(current)
            current = {}
            if len(events) >= want:
                break
        if time.monotonic() > deadline:
            break
    return events


def test_the_live_feed_pushes_new_alerts_and_resumes_from_the_last_event(hub: HubEnv, tmp_path: Path) -> None:
    hub.start_worker()
    with console_server(hub) as server:
        token = server.token("dr.icu")
        headers = {"Authorization": f"Bearer {token}"}
        publisher = make_publisher(hub.settings, "H001")
        with httpx.stream(
            "GET", f"{server.url}/api/v1/alerts/events", headers=headers, timeout=httpx.Timeout(60, read=60)
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = read_events(lines, 1, 30)
            assert first[0]["event"] == "snapshot"
            publisher.publish_lab(lab_record("H001", "K", 7.1, "mmol/L", mrn="MRN-FEED-1"))
            pushed = read_events(lines, 1, 60)
        assert pushed[0]["event"] == "alert"
        assert pushed[0]["data"]["in_queue"] is True
        assert pushed[0]["data"]["alert"]["patient"]["mrn"] == "MRN-FEED-1"
        last_id = pushed[0]["id"]

        # while disconnected another alert is raised; the reconnect with Last-Event-ID brings it
        publisher.publish_lab(lab_record("H001", "NA", 112.0, "mmol/L", mrn="MRN-FEED-2"))
        publisher.close()
        wait_for_alert(server, server.api("dr.icu"), "MRN-FEED-2")
        with httpx.stream(
            "GET",
            f"{server.url}/api/v1/alerts/events",
            headers={**headers, "Last-Event-ID": last_id},
            timeout=httpx.Timeout(60, read=60),
        ) as response:
            # changes from a little before the last event id (the store may commit late): FEED-1 again
            resumed = read_events(response.iter_lines(), 2, 30)
        assert {event["event"] for event in resumed} == {"alert"}, (
            "a resumed feed sends changes, not a snapshot"
        )
        mrns = {event["data"]["alert"]["patient"]["mrn"] for event in resumed}
        assert "MRN-FEED-2" in mrns
