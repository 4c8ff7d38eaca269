"""SIGKILL at the two moments that matter for an external store (faust-reliability.md, test 2):

- between consuming a batch and committing it in the store: nothing of it is stored, and the
  restarted worker stores all of it, once;
- between the store commit and the offset commit: all of it is stored, the offsets are behind, and
  the restarted worker reads the batch again without storing anything twice.

The worker is started again on its own data dir, so it is the same static group member (its instance id
derives from it, streams/runtime/membership.py) and takes its partitions back at once rather than after
the session timeout. How long after its start it stored events again (and raised their alerts) is
printed (run with -s), with where its start-up's seconds went, as is how long after its SIGTERM a
cleanly stopped worker's events were stored by the worker left; no timed assertion.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from sqlalchemy import text

from streams.runtime.store_consumer import store_group
from tests.integration.conftest import HubEnv
from tests.integration.test_faults import assert_exactly_once, publish, stored_counts, traffic
from tests.integration.test_faults_more import install_trigger, next_worker_log, print_alert_gap, print_gap
from tests.integration.test_lab_path import wait_for


def worker_slot(hub: HubEnv, name: str) -> dict[str, str]:
    """The environment of one worker slot: the same data dir, so the same static group member."""
    return {"CLINHUB_STREAM_DATA_DIR": str(hub.workdir / f"slot-{name}")}


# Milestones of a worker's start in its log: the command's ("2026-12-02 00:46:15,044 INFO name: ...")
# until Faust starts, then Faust's ("[2026-12-02 00:46:15,044] [pid] [INFO] ...")
START_UP = {
    "imported": "start_up: modules imported",
    "Kafka access checked": "start_up: Kafka access checked",
    "components built": "start_up: components built",
    "Faust started": "[^Worker]: Starting",
    "Faust group joined": "Joined group",
    "Faust ready": "[^Worker]: Ready",
    "store consumer assigned": "store consumer assigned",
}
LOGGED_AT = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]?")


def print_start_up(log: Path, since: dt.datetime) -> None:
    """Print when each start-up milestone came after `since`: where a restart's seconds go."""
    marks = []
    for line in log.read_text(errors="replace").splitlines():
        stamp = LOGGED_AT.match(line)
        for name, text_ in START_UP.items():
            if stamp and text_ in line and name not in dict(marks):
                local = dt.datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S,%f").astimezone()
                marks.append((name, (local - since).total_seconds()))
    print("  its start-up: " + ", ".join(f"{name} {after:.2f} s" for name, after in marks))


def sequence_called(hub: HubEnv, sequence: str) -> bool:
    """Has nextval been called on this sequence? Sequences are not transactional: another session's call
    shows at once, even from inside its uncommitted transaction."""
    with hub.engine.connect() as conn:
        called = text("SELECT last_value IS NOT NULL FROM pg_sequences WHERE sequencename = :name")
        return bool(conn.execute(called, {"name": sequence}).scalar_one())


def test_killed_between_consume_and_store_commit(hub: HubEnv) -> None:
    with hub.engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE stall_once_seq"))
        conn.execute(text("CREATE SEQUENCE stall_release_seq"))
    # Sequences are not rolled back: this holds the store's first insert statement only, until the test
    # releases it. (The store's own role runs it: its session's wait events, and ending its backend, are
    # not the owner's to see or do, so the test watches and releases through sequences instead.)
    install_trigger(
        hub,
        "stall_once",
        "IF nextval('stall_once_seq') = 1 THEN"
        " WHILE NOT (SELECT is_called FROM stall_release_seq) LOOP PERFORM pg_sleep(0.1); END LOOP;"
        " END IF;",
    )
    acknowledged = publish(hub, traffic(seed=21, count=60))
    worker = hub.start_worker(worker_slot(hub, "a"))
    wait_for(
        lambda: sequence_called(hub, "stall_once_seq"),
        hub,
        what="the store stage inside its first transaction",
    )

    hub.stop_worker(worker, kill=True)
    with hub.engine.connect() as conn:
        # The server notices the dead client only once its statement ends: end it now. Its transaction,
        # never committed, is rolled back.
        conn.execute(text("SELECT nextval('stall_release_seq')"))
    assert stored_counts(hub, acknowledged) == (0, 0), "the killed batch was not committed"

    restarted, log = dt.datetime.now(dt.UTC), next_worker_log(hub)
    hub.start_worker(worker_slot(hub, "a"))
    wait_for(
        lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged),
        hub,
        180,
        what="all stored on restart",
    )
    print_gap(hub, "killed before its store commit, started again: from its start", restarted, acknowledged)
    print_start_up(log, restarted)
    group = store_group(hub.settings.stream.app_id)
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    assert_exactly_once(hub, acknowledged)


