"""Behaviour of the regional store, dialect-independent: these run here on SQLite, and the very same
functions run on PostgreSQL from tests/integration/test_store.py, which overrides the two fixtures
`engine` (a migrated database) and `blank_engine` (a database with nothing in it)."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, func, insert, inspect, select
from sqlalchemy.exc import DBAPIError

from core.contract import KINDS
from sinks.base import StoreRecord, StoreWriteResult, write_records_isolating
from sinks.exceptions import StoreOutOfDateError, StoreRejectedError
from sinks.metrics import make_sink_metrics
from sinks.models import CONSOLE_TABLES, AuditEntry, Base
from sinks.queries import InvalidCursorError, TimelineEntry, latest_by_analyte, patient_timeline
from sinks.sql import (
    ALERT_HISTORY,
    ALERTS,
    DEAD_LETTERS,
    ENCOUNTERS,
    INGEST_LOG,
    OBSERVATIONS,
    PATIENT_NAMES,
    PATIENTS,
    SqlStoreSink,
)
from sinks.store import current_revision, downgrade, ensure_current, head_revision, make_engine, upgrade
from tests.factories import regional_id
from tests.unit.sinks.factory import (
    NOW,
    ack_for,
    alert_for,
    dead_letter,
    escalation_for,
    first,
    identity,
    realistic_batch,
    revised,
    simulated,
    snapshot,
    state_for,
)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def blank_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'blank.sqlite3'}")
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW + dt.timedelta(minutes=1))


@pytest.fixture
def sink(engine: Engine, clock: Clock) -> SqlStoreSink:
    return SqlStoreSink(engine, clock=clock)


def rows(engine: Engine, table: Any, *where: Any) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(table).where(*where)).all())


def as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# -- idempotency -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second_delivery", "description"),
    [
        (lambda batch: batch, "the same batch"),
        (lambda batch: list(reversed(batch)), "the same records in reverse order"),
        (lambda batch: random.Random(7).sample(batch, len(batch)), "shuffled"),
        (lambda batch: batch[::2], "every other record"),
        (lambda batch: batch + batch, "each record twice in one batch"),
    ],
)
def test_replaying_leaves_every_table_unchanged(
    sink: SqlStoreSink, engine: Engine, clock: Clock, second_delivery: Callable[[Any], Any], description: str
) -> None:
    """Redelivery after a crash (consumer reset, replay) changes no row, not even a timestamp."""
    batch = realistic_batch(seed=11, count=300)
    first_result = sink.write_records(batch)
    before = snapshot(engine)
    assert sum(len(table) for table in before.values()) > 300

    clock.now += dt.timedelta(hours=1)  # a rewrite would show in ingested_time
    again = second_delivery(batch)
    result = sink.write_records(again)

    assert snapshot(engine) == before, description
    assert result.written == {}
    assert sum(result.unchanged.values()) == len(again)
    assert sum(first_result.written.values()) + sum(first_result.unchanged.values()) == len(batch)


def test_every_kind_is_counted_and_stored(sink: SqlStoreSink, engine: Engine) -> None:
    batch = realistic_batch(seed=12, count=200)
    result = sink.write_records(batch)
    kinds = {record.kind for record in batch}
    assert kinds == {
        "lab",
        "vitals",
        "encounter",
        "medication",
        "diagnosis",
        "alert",
        "escalation",
        "ack",
        "alert_state",
        "identity",
        "deadletter",
    }
    expected = {kind: sum(1 for record in batch if record.kind == kind) for kind in kinds}
    assert {k: result.written.get(k, 0) + result.unchanged.get(k, 0) for k in kinds} == expected
    tables = snapshot(engine)
    assert (
        len(tables["ingest_log"])
        == sum(expected[k] for k in ("lab", "vitals", "encounter", "medication"))
        + expected["diagnosis"]
        + expected["escalation"]
        + expected["ack"]
    )
    assert len(tables["alerts"]) == expected["alert"]
    assert len(tables["alert_history"]) == expected["alert_state"]
    assert len(tables["identifier_links"]) == expected["identity"]
    assert len(tables["dead_letters"]) == expected["deadletter"]


def test_no_national_identifier_reaches_the_store(sink: SqlStoreSink, engine: Engine) -> None:
    """The simulator's patients mostly carry national ids; none of them may appear in any table."""
    from producers.simulator import make_patients

    national_ids = {p.national_id for p in make_patients(random.Random(13), 12) if p.national_id}
    sink.write_records(simulated(seed=13, count=200))
    stored = "|".join(str(value) for table in snapshot(engine).values() for row in table for value in row)
    assert national_ids and not any(nid in stored for nid in national_ids)


def test_a_record_still_carrying_a_national_id_is_refused(sink: SqlStoreSink) -> None:
    lab = first(simulated(seed=14, count=20, kinds={"lab": 1.0}), "lab")
    lab["patient_national_id"] = "11010519491231002X"
    with pytest.raises(StoreRejectedError, match="patient_national_id"):
        sink.write_records([StoreRecord("lab", lab)])


# -- versions --------------------------------------------------------------------------------------

VERSIONED_KINDS = {
    # kind -> (field changed by the correction, corrected value, how to read it back)
    "lab": (
        "canonical_value",
        9.9,
        lambda e: rows(e, OBSERVATIONS.c.value, OBSERVATIONS.c.category == "laboratory"),
    ),
    "medication": ("dose_value", 250.0, lambda e: rows(e, select_column("medication_orders", "dose_value"))),
    "diagnosis": ("icd10_code", "E87.1", lambda e: rows(e, select_column("diagnoses", "icd10_code"))),
}


def select_column(table: str, column: str) -> Any:
    return Base.metadata.tables[table].c[column]


ORDERS = {
    "original, then correction": lambda o, c: [[o], [c]],
    "correction, then the original late": lambda o, c: [[c], [o]],
    "both in one batch": lambda o, c: [[o, c]],
    "both in one batch, correction first": lambda o, c: [[c, o]],
    "original, correction, original again": lambda o, c: [[o], [c], [o]],
}


