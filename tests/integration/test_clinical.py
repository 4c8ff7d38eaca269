"""Critical-value alerting on the real broker: escalation until acknowledged, state across restarts, each
alert once on alerts.critical and its changes on the compacted alerts.state."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from producers.publisher import make_publisher
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from streams.domain.reference import DATA_DIR
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for


def fast_escalation(tmp_path: Path, minutes: float) -> dict[str, str]:
    """Reference data whose acknowledgement deadlines are seconds, not minutes, and a quick timer."""
    folder = tmp_path / "reference"
    shutil.copytree(DATA_DIR, folder)
    rules_path = folder / "critical_rules.json"
    rules = json.loads(rules_path.read_text())
    deadlines = rules["escalation"]["ack_deadline_minutes"]
    rules["escalation"]["ack_deadline_minutes"] = dict.fromkeys(deadlines, minutes)
    rules["escalation"]["repeat_minutes"] = minutes
    rules_path.write_text(json.dumps(rules))
    return {"CLINHUB_STREAM_REFERENCE_DIR": str(folder), "CLINHUB_STREAM_ESCALATION_CHECK_SECONDS": "0.5"}


def decoded(hub: HubEnv, topic: str, timeout: float, until: Any = lambda m: False) -> list[dict[str, Any]]:
    decode = hub.decoder()
    return [decode(m.value()) for m in hub.consume_all(topic, timeout, until)]


def alerts_for(hub: HubEnv, event_ids: set[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def collect() -> bool:
        for alert in decoded(hub, hub.topics.alerts_topic, 3):
            if str(alert["source_event_id"]) in event_ids:
                found[str(alert["source_event_id"])] = alert
        return set(found) == event_ids

    wait_for(collect, hub, timeout, what=f"alerts for {event_ids}")
    return found


def acknowledge(hub: HubEnv, alert: dict[str, Any]) -> None:
    encoder = make_encoder(
        ConfluentRegistry(hub.settings.registry.client_config()),
        standard.load(standard.ALERT_ACKNOWLEDGEMENT),
    )
    record = {
        "ack_id": str(uuid.uuid4()),
        "alert_id": str(alert["alert_id"]),
        "acknowledged_by": "DR0042",
        "role": "attending",
        "channel": "PHONE",
        "read_back": True,
        "acknowledged_time": dt.datetime.now(dt.UTC),
        "note": "read back 6.9 mmol/L",
        "regional_patient_id": alert["regional_patient_id"],
    }
    producer = hub.producer()
    producer.produce(hub.topics.acks_topic, key=alert["regional_patient_id"].encode(), value=encoder(record))
    assert producer.flush(30) == 0


def states_of(hub: HubEnv, alert_id: str, timeout: float) -> list[dict[str, Any]]:
    """The AlertState records of one alert on alerts.state, in order, each checked to be keyed by it; a
    change published again (a replay) counts once."""
    decode = hub.decoder()
    states: dict[str, dict[str, Any]] = {}
    for message in hub.consume_all(hub.topics.alert_states_topic, timeout, lambda m: False):
        state = decode(message.value())
        if str(state["alert_id"]) == alert_id:
            assert message.key() == alert_id.encode(), "keyed by alert id"
            states.setdefault(str(state["state_id"]), state)
    return list(states.values())


def escalations_by_alert(hub: HubEnv, timeout: float) -> dict[str, list[int]]:
    levels: dict[str, list[int]] = {}
    for escalation in decoded(hub, hub.topics.escalations_topic, timeout):
        levels.setdefault(str(escalation["alert_id"]), []).append(escalation["level"])
    return levels


def test_an_unacknowledged_alert_escalates_and_an_acknowledged_one_does_not(
    hub: HubEnv, tmp_path: Path
) -> None:
    publisher = make_publisher(hub.settings, "H001")
    ignored = lab_record("H001", "K", 6.9, "mmol/L", mrn="MRN-IGNORED")
    answered = lab_record("H001", "K", 6.9, "mmol/L", mrn="MRN-ANSWERED")
    publisher.publish_lab(ignored)
    publisher.publish_lab(answered)
    publisher.close()

    hub.start_worker(fast_escalation(tmp_path, minutes=0.2))  # 12 s to acknowledge
    alerts = alerts_for(hub, {ignored["envelope"]["event_id"], answered["envelope"]["event_id"]})
    acknowledge(hub, alerts[answered["envelope"]["event_id"]])
    ignored_id = str(alerts[ignored["envelope"]["event_id"]]["alert_id"])
    answered_id = str(alerts[answered["envelope"]["event_id"]]["alert_id"])

    wait_for(lambda: 2 in escalations_by_alert(hub, 2).get(ignored_id, []), hub, 90, what="second escalation")
    levels = escalations_by_alert(hub, 3)
    assert sorted(set(levels[ignored_id]))[:2] == [1, 2], "escalates level by level until acknowledged"
    assert answered_id not in levels, "an acknowledged alert never escalates"

    # alerts.state: the latest state of each alert, as a reader of that topic alone sees it
    answered_changes = [(s["change"], s["status"]) for s in states_of(hub, answered_id, 3)]
    assert answered_changes == [("OPENED", "OPEN"), ("ACKNOWLEDGED", "ACKNOWLEDGED")]
    ignored_states = states_of(hub, ignored_id, 3)
    assert ignored_states[0]["change"] == "OPENED"
    assert [s["escalation_level"] for s in ignored_states if s["change"] == "ESCALATED"][:2] == [1, 2]
    assert ignored_states[-1]["status"] == "OPEN"
    assert ignored_states[-1]["recipient"] is not None


def test_the_alert_state_topic_is_compacted(hub: HubEnv) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(hub.settings.kafka.client_config())
    resources = [
        ConfigResource("topic", hub.topics.alert_states_topic),
        ConfigResource("topic", hub.topics.alerts_topic),
    ]
    configs = {
        resource.name: future.result() for resource, future in admin.describe_configs(resources).items()
    }
    assert configs[hub.topics.alert_states_topic]["cleanup.policy"].value == "compact"
    assert configs[hub.topics.alerts_topic]["cleanup.policy"].value == "delete"


@pytest.mark.parametrize("local_state", ["kept", "deleted"])
def test_a_restart_keeps_suppression_state_and_escalation_timers(
    hub: HubEnv, tmp_path: Path, local_state: str
) -> None:
    """RocksDB tables: restarted on its own state (changelog tail only), or with it deleted (all of it)."""
    state_dir = tmp_path / "worker-state"
    env = {
        **fast_escalation(tmp_path, minutes=0.25),  # 15 s to acknowledge
        "CLINHUB_STREAM_TABLE_STORE": "rocksdb://",
        "CLINHUB_STREAM_DATA_DIR": str(state_dir),
    }
    publisher = make_publisher(hub.settings, "H002")
    first = lab_record("H002", "LAB0101", 6.9, "mmol/L", mrn="0000077777")
    earlier = first["result_time"] - dt.timedelta(minutes=40)
    first["result_time"] = first["envelope"]["event_time"] = earlier
    publisher.publish_lab(first)

    worker = hub.start_worker(env)
    alert = alerts_for(hub, {first["envelope"]["event_id"]})[first["envelope"]["event_id"]]
    hub.stop_worker(worker)
    assert any(state_dir.rglob("*.sst")) or any(state_dir.rglob("*.log")), "tables were on RocksDB"
    if local_state == "deleted":
        shutil.rmtree(state_dir)

    repeat = lab_record("H002", "LAB0101", 6.7, "mmol/L", mrn="0000077777")  # critical again, but not worse
    repeat["result_time"] = repeat["envelope"]["event_time"] = earlier + dt.timedelta(minutes=30)
    publisher.publish_lab(repeat)
    publisher.close()

    hub.start_worker(env)  # same app id: tables recover from their changelogs (all, or past the local state)

    def suppressed_count() -> int:
        states = states_of(hub, str(alert["alert_id"]), 2)
        return max((s["suppressed_repeats"] for s in states), default=0)

    wait_for(lambda: suppressed_count() == 1, hub, 90, what="the repeat counted on the open alert")
    changes = [s["change"] for s in states_of(hub, str(alert["alert_id"]), 2)]
    assert changes[0] == "OPENED" and changes.count("REPEAT") == 1
    same_alert = [a for a in decoded(hub, hub.topics.alerts_topic, 2) if a["alert_id"] == alert["alert_id"]]
    assert [a["suppressed_repeats"] for a in same_alert] == [0], "the repeat is a state, not the alert again"
    new_alerts = [
        a
        for a in decoded(hub, hub.topics.alerts_topic, 2)
        if str(a["source_event_id"]) == repeat["envelope"]["event_id"]
    ]
    assert new_alerts == [], "the restarted worker remembered the open alert and suppressed the repeat"
    wait_for(
        lambda: 1 in escalations_by_alert(hub, 2).get(str(alert["alert_id"]), []),
        hub,
        90,
        what="the escalation timer, restored from the changelog, fires after the restart",
    )