def test_killed_between_store_commit_and_offset_commit(hub: HubEnv) -> None:
    group = store_group(hub.settings.stream.app_id)
    acknowledged = publish(hub, traffic(seed=22, count=60))
    slot = worker_slot(hub, "a")
    worker = hub.start_worker({**slot, "CLINHUB_STREAM_COMMIT_INTERVAL_SECONDS": "600"})  # offsets wait
    wait_for(lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged), hub, what="all stored")

    hub.stop_worker(worker, kill=True)
    assert not hub.caught_up(group, hub.topics.norm("lab")), "killed before the offsets were committed"
    later = publish(hub, traffic(seed=23, count=40))  # wait for the worker to come back
    acknowledged |= later

    restarted, log = dt.datetime.now(dt.UTC), next_worker_log(hub)
    hub.start_worker(slot)  # reads the stored batch again from the last committed offsets
    wait_for(lambda: hub.caught_up(group, hub.topics.norm("lab")), hub, 180, what="the batch re-read")
    wait_for(lambda: stored_counts(hub, later)[1] == len(later), hub, 60, what="the later events stored")
    print_gap(hub, "killed before its offset commit, started again: from its start", restarted, later)
    print_alert_gap(hub, "  and their alerts", restarted, later, hub.settings.stream.app_id)
    print_start_up(log, restarted)
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    assert_exactly_once(hub, acknowledged)
    with hub.engine.connect() as conn:
        alerts = conn.execute(text("select count(*) from alerts")).scalar_one()
    assert alerts > 0, "the traffic had critical results, each alerted once"


def test_a_cleanly_stopped_workers_partitions_move_to_the_worker_left_at_once(hub: HubEnv) -> None:
    """A static member does not leave its group when it closes; the worker leaves explicitly on a clean
    stop, so its partitions move at once, not after the session timeout (10 s here)."""
    group = store_group(hub.settings.stream.app_id)
    leaving = hub.start_worker(worker_slot(hub, "a"))
    staying = hub.start_worker(worker_slot(hub, "b"))
    acknowledged = publish(hub, traffic(seed=24, count=60))
    wait_for(lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged), hub, 120, what="all stored")
    log_of_b = hub.workdir / "worker-1.log"
    wait_for(lambda: "store consumer assigned" in log_of_b.read_text(), hub, 60, what="both workers joined")

    stopped = dt.datetime.now(dt.UTC)
    leaving.terminate()  # SIGTERM
    # published while it stops: those on its partitions wait for the hand-over to the worker left
    after = publish(hub, traffic(seed=25, count=60))
    acknowledged |= after
    leaving.wait(60)
    hub.workers.remove(leaving)
    exited = (dt.datetime.now(dt.UTC) - stopped).total_seconds()
    wait_for(lambda: stored_counts(hub, after)[1] == len(after), hub, 120, what="stored by the worker left")
    print_gap(hub, "a worker stopped cleanly, the other's: from its SIGTERM", stopped, after)
    what = f"  and their alerts (it had exited {exited:.2f} s after its SIGTERM)"
    print_alert_gap(hub, what, stopped, after, hub.settings.stream.app_id)
    assert staying.poll() is None
    wait_for(lambda: hub.caught_up(group, hub.topics.alerts_topic), hub, 60, what="alerts stored")
    assert_exactly_once(hub, acknowledged)
