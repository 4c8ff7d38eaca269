"""Fault tests on the real stack: every event Kafka acknowledged ends in the store exactly once.

Shared check (../shared/reference/faust-reliability.md): A = events whose publish was acknowledged;
the store has a unique key per event; pass when A is in the store, nothing twice, one alert per
critical result.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select

from clinhub.infra import postgres
from producers.publisher import Receipt, make_publisher
from producers.simulator import simulate_labs
from sinks.models import Alert, IngestLog, Observation
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for


def publish(hub: HubEnv, records: list[dict[str, Any]]) -> set[str]:
    """Publish per institution; returns the event ids Kafka acknowledged (set A)."""
    acknowledged: set[str] = set()
    for institution in sorted({r["envelope"]["institution_id"] for r in records}):
        publisher = make_publisher(hub.settings, institution)
        mine = [r for r in records if r["envelope"]["institution_id"] == institution]
        acknowledged |= {r.event_id for r in publisher.publish_many_labs(mine) if isinstance(r, Receipt)}
        publisher.close()
    return acknowledged


def traffic(seed: int, count: int) -> list[dict[str, Any]]:
    return [
        r for r in simulate_labs(seed, count, critical_share=0.2) if r["envelope"]["institution_id"] != "C003"
    ]


def stored_counts(hub: HubEnv, event_ids: set[str]) -> tuple[int, int]:
    """(rows for these events, distinct events among them) in the observations table."""
    with hub.engine.connect() as conn:
        rows = conn.execute(
            select(func.count(), func.count(func.distinct(Observation.event_id))).where(
                Observation.event_id.in_(event_ids)
            )
        ).one()
    return int(rows[0]), int(rows[1])


def assert_exactly_once(hub: HubEnv, acknowledged: set[str]) -> None:
    rows, distinct = stored_counts(hub, acknowledged)
    assert distinct == len(acknowledged), f"{len(acknowledged) - distinct} acknowledged events are missing"
    assert rows == distinct, f"{rows - distinct} duplicate rows"
    with hub.engine.connect() as conn:
        logged = conn.execute(
            select(func.count()).select_from(IngestLog).where(IngestLog.event_id.in_(acknowledged))
        ).scalar_one()
        per_result = conn.execute(
            select(Alert.source_event_id, Alert.limit_kind, func.count())
            .where(Alert.source_event_id.in_(acknowledged))
            .group_by(Alert.source_event_id, Alert.limit_kind)
        ).all()
    assert logged == len(acknowledged)
    assert all(count == 1 for _, _, count in per_result), "one alert per critical result"


def test_database_outage_mid_stream_loses_and_duplicates_nothing(hub: HubEnv, postgres_cluster: Any) -> None:
    hub.start_worker()
    before = publish(hub, traffic(seed=1, count=40))
    wait_for(lambda: stored_counts(hub, before)[1] == len(before), hub, what="first traffic stored")

    postgres.stop(postgres_cluster)
    try:
        during = publish(hub, traffic(seed=2, count=60))  # Kafka keeps accepting while the store is down
        time.sleep(8)  # the store agent retries with back-off meanwhile, acking nothing
    finally:
        postgres.start(postgres_cluster)
    hub.engine.dispose()  # drop the test's own dead connections

    wait_for(lambda: stored_counts(hub, during)[1] == len(during), hub, 180, what="backlog drained")
    assert_exactly_once(hub, before | during)
    assert "store batch failed" in hub.worker_log(), "the outage was really seen and retried"


def test_processor_killed_mid_stream_resumes_without_loss_or_duplicates(hub: HubEnv) -> None:
    worker = hub.start_worker()
    first = publish(hub, traffic(seed=3, count=80))
    wait_for(lambda: stored_counts(hub, first)[1] > 0, hub, what="processing started")
    hub.stop_worker(worker, kill=True)  # SIGKILL: no shutdown, no final commit

    second = publish(hub, traffic(seed=4, count=40))
    hub.start_worker()
    everything = first | second
    wait_for(
        lambda: stored_counts(hub, everything)[1] == len(everything),
        hub,
        180,
        what="all stored after restart",
    )
    assert_exactly_once(hub, everything)


def test_consumer_group_replay_from_zero_changes_nothing(hub: HubEnv) -> None:
    """Duplicate delivery: a second worker group reads everything again; the store stays the same."""
    worker = hub.start_worker()
    acknowledged = publish(hub, traffic(seed=5, count=40))
    wait_for(lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged), hub, what="stored")
    group = hub.settings.stream.app_id
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    hub.stop_worker(worker)
    with hub.engine.connect() as conn:
        before = sorted(
            conn.execute(select(Observation.event_id, Observation.value, Observation.status)).all()
        )
        alerts_before = conn.execute(select(func.count()).select_from(Alert)).scalar_one()

    decode = hub.decoder()
    first_pass = [decode(m.value()) for m in hub.consume_all(hub.topics.alerts_topic, 5, lambda m: False)]
    assert first_pass, "the traffic had critical values"

    # A new consumer group starts from offset 0 and re-reads every topic, with fresh tables: the
    # clinical agent raises every alert again (same ids), the store agent writes everything again.
    hub.start_worker({"CLINHUB_STREAM_APP_ID": hub.settings.stream.app_id + "-replay"})  # group id = app id

    def replayed() -> bool:
        again = hub.consume_all(hub.topics.alerts_topic, 3, lambda m: False)
        return len(again) >= 2 * len(first_pass)

    wait_for(replayed, hub, 120, what="the replay re-raising every alert")
    second_pass = [decode(m.value()) for m in hub.consume_all(hub.topics.alerts_topic, 5, lambda m: False)]
    assert {str(a["alert_id"]) for a in second_pass} == {str(a["alert_id"]) for a in first_pass}
    replay_group = hub.settings.stream.app_id + "-replay"
    wait_for(
        lambda: hub.caught_up(replay_group, hub.topics.alerts_topic), hub, 60, what="replay stored the alerts"
    )
    wait_for(
        lambda: hub.caught_up(replay_group, hub.topics.norm("lab")), hub, 60, what="replay stored the labs"
    )
    with hub.engine.connect() as conn:
        after = sorted(
            conn.execute(select(Observation.event_id, Observation.value, Observation.status)).all()
        )
        alerts_after = conn.execute(select(func.count()).select_from(Alert)).scalar_one()
    assert after == before
    assert alerts_after == alerts_before
    assert_exactly_once(hub, acknowledged)
