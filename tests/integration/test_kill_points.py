"""SIGKILL at the two moments that matter for an external store (faust-reliability.md, test 2):

- between consuming a batch and committing it in the store: nothing of it is stored, and the
  restarted worker stores all of it, once;
- between the store commit and the offset commit: all of it is stored, the offsets are behind, and
  the restarted worker reads the batch again without storing anything twice.
"""

from __future__ import annotations

from sqlalchemy import text

from streams.runtime.store_consumer import store_group
from tests.integration.conftest import HubEnv
from tests.integration.test_faults import assert_exactly_once, publish, stored_counts, traffic
from tests.integration.test_faults_more import install_trigger
from tests.integration.test_lab_path import wait_for


def stalled_backends(hub: HubEnv) -> list[int]:
    with hub.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "select pid from pg_stat_activity"
                    " where datname = current_database() and wait_event = 'PgSleep'"
                )
            ).scalars()
        )


def test_killed_between_consume_and_store_commit(hub: HubEnv) -> None:
    with hub.engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE stall_once_seq"))
    # sequences are not rolled back: this stalls the store's first insert statement only
    install_trigger(hub, "stall_once", "IF nextval('stall_once_seq') = 1 THEN PERFORM pg_sleep(600); END IF;")
    acknowledged = publish(hub, traffic(seed=21, count=60))
    worker = hub.start_worker()
    wait_for(lambda: bool(stalled_backends(hub)), hub, what="the store stage inside its first transaction")

    hub.stop_worker(worker, kill=True)
    with hub.engine.connect() as conn:
        # The server would notice the dead client only when its statement ends; end it now.
        for pid in stalled_backends(hub):
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
    assert stored_counts(hub, acknowledged) == (0, 0), "the killed batch was not committed"

    hub.start_worker()
    wait_for(
        lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged),
        hub,
        180,
        what="all stored on restart",
    )
    group = store_group(hub.settings.stream.app_id)
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    assert_exactly_once(hub, acknowledged)


def test_killed_between_store_commit_and_offset_commit(hub: HubEnv) -> None:
    group = store_group(hub.settings.stream.app_id)
    acknowledged = publish(hub, traffic(seed=22, count=60))
    worker = hub.start_worker({"CLINHUB_STREAM_COMMIT_INTERVAL_SECONDS": "600"})  # offsets wait
    wait_for(lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged), hub, what="all stored")

    hub.stop_worker(worker, kill=True)
    assert not hub.caught_up(group, hub.topics.norm("lab")), "killed before the offsets were committed"

    hub.start_worker()  # reads the stored batch again from the last committed offsets
    wait_for(lambda: hub.caught_up(group, hub.topics.norm("lab")), hub, 180, what="the batch re-read")
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    assert_exactly_once(hub, acknowledged)
    with hub.engine.connect() as conn:
        alerts = conn.execute(text("select count(*) from alerts")).scalar_one()
    assert alerts > 0, "the traffic had critical results, each alerted once"