@pytest.mark.parametrize("kind", sorted(VERSIONED_KINDS))
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_the_correction_wins_whatever_the_delivery_order(
    sink: SqlStoreSink, engine: Engine, kind: str, order: str
) -> None:
    field, corrected_value, read = VERSIONED_KINDS[kind]
    original = first(simulated(seed=21, count=30, kinds={kind: 1.0}), kind)
    changes: dict[str, Any] = {field: corrected_value}
    if kind == "lab":
        changes["status"] = "corrected"
    correction = revised(original, minutes_later=30, **changes)
    for batch in ORDERS[order](StoreRecord(kind, original), StoreRecord(kind, correction)):
        sink.write_records(batch)
    assert [row[0] for row in read(engine)] == [corrected_value]


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_a_vitals_correction_replaces_the_whole_set(sink: SqlStoreSink, engine: Engine, order: str) -> None:
    """A corrected set with fewer measurements retires the ones it dropped, even if it came first."""
    original = first(simulated(seed=22, count=40, kinds={"vitals": 1.0}), "vitals")
    while len(original["measurements"]) < 3:
        original = revised(original, 0, measurements=original["measurements"] * 2)
    kept = dict(original["measurements"][0], value=original["measurements"][0]["value"] + 1)
    correction = revised(original, minutes_later=10, status="corrected", measurements=[kept])
    for batch in ORDERS[order](StoreRecord("vitals", original), StoreRecord("vitals", correction)):
        sink.write_records(batch)
    live = rows(engine, OBSERVATIONS, OBSERVATIONS.c.status.not_in(["superseded", "cancelled"]))
    assert [(r.local_code, r.value, r.status) for r in live] == [
        (kept["local_code"], kept["value"], "corrected")
    ]
    timeline = patient_timeline(engine, original["regional_patient_id"]).entries
    assert [(e.kind, e.value) for e in timeline] == [("vitals", kept["value"])]


@pytest.mark.parametrize("reverse", [False, True])
def test_equal_event_times_are_decided_by_the_larger_event_id(
    sink: SqlStoreSink, engine: Engine, reverse: bool
) -> None:
    original = first(simulated(seed=23, count=20, kinds={"lab": 1.0}), "lab")
    a = revised(original, 0, canonical_value=1.0)
    b = revised(original, 0, canonical_value=2.0)
    a["envelope"]["event_id"] = uuid.UUID("00000000-0000-4000-8000-000000000001")
    b["envelope"]["event_id"] = uuid.UUID("ffffffff-0000-4000-8000-000000000001")
    for record in [b, a] if reverse else [a, b]:
        sink.write_records([StoreRecord("lab", record)])
    assert [r.value for r in rows(engine, OBSERVATIONS)] == [2.0]


def test_a_redelivered_event_id_changes_nothing_even_with_other_content(
    sink: SqlStoreSink, engine: Engine
) -> None:
    lab = first(simulated(seed=24, count=20, kinds={"lab": 1.0}), "lab")
    sink.write_records([StoreRecord("lab", lab)])
    tampered = dict(lab, canonical_value=123.0, envelope=dict(lab["envelope"], event_time=NOW))
    result = sink.write_records([StoreRecord("lab", tampered)])
    assert result == StoreWriteResult({}, {"lab": 1})
    assert [r.value for r in rows(engine, OBSERVATIONS)] == [lab["canonical_value"]]


@pytest.mark.parametrize("late_original", [False, True])
def test_cancelled_retracts_the_result(sink: SqlStoreSink, engine: Engine, late_original: bool) -> None:
    """A cancelled result keeps its row, marked cancelled, and leaves timeline and latest values."""
    labs = simulated(seed=25, count=60, kinds={"lab": 1.0})
    original = first(labs, "lab")
    patient = original["regional_patient_id"]
    cancel = revised(original, minutes_later=5, status="cancelled", canonical_value=None)
    batches = [[StoreRecord("lab", cancel)], [StoreRecord("lab", original)]]
    for batch in batches if late_original else reversed(batches):
        sink.write_records(batch)
    (row,) = rows(engine, OBSERVATIONS)
    assert row.status == "cancelled"
    assert patient_timeline(engine, patient).entries == []
    assert latest_by_analyte(engine, patient) == []


def test_latest_value_falls_back_when_the_newest_result_is_cancelled(
    sink: SqlStoreSink, engine: Engine
) -> None:
    older = first(simulated(seed=26, count=20, kinds={"lab": 1.0}), "lab")
    newer = revised(
        older,
        60,
        result_id=older["result_id"] + "-2",
        result_time=older["result_time"] + dt.timedelta(hours=1),
        canonical_value=7.0,
    )
    sink.write_records([StoreRecord("lab", older), StoreRecord("lab", newer)])
    patient = older["regional_patient_id"]
    assert [v.value for v in latest_by_analyte(engine, patient)] == [7.0]
    sink.write_records([StoreRecord("lab", revised(newer, 5, status="cancelled"))])
    assert [v.value for v in latest_by_analyte(engine, patient)] == [older["canonical_value"]]


# -- encounters ------------------------------------------------------------------------------------


def _stay(seed: int) -> list[dict[str, Any]]:
    base = first(simulated(seed=seed, count=30, kinds={"encounter": 1.0}), "encounter")
    admit = revised(
        base,
        0,
        event_type="ADMIT",
        ward="ED",
        bed="ED-01",
        admit_time=base["occurred_time"],
        discharge_time=None,
        encounter_class="EMERGENCY",
    )
    transfer = revised(
        base,
        60,
        event_type="TRANSFER",
        ward="ICU",
        bed="ICU-07",
        prior_ward="ED",
        admit_time=None,
        discharge_time=None,
        encounter_class="INPATIENT",
        occurred_time=base["occurred_time"] + dt.timedelta(hours=1),
    )
    update_ = revised(
        base,
        90,
        event_type="UPDATE",
        ward=None,
        bed=None,
        admit_time=None,
        discharge_time=None,
        encounter_class="UNKNOWN",
        occurred_time=base["occurred_time"] + dt.timedelta(minutes=90),
    )
    discharge = revised(
        base,
        180,
        event_type="DISCHARGE",
        ward=None,
        bed=None,
        admit_time=None,
        discharge_time=base["occurred_time"] + dt.timedelta(hours=3),
        encounter_class="UNKNOWN",
        occurred_time=base["occurred_time"] + dt.timedelta(hours=3),
    )
    return [admit, transfer, update_, discharge]


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(4)))[::3])
@pytest.mark.parametrize("one_batch", [False, True])
def test_adt_events_in_any_order_end_in_the_same_encounter_state(
    sink: SqlStoreSink, engine: Engine, permutation: tuple[int, ...], one_batch: bool
) -> None:
    events = _stay(seed=31)
    admit, _transfer, _update, discharge = events
    shuffled = [StoreRecord("encounter", events[i]) for i in permutation]
    for batch in [shuffled] if one_batch else [[record] for record in shuffled]:
        sink.write_records(batch)
    (encounter,) = rows(engine, ENCOUNTERS)
    assert (encounter.ward, encounter.bed, encounter.status, encounter.encounter_class) == (
        "ICU",
        "ICU-07",
        "finished",
        "INPATIENT",
    )
    assert (as_utc(encounter.admit_time), as_utc(encounter.discharge_time)) == (
        admit["admit_time"],
        discharge["discharge_time"],
    )
    assert encounter.last_event_type == "DISCHARGE"
    assert len(rows(engine, Base.metadata.tables["encounter_events"])) == 4


def test_a_cancelled_encounter_leaves_the_timeline(sink: SqlStoreSink, engine: Engine) -> None:
    admit = _stay(seed=32)[0]
    cancel = revised(admit, 10, event_type="CANCEL", admit_time=None)
    sink.write_records([StoreRecord("encounter", admit)])
    patient = admit["regional_patient_id"]
    assert [e.code for e in patient_timeline(engine, patient).entries] == ["ADMIT"]
    sink.write_records([StoreRecord("encounter", cancel)])
    assert patient_timeline(engine, patient).entries == []


