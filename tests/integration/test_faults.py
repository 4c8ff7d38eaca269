"""Fault tests on the real stack: every event Kafka acknowledged ends in the store exactly once.

Shared check (../shared/reference/faust-reliability.md): A = events whose publish was acknowledged;
the store has a unique key per event; pass when A is in the store, nothing twice, one alert per
critical result.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from clinhub.infra import postgres
from clinhub.infra.process import free_port
from clinhub.provision import provision
from producers.publisher import Receipt, make_publisher
from producers.simulator import simulate_labs
from sinks.models import Alert, IngestLog, Observation
from streams.runtime.stalls import group_positions
from streams.runtime.store_consumer import store_group
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


OUTAGE_SECONDS = 120  # "for minutes" (faust-reliability.md, test 4); the store's retry delay tops out at 2 s


def worker_rss_bytes(proc: subprocess.Popen[bytes]) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for worker {proc.pid}")


def store_positions(hub: HubEnv) -> dict[tuple[str, int], int]:
    """The store consumer group's committed offsets on the standard lab topic."""
    topic = hub.topics.norm("lab")
    partitions = [(topic, p) for p in range(hub.settings.kafka.topic_partitions)]
    committed, _ends = group_positions(
        hub.settings.kafka.client_config(), store_group(hub.settings.stream.app_id), partitions
    )
    return committed


def store_lag(port: int, topic: str) -> float | None:
    """The store stage's lag on `topic` as the worker's /metrics shows it (None before the first report)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "clinhub_consumer_lag_messages" and sample.labels == {
                "stage": "store",
                "topic": topic,
            }:
                return float(sample.value)
    return None


def test_database_outage_for_minutes_loses_nothing_and_holds_memory(
    hub: HubEnv, postgres_cluster: Any
) -> None:
    """PostgreSQL is down for two minutes while two bursts arrive. The store consumer's committed
    offsets stay where the store is; the worker's memory does not grow with the backlog (the second
    burst doubles it); the lag operators watch grows, and once the database is back the backlog drains,
    every event stored once."""
    metrics_port = free_port()
    worker = hub.start_worker({"CLINHUB_INFRA_METRICS_PORT": str(metrics_port)})
    before = publish(hub, traffic(seed=1, count=40))
    wait_for(lambda: stored_counts(hub, before)[1] == len(before), hub, what="first traffic stored")
    wait_for(lambda: hub.caught_up(store_group(hub.settings.stream.app_id), hub.topics.norm("lab")), hub)
    positions_at_outage = store_positions(hub)

    started = time.monotonic()
    postgres.stop(postgres_cluster)
    try:
        # Kafka keeps accepting while the store is down; normaliser and clinical keep going.
        first_burst = publish(hub, traffic(seed=2, count=3000))
        time.sleep(max(0.0, started + OUTAGE_SECONDS / 2 - time.monotonic()))
        rss_after_first = worker_rss_bytes(worker)
        assert store_positions(hub) == positions_at_outage, "the store group committed past the store"
        second_burst = publish(hub, traffic(seed=3, count=3000))
        time.sleep(max(0.0, started + OUTAGE_SECONDS - time.monotonic()))
        rss_after_second = worker_rss_bytes(worker)
        assert store_positions(hub) == positions_at_outage, "the store group committed past the store"
        lag_during = store_lag(metrics_port, hub.topics.norm("lab"))
        assert lag_during is not None and lag_during > 0, f"the store's lag on /metrics: {lag_during}"
        assert worker.poll() is None, hub.worker_log()
    finally:
        postgres.start(postgres_cluster)
    hub.engine.dispose()  # drop the test's own dead connections

    during = first_burst | second_burst
    wait_for(lambda: stored_counts(hub, during)[1] == len(during), hub, 240, what="backlog drained")
    wait_for(
        lambda: hub.caught_up(store_group(hub.settings.stream.app_id), hub.topics.norm("lab")),
        hub,
        60,
        what="the store group's lag drained",
    )
    assert_exactly_once(hub, before | during)
    assert "store batch failed" in hub.worker_log(), "the outage was really seen and retried"
    wait_for(lambda: store_lag(metrics_port, hub.topics.norm("lab")) == 0, hub, 30, what="lag 0 on /metrics")
    growth = rss_after_second - rss_after_first
    print(f"worker RSS {rss_after_first / 2**20:.0f} MiB -> {rss_after_second / 2**20:.0f} MiB")
    # The backlog doubled (3,000 more events, about 3 MB on the wire); what the store stage holds is
    # one batch plus librdkafka's bounded prefetch (16 MiB), so memory must not grow by the backlog.
    assert growth < 48 * 2**20, f"worker memory grew {growth / 2**20:.0f} MiB with the backlog"


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
    group = store_group(hub.settings.stream.app_id)
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
    # clinical agent raises every alert again (same ids), the store stage writes everything again.
    replay_app = hub.settings.stream.app_id + "-replay"  # group id = app id
    replay = hub.settings.model_copy(
        update={"stream": hub.settings.stream.model_copy(update={"app_id": replay_app})}
    )
    provision(replay)  # the stage principals' ACLs for that app id and group, as `clinhub topics` makes them
    hub.start_worker({"CLINHUB_STREAM_APP_ID": replay_app})

    def replayed() -> bool:
        again = hub.consume_all(hub.topics.alerts_topic, 3, lambda m: False)
        return len(again) >= 2 * len(first_pass)

    wait_for(replayed, hub, 120, what="the replay re-raising every alert")
    second_pass = [decode(m.value()) for m in hub.consume_all(hub.topics.alerts_topic, 5, lambda m: False)]
    assert {str(a["alert_id"]) for a in second_pass} == {str(a["alert_id"]) for a in first_pass}
    replay_group = store_group(hub.settings.stream.app_id + "-replay")
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