# -- alerts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repeats", "stored"),
    [([0], 0), ([2, 5, 3], 5), ([5, 2], 5), ([1, 1, 1], 1), ([0, 4], 4)],
)
def test_an_alert_keeps_the_highest_suppressed_repeats(
    sink: SqlStoreSink, engine: Engine, repeats: list[int], stored: int
) -> None:
    lab = first(simulated(seed=41, count=20, kinds={"lab": 1.0}), "lab")
    for count in repeats:
        sink.write_records([StoreRecord("alert", alert_for(lab, count))])
    (alert,) = rows(engine, ALERTS)
    assert alert.suppressed_repeats == stored


@pytest.mark.parametrize("alert_last", [False, True])
def test_escalations_and_acknowledgements_update_the_alert_in_any_order(
    sink: SqlStoreSink, engine: Engine, alert_last: bool
) -> None:
    lab = first(simulated(seed=42, count=20, kinds={"lab": 1.0}), "lab")
    alert = alert_for(lab)
    lifecycle = [
        StoreRecord("escalation", escalation_for(alert, 2)),
        StoreRecord("escalation", escalation_for(alert, 1)),
        StoreRecord("ack", ack_for(alert, 40, by="DR0002")),
        StoreRecord("ack", ack_for(alert, 35, by="DR0001")),
    ]
    head = [StoreRecord("alert", alert)]
    for record in lifecycle + head if alert_last else head + lifecycle:
        sink.write_records([record])
    (row,) = rows(engine, ALERTS)
    assert (row.escalation_level, row.escalation_recipient) == (2, "department head")
    assert (row.acknowledged_by, row.ack_channel) == ("DR0001", "PHONE")
    assert as_utc(row.acknowledged_time) == alert["raised_time"] + dt.timedelta(minutes=35)
    assert len(rows(engine, Base.metadata.tables["alert_escalations"])) == 2
    assert len(rows(engine, Base.metadata.tables["alert_acknowledgements"])) == 2


def _alert_life(alert: dict[str, Any]) -> list[StoreRecord]:
    """An alert as the clinical stage now publishes it: once, then its state changes on alerts.state."""
    return [
        StoreRecord("alert", alert),
        StoreRecord("alert_state", state_for(alert, "OPENED")),
        *(StoreRecord("alert_state", state_for(alert, "REPEAT", n, minutes=n)) for n in (1, 2, 3)),
        StoreRecord("alert_state", state_for(alert, "NOTE", 3, minutes=4, note="a late result came in")),
        StoreRecord("alert_state", state_for(alert, "ESCALATED", 3, minutes=15, level=1)),
        StoreRecord(
            "alert_state", state_for(alert, "ACKNOWLEDGED", 3, minutes=20, level=1, acknowledged_by="DR7")
        ),
    ]


def test_the_store_keeps_an_alert_and_its_history(sink: SqlStoreSink, engine: Engine) -> None:
    lab = first(simulated(seed=43, count=20, kinds={"lab": 1.0}), "lab")
    alert = alert_for(lab)
    result = sink.write_records(_alert_life(alert))
    assert result.written == {"alert": 1, "alert_state": 7}
    (row,) = rows(engine, ALERTS)
    assert row.suppressed_repeats == 3
    history = sorted(rows(engine, ALERT_HISTORY), key=lambda h: h.changed_time)
    assert [(h.change, h.status, h.suppressed_repeats, h.escalation_level) for h in history] == [
        ("OPENED", "OPEN", 0, 0),
        ("REPEAT", "OPEN", 1, 0),
        ("REPEAT", "OPEN", 2, 0),
        ("REPEAT", "OPEN", 3, 0),
        ("NOTE", "OPEN", 3, 0),
        ("ESCALATED", "OPEN", 3, 1),
        ("ACKNOWLEDGED", "ACKNOWLEDGED", 3, 1),
    ]
    assert {h.alert_id for h in history} == {str(alert["alert_id"])}
    assert [h.note for h in history if h.note] == ["a late result came in"]
    acknowledged = history[-1]
    assert (acknowledged.acknowledged_by, acknowledged.next_deadline_time) == ("DR7", None)
    assert as_utc(acknowledged.acknowledged_time) == alert["raised_time"] + dt.timedelta(minutes=20)
    assert history[-2].recipient == "attending physician"


def test_a_redelivered_state_change_changes_nothing(sink: SqlStoreSink, engine: Engine) -> None:
    lab = first(simulated(seed=44, count=20, kinds={"lab": 1.0}), "lab")
    life = _alert_life(alert_for(lab))
    sink.write_records(life)
    before = snapshot(engine)
    again = sink.write_records(life[1:] + life[3:5])  # whole and twice within one batch
    assert again.written == {}
    assert again.unchanged == {"alert_state": len(life) - 1 + 2}
    assert snapshot(engine) == before


@pytest.mark.parametrize(
    ("alert_repeats", "state_repeats", "stored"),
    [
        (0, [1, 2, 3], 3),
        (0, [3, 1, 2], 3),  # states of different batches in any order: the highest stays
        (5, [1, 2], 5),  # an alert republished before alerts.state carried its count
        (2, [], 2),
        (0, [], 0),
    ],
)
@pytest.mark.parametrize("alert_last", [False, True])
def test_the_alert_row_keeps_the_highest_repeat_count_of_its_state_changes(
    sink: SqlStoreSink,
    engine: Engine,
    alert_repeats: int,
    state_repeats: list[int],
    stored: int,
    alert_last: bool,
) -> None:
    lab = first(simulated(seed=45, count=20, kinds={"lab": 1.0}), "lab")
    alert = alert_for(lab, alert_repeats)
    states = [StoreRecord("alert_state", state_for(alert, "REPEAT", n, minutes=n)) for n in state_repeats]
    head = [StoreRecord("alert", alert)]
    for record in states + head if alert_last else head + states:
        sink.write_records([record])
    (row,) = rows(engine, ALERTS)
    assert row.suppressed_repeats == stored
    assert len(rows(engine, ALERT_HISTORY)) == len(state_repeats)


def test_a_state_change_with_an_unknown_change_is_refused(sink: SqlStoreSink) -> None:
    lab = first(simulated(seed=46, count=20, kinds={"lab": 1.0}), "lab")
    state = state_for(alert_for(lab), "REPEAT", 1)
    state["change"] = "WORSENED"
    with pytest.raises(StoreRejectedError, match="change"):
        sink.write_records([StoreRecord("alert_state", state)])


def test_an_alerts_row_takes_the_batch_time_whenever_the_store_changes_it(
    sink: SqlStoreSink, engine: Engine, clock: Clock
) -> None:
    """alerts.changed_time, by which the console's live feed finds what changed since its cursor: raised,
    a state change, a repeat, an escalation, an acknowledgement; a redelivery changes nothing, not even it."""
    lab = first(simulated(seed=47, count=20, kinds={"lab": 1.0}), "lab")
    alert = alert_for(lab)
    steps: list[tuple[str, list[StoreRecord], bool]] = [
        ("raised", [StoreRecord("alert", alert)], True),
        ("the alert again", [StoreRecord("alert", alert)], False),
        ("opened", [StoreRecord("alert_state", state_for(alert, "OPENED"))], True),
        ("a repeat", [StoreRecord("alert_state", state_for(alert, "REPEAT", 1, 1))], True),
        ("the repeat again", [StoreRecord("alert_state", state_for(alert, "REPEAT", 1, 1))], False),
        ("a note", [StoreRecord("alert_state", state_for(alert, "NOTE", 1, 2, note="late result"))], True),
        ("an escalation", [StoreRecord("escalation", escalation_for(alert, 1))], True),
        ("the escalation again", [StoreRecord("escalation", escalation_for(alert, 1))], False),
        ("an acknowledgement", [StoreRecord("ack", ack_for(alert, 20))], True),
        ("the acknowledgement again", [StoreRecord("ack", ack_for(alert, 20))], False),
        ("republished with more repeats", [StoreRecord("alert", alert_for(lab, 4))], True),
        ("republished with fewer", [StoreRecord("alert", alert_for(lab, 2))], False),
    ]
    expected: dt.datetime | None = None
    for what, records, changes in steps:
        clock.now += dt.timedelta(minutes=1)
        sink.write_records(records)
        expected = clock.now if changes else expected
        (row,) = rows(engine, ALERTS)
        assert as_utc(row.changed_time) == expected, what
    (row,) = rows(engine, ALERTS)
    assert (row.suppressed_repeats, row.escalation_level, row.acknowledged_by) == (4, 1, "DR0042")


def test_an_alert_stored_after_its_changes_takes_the_time_it_was_stored(
    sink: SqlStoreSink, engine: Engine, clock: Clock
) -> None:
    lab = first(simulated(seed=48, count=20, kinds={"lab": 1.0}), "lab")
    alert = alert_for(lab)
    sink.write_records([StoreRecord("escalation", escalation_for(alert, 1))])
    assert rows(engine, ALERTS) == []
    clock.now += dt.timedelta(minutes=5)
    sink.write_records(
        [StoreRecord("alert", alert), StoreRecord("alert_state", state_for(alert, "REPEAT", 3))]
    )
    (row,) = rows(engine, ALERTS)
    assert (as_utc(row.changed_time), row.escalation_level, row.suppressed_repeats) == (clock.now, 1, 3)
    changed_since = rows(engine, ALERTS.c.alert_id, ALERTS.c.changed_time >= clock.now)
    assert [alert_id for (alert_id,) in changed_since] == [str(alert["alert_id"])]


# -- dead letters ----------------------------------------------------------------------------------


def test_dead_letters_are_kept_once_each_without_their_bytes(
    sink: SqlStoreSink, engine: Engine, clock: Clock
) -> None:
    letters = [
        dead_letter("t123.raw.H001.lab", 2, 41),
        dead_letter("t123.norm.vitals", 0, 7, possibly_critical=False, loinc_code=None, institution_id=None),
        dead_letter("t123.alerts.critical", 1, 3, field=None, processor="streams.store"),
    ]
    result = sink.write_records([StoreRecord("deadletter", letter) for letter in letters])
    assert result.written == {"deadletter": 3}
    stored = {row.deadletter_id: row for row in rows(engine, DEAD_LETTERS)}
    assert set(stored) == {str(letter["deadletter_id"]) for letter in letters}
    potassium = stored[str(letters[0]["deadletter_id"])]
    assert (potassium.original_topic, potassium.original_partition, potassium.original_offset) == (
        "t123.raw.H001.lab",
        2,
        41,
    )
    assert (potassium.kind, potassium.institution_id, potassium.field, potassium.error_class) == (
        "lab",
        "H001",
        "unit",
        "RejectedEvent",
    )
    assert (potassium.possibly_critical, potassium.loinc_code) == (True, "2823-3")
    assert potassium.reason == letters[0]["reason"]
    assert as_utc(potassium.failed_time) == NOW and as_utc(potassium.ingested_time) == clock.now
    assert [stored[str(letter["deadletter_id"])].kind for letter in letters[1:]] == ["vitals", None]
    assert stored[str(letters[1]["deadletter_id"])].possibly_critical is False
    everything = snapshot(engine)
    assert not any(isinstance(value, bytes) for row in everything["dead_letters"] for value in row)

    clock.now += dt.timedelta(hours=1)
    replayed = [{**letter, "reason": "rejected again", "failed_time": clock.now} for letter in letters]
    again = sink.write_records([StoreRecord("deadletter", letter) for letter in replayed])
    assert (again.written, again.unchanged) == ({}, {"deadletter": 3})
    assert snapshot(engine) == everything, "the dead letter kept is the first"


def test_a_dead_letters_text_is_cut_to_its_columns_not_refused(sink: SqlStoreSink, engine: Engine) -> None:
    """PostgreSQL refuses a value longer than its column; a dead letter must be kept all the same."""
    long = dead_letter(
        "x" * 300 + ".raw.H001.lab",
        error_class="E" * 500,
        field="f" * 1000,
        institution_id="I" * 100,
        correlation_id="c" * 200,
        processor="p" * 300,
        loinc_code="9" * 40,
        reason="r" * 20_000,
    )
    assert sink.write_records([StoreRecord("deadletter", long)]).written == {"deadletter": 1}
    (row,) = rows(engine, DEAD_LETTERS)
    columns = DEAD_LETTERS.c
    for name in ("original_topic", "error_class", "field", "institution_id", "correlation_id", "processor"):
        assert len(getattr(row, name)) == columns[name].type.length, name
    assert (row.kind, len(row.loinc_code), len(row.reason)) == ("lab", 16, 20_000)


# -- identities ------------------------------------------------------------------------------------


def _patient_at_two_hospitals() -> tuple[list[StoreRecord], str, str, str]:
    """Events of one person stored under an MRN-derived id (X) before the national id was known, and
    under the national-id-derived id (C) after; returns (records, X, C, MRN)."""
    records = simulated(seed=51, count=120)
    mrn_of = next(
        r.record
        for r in records
        if r.kind == "lab"
        and r.record["regional_patient_id"]
        != regional_id(r.record["envelope"]["institution_id"], r.record["patient_mrn"])
    )
    institution, mrn = mrn_of["envelope"]["institution_id"], mrn_of["patient_mrn"]
    canonical = mrn_of["regional_patient_id"]
    alias = regional_id(institution, mrn)
    assert alias != canonical
    mine = [r for r in records if r.record["regional_patient_id"] == canonical]
    early = mine[: len(mine) // 2]
    for item in early:
        item.record["regional_patient_id"] = alias  # type: ignore[index]
    return mine, alias, canonical, mrn


@pytest.mark.parametrize("link_first", [False, True])
def test_events_stored_under_an_alias_join_the_canonical_timeline(
    sink: SqlStoreSink, engine: Engine, link_first: bool
) -> None:
    mine, alias, canonical, mrn = _patient_at_two_hospitals()
    institution = mine[0].record["envelope"]["institution_id"]
    link = StoreRecord("identity", identity(institution, mrn, canonical, alias_of=alias))
    for batch in [[link], mine] if link_first else [mine, [link]]:
        sink.write_records(batch)

    whole = patient_timeline(engine, canonical, limit=1000).entries
    assert len(whole) == sum(len(r.record.get("measurements") or [None]) for r in mine)
    assert {e.stored_patient_id for e in whole} == {alias, canonical}
    assert patient_timeline(engine, alias, limit=1000).entries == whole, "asking with the alias resolves it"
    (link_row,) = rows(engine, Base.metadata.tables["identifier_links"])
    assert link_row.regional_patient_id == canonical


def test_alias_chains_resolve_to_the_newest_id(sink: SqlStoreSink, engine: Engine) -> None:
    mine, x, c, mrn = _patient_at_two_hospitals()
    institution = mine[0].record["envelope"]["institution_id"]
    y = "rp-" + "y" * 32
    sink.write_records(mine)
    sink.write_records([StoreRecord("identity", identity(institution, mrn, y, alias_of=x, linked=NOW))])
    sink.write_records(
        [
            StoreRecord(
                "identity", identity(institution, mrn, c, alias_of=y, linked=NOW + dt.timedelta(hours=1))
            )
        ]
    )
    aliases = {
        r.alias_id: r.regional_patient_id for r in rows(engine, Base.metadata.tables["patient_aliases"])
    }
    assert aliases == {x: c, y: c}
    assert (
        len(patient_timeline(engine, x, limit=1000).entries)
        == len(patient_timeline(engine, c, limit=1000).entries)
        > 0
    )


def test_a_newer_link_back_makes_the_old_target_an_alias(sink: SqlStoreSink, engine: Engine) -> None:
    """X->C, then later C->X: X is canonical again and no cycle is left."""
    x, c = "rp-" + "x" * 32, "rp-" + "c" * 32
    sink.write_records([StoreRecord("identity", identity("H001", "MRN1", c, alias_of=x, linked=NOW))])
    sink.write_records(
        [StoreRecord("identity", identity("H001", "MRN1", x, alias_of=c, linked=NOW + dt.timedelta(hours=1)))]
    )
    aliases = {
        r.alias_id: r.regional_patient_id for r in rows(engine, Base.metadata.tables["patient_aliases"])
    }
    assert aliases == {c: x}


def test_an_older_link_delivered_late_does_not_undo_a_newer_one(sink: SqlStoreSink, engine: Engine) -> None:
    x, c = "rp-" + "x" * 32, "rp-" + "c" * 32
    sink.write_records([StoreRecord("identity", identity("H001", "MRN1", c, alias_of=x, linked=NOW))])
    result = sink.write_records(
        [StoreRecord("identity", identity("H001", "MRN1", x, linked=NOW - dt.timedelta(days=1)))]
    )
    assert result == StoreWriteResult({}, {"identity": 1})
    (link,) = rows(engine, Base.metadata.tables["identifier_links"])
    assert link.regional_patient_id == c
    assert {
        r.alias_id: r.regional_patient_id for r in rows(engine, Base.metadata.tables["patient_aliases"])
    } == {x: c}


def test_patients_keep_the_newest_demographics(sink: SqlStoreSink, engine: Engine) -> None:
    lab = first(simulated(seed=52, count=20, kinds={"lab": 1.0}), "lab")
    older = revised(lab, -60, patient_birth_year=1950, patient_sex=None)
    newer = revised(lab, 0, patient_birth_year=1951, patient_sex="female", result_id="other")
    sink.write_records([StoreRecord("lab", newer)])
    sink.write_records([StoreRecord("lab", older)])
    (patient,) = rows(engine, PATIENTS)
    assert (patient.birth_year, patient.sex) == (1951, "female")


# -- patient names ---------------------------------------------------------------------------------


def _named_lab(seed: int = 53, **changes: Any) -> dict[str, Any]:
    lab = first(simulated(seed=seed, count=20, kinds={"lab": 1.0}), "lab")
    return {**lab, "patient_family_name": "區", "patient_given_name": "瑋東", **changes}


def _names(engine: Engine) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {
        (r.institution_id, r.patient_mrn): (r.family_name, r.given_name, r.regional_patient_id)
        for r in rows(engine, PATIENT_NAMES)
    }


def test_a_name_is_stored_exactly_as_sent_for_its_institution_and_mrn(
    sink: SqlStoreSink, engine: Engine
) -> None:
    lab = _named_lab()
    unnamed = revised(_named_lab(seed=54), 0, patient_family_name=None, patient_given_name=None)
    result = sink.write_records([StoreRecord("lab", lab), StoreRecord("lab", unnamed)])
    assert result.written == {"lab": 2}
    institution, mrn = lab["envelope"]["institution_id"], lab["patient_mrn"]
    assert _names(engine) == {(institution, mrn): ("區", "瑋東", lab["regional_patient_id"])}
    (row,) = rows(engine, PATIENT_NAMES)
    assert as_utc(row.event_time) == lab["envelope"]["event_time"]
    assert row.event_id == str(lab["envelope"]["event_id"])


@pytest.mark.parametrize("order", ["older first", "newer first", "one batch", "one batch reversed"])
def test_the_newest_name_wins_and_a_late_older_one_changes_nothing(
    sink: SqlStoreSink, engine: Engine, order: str
) -> None:
    lab = _named_lab()
    older = revised(lab, -60, patient_family_name="WANG", patient_given_name="Li", result_id="older")
    newer = revised(lab, 0, patient_family_name="歐陽", patient_given_name=None, result_id="newer")
    records = [StoreRecord("lab", older), StoreRecord("lab", newer)]
    if order == "newer first":
        sink.write_records(records[1:])
        assert sink.write_records(records[:1]).written == {"lab": 1}  # its own result is new
    elif order == "older first":
        sink.write_records(records[:1])
        sink.write_records(records[1:])
    else:
        sink.write_records(records if order == "one batch" else records[::-1])
    # both parts from the newest event that carried a name: it sent no given name
    assert list(_names(engine).values()) == [("歐陽", None, lab["regional_patient_id"])]
    (row,) = rows(engine, PATIENT_NAMES)
    assert as_utc(row.event_time) == newer["envelope"]["event_time"]


def test_an_event_without_a_name_leaves_the_stored_name(sink: SqlStoreSink, engine: Engine) -> None:
    lab = _named_lab()
    later = revised(lab, 30, patient_family_name=None, patient_given_name=None, result_id="later")
    sink.write_records([StoreRecord("lab", lab)])
    sink.write_records([StoreRecord("lab", later)])
    assert [name[:2] for name in _names(engine).values()] == [("區", "瑋東")]


def test_a_redelivered_name_changes_nothing(sink: SqlStoreSink, engine: Engine, clock: Clock) -> None:
    vitals = first(simulated(seed=55, count=40), "vitals")
    batch = [
        StoreRecord("lab", _named_lab()),
        StoreRecord("vitals", {**vitals, "patient_family_name": "SMITH", "patient_given_name": "John Paul"}),
    ]
    sink.write_records(batch)
    before = snapshot(engine)
    assert len(before["patient_names"]) == 2
    clock.now += dt.timedelta(hours=1)  # a rewrite would show in ingested_time
    for again in (batch, batch[::-1] + batch):
        result = sink.write_records(again)
        assert result.written == {} and sum(result.unchanged.values()) == len(again)
    assert snapshot(engine) == before


def test_the_same_mrn_at_two_institutions_has_two_names(sink: SqlStoreSink, engine: Engine) -> None:
    lab = _named_lab()
    other = revised(lab, 0, patient_family_name="CHAN", patient_given_name="Tai Man")
    other["envelope"] = {**other["envelope"], "institution_id": "C003"}
    sink.write_records([StoreRecord("lab", lab), StoreRecord("lab", other)])
    names = _names(engine)
    assert {key[0] for key in names} == {lab["envelope"]["institution_id"], "C003"}
    assert names[("C003", lab["patient_mrn"])][:2] == ("CHAN", "Tai Man")


def test_every_kind_writes_its_name_and_no_other_table_holds_one(sink: SqlStoreSink, engine: Engine) -> None:
    batch = [
        StoreRecord(item.kind, {**item.record, "patient_family_name": "區", "patient_given_name": "瑋東"})
        if item.kind in KINDS
        else item
        for item in realistic_batch(seed=56, count=200)
    ]
    sink.write_records(batch)
    clinical = {item.kind for item in batch if item.kind in KINDS}
    assert clinical == {"lab", "vitals", "encounter", "medication", "diagnosis"}
    expected = {
        (r.record["envelope"]["institution_id"], r.record["patient_mrn"]) for r in batch if r.kind in clinical
    }
    assert set(_names(engine)) == expected
    for table, table_rows in snapshot(engine).items():
        if table != "patient_names":
            assert "瑋東" not in repr(table_rows), table


def test_a_name_that_is_not_text_is_refused_naming_the_field_not_the_value(sink: SqlStoreSink) -> None:
    with pytest.raises(StoreRejectedError) as refused:
        sink.write_records([StoreRecord("lab", _named_lab(patient_given_name=["瑋", "東"]))])
    assert "patient_given_name" in str(refused.value) and "瑋" not in str(refused.value)


# -- timeline paging -------------------------------------------------------------------------------


def _busy_patient(sink: SqlStoreSink) -> tuple[str, list[StoreRecord]]:
    batch = realistic_batch(seed=61, count=500)
    sink.write_records(batch)
    counts: dict[str, int] = {}
    for record in batch:
        patient = record.record.get("regional_patient_id")
        if patient:
            counts[patient] = counts.get(patient, 0) + 1
    return max(counts, key=lambda p: counts[p]), batch


def _page_through(engine: Engine, patient: str, limit: int, **options: Any) -> list[TimelineEntry]:
    entries: list[TimelineEntry] = []
    cursor = None
    for _ in range(1000):
        page = patient_timeline(engine, patient, limit=limit, cursor=cursor, **options)
        assert len(page.entries) <= limit
        entries.extend(page.entries)
        cursor = page.next_cursor
        if cursor is None:
            return entries
        assert len(page.entries) == limit, "only the last page may be short"
    raise AssertionError("paging did not end")


def _sort_key(entry: TimelineEntry) -> tuple[dt.datetime, str, str]:
    return (entry.time, entry.kind, entry.entry_id)


@pytest.mark.parametrize("limit", [1, 7, 50])
@pytest.mark.parametrize("newest_first", [False, True])
def test_paging_is_complete_ordered_and_without_repeats(
    sink: SqlStoreSink, engine: Engine, limit: int, newest_first: bool
) -> None:
    patient, _ = _busy_patient(sink)
    whole = patient_timeline(engine, patient, limit=1000, newest_first=newest_first)
    assert whole.next_cursor is None and len(whole.entries) > 40
    assert {e.kind for e in whole.entries} >= {"lab", "vitals", "medication", "alert"}
    assert len({e.institution_id for e in whole.entries}) > 1, "the timeline spans institutions"
    paged = _page_through(engine, patient, limit, newest_first=newest_first)
    assert paged == whole.entries
    assert paged == sorted(paged, key=_sort_key, reverse=newest_first)
    assert len({(e.kind, e.entry_id) for e in paged}) == len(paged)


def test_paging_is_stable_while_new_events_arrive(sink: SqlStoreSink, engine: Engine) -> None:
    """Keyset paging: events stored between two pages never repeat or shift entries already read."""
    patient, batch = _busy_patient(sink)
    first_page = patient_timeline(engine, patient, limit=10)
    lab = next(r.record for r in batch if r.kind == "lab" and r.record["regional_patient_id"] == patient)
    earlier = revised(
        lab, -600, result_id="late-arrival", result_time=first_page.entries[0].time - dt.timedelta(days=1)
    )
    later = revised(lab, 600, result_id="new-arrival", result_time=NOW + dt.timedelta(minutes=5))
    sink.write_records([StoreRecord("lab", earlier), StoreRecord("lab", later)])
    rest = _page_through_from(engine, patient, first_page.next_cursor)
    seen = first_page.entries + rest
    assert len({(e.kind, e.entry_id) for e in seen}) == len(seen)
    assert seen == sorted(seen, key=_sort_key)
    assert any(e.entry_id.endswith("new-arrival:") for e in rest)
    assert not any(e.entry_id.endswith("late-arrival:") for e in seen), (
        "before the cursor: not on later pages"
    )


def _page_through_from(engine: Engine, patient: str, cursor: str | None) -> list[TimelineEntry]:
    entries: list[TimelineEntry] = []
    while cursor is not None:
        page = patient_timeline(engine, patient, limit=10, cursor=cursor)
        entries.extend(page.entries)
        cursor = page.next_cursor
    return entries


@pytest.mark.parametrize(
    "kinds", [{"lab"}, {"vitals"}, {"lab", "vitals"}, {"medication", "diagnosis"}, {"encounter", "alert"}]
)
def test_timeline_filters_by_kind_and_time(sink: SqlStoreSink, engine: Engine, kinds: set[str]) -> None:
    patient, _ = _busy_patient(sink)
    whole = patient_timeline(engine, patient, limit=1000).entries
    chosen = patient_timeline(engine, patient, kinds=kinds, limit=1000).entries
    assert chosen == [e for e in whole if e.kind in kinds]
    start, end = whole[len(whole) // 4].time, whole[3 * len(whole) // 4].time
    window = patient_timeline(engine, patient, start=start, end=end, limit=1000).entries
    assert window == [e for e in whole if start <= e.time < end]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"kinds": {"x-ray"}}, ValueError),
        ({"limit": 0}, ValueError),
        ({"limit": 5000}, ValueError),
        ({"cursor": "not-a-cursor"}, InvalidCursorError),
    ],
)
def test_timeline_refuses_bad_arguments(
    engine: Engine, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        patient_timeline(engine, "rp-x", **options)


def test_a_cursor_is_bound_to_its_direction(sink: SqlStoreSink, engine: Engine) -> None:
    patient, _ = _busy_patient(sink)
    cursor = patient_timeline(engine, patient, limit=3).next_cursor
    assert cursor is not None
    with pytest.raises(InvalidCursorError):
        patient_timeline(engine, patient, cursor=cursor, newest_first=True)


def test_latest_by_analyte_matches_the_records(sink: SqlStoreSink, engine: Engine) -> None:
    patient, batch = _busy_patient(sink)
    expected: dict[str, tuple[dt.datetime, float]] = {}
    for record in batch:
        r = record.record
        if r.get("regional_patient_id") != patient:
            continue
        if record.kind == "lab":
            points = [(r["loinc_code"], r["result_time"], r["canonical_value"])]
        elif record.kind == "vitals":
            points = [(m["loinc_code"], r["measured_time"], m["value"]) for m in r["measurements"]]
        else:
            continue
        for loinc, when, value in points:
            if loinc not in expected or when > expected[loinc][0]:
                expected[loinc] = (when, value)
    latest = latest_by_analyte(engine, patient)
    assert [v.loinc_code for v in latest] == sorted(expected)
    assert {v.loinc_code: (v.effective_time, v.value) for v in latest} == expected


# -- refusals --------------------------------------------------------------------------------------


def _broken(kind: str, mutate: Callable[[dict[str, Any]], None], seed: int = 71) -> StoreRecord:
    record = first(realistic_batch(seed=seed, count=80), kind)
    mutate(record)
    return StoreRecord(kind, record)


REFUSED = {
    "no regional patient id": ("lab", lambda r: r.update(regional_patient_id=None), "regional_patient_id"),
    "naive event time": (
        "vitals",
        lambda r: r["envelope"].update(event_time=NOW.replace(tzinfo=None)),
        "envelope.event_time",
    ),
    "event id not a uuid": (
        "medication",
        lambda r: r["envelope"].update(event_id="1234"),
        "envelope.event_id",
    ),
    "no measurements": ("vitals", lambda r: r.update(measurements=[]), "measurements"),
    "text as a number": ("lab", lambda r: r.update(canonical_value="high"), "canonical_value"),
    "missing alert id": ("alert", lambda r: r.pop("alert_id"), "alert_id"),
    "level not an int": ("escalation", lambda r: r.update(level="2"), "level"),
    "no linked time": ("identity", lambda r: r.update(linked_time=None), "linked_time"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_malformed_record_is_refused_naming_the_field(
    sink: SqlStoreSink, engine: Engine, case: str
) -> None:
    kind, mutate, field = REFUSED[case]
    with pytest.raises(StoreRejectedError, match=field):
        sink.write_records([_broken(kind, mutate)])


def test_unknown_kind_is_refused(sink: SqlStoreSink) -> None:
    with pytest.raises(StoreRejectedError, match="unknown kind"):
        sink.write_records([StoreRecord("x-ray", {})])


def test_refused_records_are_isolated_and_their_neighbours_stored_once(
    sink: SqlStoreSink, engine: Engine
) -> None:
    batch = realistic_batch(seed=72, count=60)
    bad_at = [3, 17, len(batch) - 1]
    for index in bad_at:
        batch[index] = StoreRecord(
            batch[index].kind, {**batch[index].record, "regional_patient_id": None, "institution_id": None}
        )
    result, refused = write_records_isolating(sink, batch)
    assert [index for index, _ in refused] == bad_at
    assert sum(result.written.values()) == len(batch) - len(bad_at)
    before = snapshot(engine)
    good = [record for index, record in enumerate(batch) if index not in bad_at]
    assert sink.write_records(good).written == {}
    assert snapshot(engine) == before


def test_an_empty_batch_is_a_no_op(sink: SqlStoreSink, engine: Engine) -> None:
    assert sink.write_records([]) == StoreWriteResult()
    assert all(not table for table in snapshot(engine).values())


# -- metrics ---------------------------------------------------------------------------------------


def test_metrics_count_rows_batches_and_latency(engine: Engine, clock: Clock) -> None:
    registry = CollectorRegistry()
    sink = SqlStoreSink(engine, clock=clock, metrics=make_sink_metrics(registry))
    batch = realistic_batch(seed=81, count=100)
    sink.write_records(batch)
    sink.write_records(batch)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    labs = sum(1 for r in batch if r.kind == "lab")
    assert value("clinhub_store_written_rows_total", table="ingest_log") > labs
    assert value("clinhub_store_unchanged_records_total", kind="lab") == labs
    assert value("clinhub_store_batch_records_count") == 2
    assert value("clinhub_store_batch_records_sum") == 2 * len(batch)
    assert value("clinhub_store_clinical_age_seconds_count", kind="lab") == labs
    assert value("clinhub_store_batch_seconds_count") == 2
    names = {m.name for m in registry.collect()}
    assert all(name.startswith("clinhub_store_") for name in names)


# -- migrations ------------------------------------------------------------------------------------


def _insert_0001_rows(engine: Engine) -> dict[str, Any]:
    """Rows as revision 0001 stored them: two versions of one result as two rows, and an alert."""
    upgrade(engine, "0001")
    from sqlalchemy import MetaData, Table

    metadata = MetaData()
    observations = Table("observations", metadata, autoload_with=engine)
    alerts = Table("alerts", metadata, autoload_with=engine)
    base = {
        "institution_id": "H001",
        "source_system": "LIS",
        "result_id": "H001-R1",
        "regional_patient_id": "rp-0001",
        "encounter_id": None,
        "local_code": "K",
        "loinc_code": "2823-3",
        "analyte": "Potassium",
        "unit": "mmol/L",
        "original_unit": "mmol/L",
        "value_text": None,
        "abnormal_flag": None,
        "flags": "",
        "result_time": NOW - dt.timedelta(hours=2),
        "specimen_collected_time": None,
        "ingested_time": NOW - dt.timedelta(hours=2),
    }
    old_id, new_id = str(uuid.uuid4()), str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            insert(observations),
            [
                {
                    **base,
                    "event_id": old_id,
                    "value": 6.9,
                    "original_value": 6.9,
                    "status": "final",
                    "event_time": NOW - dt.timedelta(hours=2),
                },
                {
                    **base,
                    "event_id": new_id,
                    "value": 4.1,
                    "original_value": 4.1,
                    "status": "corrected",
                    "event_time": NOW - dt.timedelta(hours=1),
                },
            ],
        )
        connection.execute(
            insert(alerts),
            {
                "alert_id": str(uuid.uuid4()),
                "source_event_id": old_id,
                "regional_patient_id": "rp-0001",
                "institution_id": "H001",
                "loinc_code": "2823-3",
                "analyte": "Potassium",
                "value": 6.9,
                "unit": "mmol/L",
                "limit_kind": "HIGH",
                "limit_value": 6.2,
                "severity": "CRITICAL",
                "message": "K 6.9",
                "rule_source": "test",
                "correlation_id": "c1",
                "result_time": NOW - dt.timedelta(hours=2),
                "raised_time": NOW - dt.timedelta(hours=2),
                "deadline_time": NOW - dt.timedelta(hours=1),
                "published_time": None,
            },
        )
    return {"old": old_id, "new": new_id}


def test_migrations_take_an_empty_database_to_head(blank_engine: Engine) -> None:
    assert current_revision(blank_engine) is None
    upgrade(blank_engine)
    assert current_revision(blank_engine) == head_revision()
    ensure_current(blank_engine)
    with blank_engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_0001_database_with_rows_is_upgraded_keeping_the_latest_version(blank_engine: Engine) -> None:
    ids = _insert_0001_rows(blank_engine)
    with pytest.raises(StoreOutOfDateError, match="clinhub db upgrade") as refused:
        ensure_current(blank_engine)
    assert (refused.value.current, refused.value.head) == ("0001", head_revision())

    upgrade(blank_engine)
    ensure_current(blank_engine)
    (row,) = rows(blank_engine, OBSERVATIONS)
    assert (row.event_id, row.value, row.status, row.category, row.component) == (
        ids["new"],
        4.1,
        "corrected",
        "laboratory",
        "",
    )
    assert {r.event_id for r in rows(blank_engine, INGEST_LOG)} == {ids["old"], ids["new"]}
    assert [p.regional_patient_id for p in rows(blank_engine, PATIENTS)] == ["rp-0001"]
    (alert,) = rows(blank_engine, ALERTS)
    assert (alert.source_event_id, alert.suppressed_repeats, alert.escalation_level) == (ids["old"], 0, 0)
    with blank_engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_downgrade_to_0001_and_back(blank_engine: Engine) -> None:
    _insert_0001_rows(blank_engine)
    upgrade(blank_engine)
    batch = simulated(seed=91, count=40)
    SqlStoreSink(blank_engine).write_records([*batch, StoreRecord("alert", alert_for(first(batch, "lab")))])
    downgrade(blank_engine, "0001")
    assert current_revision(blank_engine) == "0001"
    with blank_engine.connect() as connection:
        labs = connection.exec_driver_sql("SELECT count(*) FROM observations").scalar_one()
        alerts = connection.exec_driver_sql("SELECT raised_time, published_time FROM alerts").all()
    assert labs >= 1
    # 0001's outbox would publish every alert with no published_time again; a 0002 store's were all sent
    assert len(alerts) == 2 and all(published == raised for raised, published in alerts)
    upgrade(blank_engine)
    ensure_current(blank_engine)
    with blank_engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(OBSERVATIONS)).scalar_one() == labs


def _audit_row(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(AuditEntry.__table__),
            {
                "time": NOW,
                "username": "dr.wu",
                "role": "clinician",
                "action": "view_patient",
                "outcome": "ok",
            },
        )


def test_migration_0005_downgrades_and_upgrades_again(blank_engine: Engine, clock: Clock) -> None:
    """0005 (the console's tables, dead_letters, alerts.changed_time) off and on again, with rows in its
    tables, the audit log's among them; what 0004 had stays."""
    upgrade(blank_engine)
    batch = realistic_batch(seed=92, count=60)
    SqlStoreSink(blank_engine, clock=clock).write_records(batch)
    _audit_row(blank_engine)
    with blank_engine.connect() as connection:
        alerts = connection.execute(select(func.count()).select_from(ALERTS)).scalar_one()
    assert alerts and rows(blank_engine, DEAD_LETTERS)

    downgrade(blank_engine, "0004")
    assert current_revision(blank_engine) == "0004"
    schema = inspect(blank_engine)
    assert not {"dead_letters", *CONSOLE_TABLES} & set(schema.get_table_names())
    assert "changed_time" not in {column["name"] for column in schema.get_columns("alerts")}
    assert "ix_alerts_changed_time" not in {index["name"] for index in schema.get_indexes("alerts")}
    with blank_engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM alerts").scalar_one() == alerts

    upgrade(blank_engine)
    ensure_current(blank_engine)
    with blank_engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert [row.changed_time for row in rows(blank_engine, ALERTS)] == [None] * alerts, "not backfilled"
    clock.now += dt.timedelta(minutes=1)
    SqlStoreSink(blank_engine, clock=clock).write_records(batch)
    assert len(rows(blank_engine, DEAD_LETTERS)) == sum(1 for item in batch if item.kind == "deadletter")
    _audit_row(blank_engine)


def test_migration_0006_downgrades_and_upgrades_again(blank_engine: Engine, clock: Clock) -> None:
    """0006 (patient_names) off and on again: the names go with it, everything else stays; names come
    back with the next events that carry them (nothing stored elsewhere to backfill them from)."""
    upgrade(blank_engine)
    batch = realistic_batch(seed=93, count=60)
    SqlStoreSink(blank_engine, clock=clock).write_records(batch)
    assert rows(blank_engine, PATIENT_NAMES)
    observations = len(rows(blank_engine, OBSERVATIONS))

    downgrade(blank_engine, "0005")
    assert current_revision(blank_engine) == "0005"
    assert "patient_names" not in inspect(blank_engine).get_table_names()
    with blank_engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM observations").scalar_one() == observations

    upgrade(blank_engine)
    ensure_current(blank_engine)
    with blank_engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert rows(blank_engine, PATIENT_NAMES) == []
    lab = revised(first(batch, "lab"), 1, patient_family_name="區", patient_given_name="瑋東")
    SqlStoreSink(blank_engine, clock=clock).write_records([StoreRecord("lab", lab)])
    assert [(r.family_name, r.given_name) for r in rows(blank_engine, PATIENT_NAMES)] == [("區", "瑋東")]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET outcome = 'denied'",
        "UPDATE audit_log SET detail = 'rewritten' WHERE username = 'dr.wu'",
        "DELETE FROM audit_log",
        "DELETE FROM audit_log WHERE username = 'dr.wu'",
    ],
)
def test_the_audit_log_refuses_update_and_delete(engine: Engine, statement: str) -> None:
    """Append-only by trigger (migration 0005), whatever the application or an operator's session does."""
    _audit_row(engine)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
        connection.exec_driver_sql(statement)
    (row,) = rows(engine, AuditEntry.__table__)
    assert (row.username, row.outcome, row.detail) == ("dr.wu", "ok", None)
    _audit_row(engine)  # appending still works
    assert len(rows(engine, AuditEntry.__table__)) == 2
