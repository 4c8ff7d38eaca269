"""The clinical stage's state expiry over plain-dict tables and a real RocksDB database: what leaves the
tables, in bounded slices that resume where the last tick left off, and never a state the agent writes."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from schemas.wire import ConfluentRegistry
from streams.domain.expiry import UPDATED_FIELD
from streams.domain.rules import epoch_ms
from streams.metrics import make_stream_metrics
from streams.runtime.clinical import ANALYTES_TABLE, LEGACY_ANALYTES_TABLE, ClinicalHandler, ClinicalTables
from streams.runtime.messages import RawMessage
from streams.runtime.outputs import Output
from streams.runtime.tables import murmur2_partition
from streams.runtime.timers import KeyCursor, StateExpiryWatch
from tests.factories import lab_record, normalised
from tests.unit.streams.runtime.test_app import NOW, make_components, stage_of
from tests.unit.streams.runtime.test_clinical_timer import _state as open_alerts_of

NOW_MS = epoch_ms(NOW)
OLD_MS = NOW_MS - epoch_ms(dt.datetime(1970, 1, 16, tzinfo=dt.UTC))  # 15 days ago: past 14 d 8 h
RECENT_MS = NOW_MS - 3_600_000


def _state(newest_ms: int, updated_ms: int | None, alert_id: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"format": 2, "last_time_ms": newest_ms, "open_alerts": []}
    if alert_id is not None:
        record["open_alerts"] = [{"alert": {"alert_id": alert_id, "result_time": newest_ms}}]
    if updated_ms is not None:
        record[UPDATED_FIELD] = updated_ms
    return record


def _escalating(patient: str, alert_id: str, acknowledged: bool) -> dict[str, Any]:
    minute = dt.timedelta(minutes=1)
    return open_alerts_of(patient, alert_id, NOW + minute, NOW - minute if acknowledged else None)


def _handler(tables: ClinicalTables) -> tuple[ClinicalHandler, list[Output]]:
    components = make_components(ConfluentRegistry({"url": "mock://clinical-expiry"}))
    sent: list[Output] = []

    async def capture(outputs: Sequence[Output]) -> None:
        sent.extend(outputs)

    stage = stage_of("clinical", components, capture)
    return ClinicalHandler(stage, tables, components.reference.policy), sent


def test_old_states_leave_recent_and_escalating_ones_stay_and_unstamped_ones_are_stamped() -> None:
    analytes = {
        "rp-old|2823-3": _state(OLD_MS, OLD_MS),
        "rp-old|718-7": _state(RECENT_MS, RECENT_MS),
        "rp-backfill|2823-3": _state(OLD_MS, RECENT_MS),  # old results, written an hour ago
        "rp-paged|2823-3": _state(OLD_MS, OLD_MS, alert_id="a-paged"),
        "rp-acked|2823-3": _state(OLD_MS, OLD_MS, alert_id="a-acked"),
        "rp-upgraded|2823-3": _state(OLD_MS, None),
    }
    open_alerts = {
        "rp-paged": _escalating("rp-paged", "a-paged", acknowledged=False),
        "rp-acked": _escalating("rp-acked", "a-acked", acknowledged=True),
    }
    legacy = {"rp-old": {"2823-3": _state(OLD_MS, None)}, "rp-legacy": {"2823-3": _state(RECENT_MS, None)}}
    tables = ClinicalTables(analytes=analytes, open_alerts=open_alerts, wards={"rp-old": "ICU"})
    tables.legacy_analytes = legacy
    handler, sent = _handler(tables)

    assert handler.expire_states(ANALYTES_TABLE, sorted(analytes)) == 2
    assert sorted(analytes) == ["rp-backfill|2823-3", "rp-old|718-7", "rp-paged|2823-3", "rp-upgraded|2823-3"]
    assert analytes["rp-upgraded|2823-3"][UPDATED_FIELD] == NOW_MS  # expires a horizon from now
    assert handler.expire_states(LEGACY_ANALYTES_TABLE, sorted(legacy)) == 1
    assert sorted(legacy) == ["rp-legacy"]
    assert sent == [] and tables.wards == {"rp-old": "ICU"}  # wards do not expire
    assert sorted(open_alerts) == ["rp-acked", "rp-paged"]  # these leave in escalate_due


def test_every_state_the_agent_writes_carries_its_write_time() -> None:
    tables = ClinicalTables(analytes={}, open_alerts={}, wards={})
    handler, _ = _handler(tables)
    record = normalised("lab", lab_record("H001", "K", 4.2, "mmol/L", mrn="MRN-EXP", at=NOW))
    value = handler.stage.codecs.encode("lab", record)
    message = RawMessage(
        handler.stage.topics.norm("lab"), 0, 1, record["regional_patient_id"].encode(), value
    )
    asyncio.run(handler.handle([message]))
    (stored,) = tables.analytes.values()
    assert stored[UPDATED_FIELD] == NOW_MS


def test_a_delete_between_the_agents_read_and_its_write_loses_nothing() -> None:
    """The agent reads a state, the timer deletes it (old), the agent writes back what it judged: the
    state is there, the agent's, stamped now. A write between the timer's read and delete cannot happen:
    both run on one event loop and the timer does not await in between."""
    from streams.domain.rules import AnalyteState
    from streams.runtime.clinical import _Overlay

    key = "rp-race|2823-3"
    tables = ClinicalTables(analytes={key: _state(OLD_MS, OLD_MS)}, open_alerts={}, wards={})
    handler, _ = _handler(tables)
    overlay = _Overlay(tables)
    read = overlay.analyte("rp-race", "2823-3")
    assert read is not None
    assert handler.expire_states(ANALYTES_TABLE, [key]) == 1 and key not in tables.analytes
    overlay.set_analyte("rp-race", "2823-3", AnalyteState(last_value=4.0, last_time_ms=NOW_MS))
    overlay.write_back(NOW_MS)
    assert tables.analytes[key]["last_time_ms"] == NOW_MS and tables.analytes[key][UPDATED_FIELD] == NOW_MS
    assert handler.expire_states(ANALYTES_TABLE, [key]) == 0


def test_the_timer_judges_a_bounded_slice_per_tick_and_resumes_where_it_left_off() -> None:
    analytes = {f"rp-{n:02d}|2823-3": _state(OLD_MS if n % 2 else RECENT_MS, OLD_MS) for n in range(10)}
    judged: list[list[str]] = []
    tables = ClinicalTables(analytes=analytes, open_alerts={}, wards={})
    handler, _ = _handler(tables)

    def expire(table: str, keys: Sequence[str]) -> int:
        judged.append(list(keys))
        return handler.expire_states(table, keys)

    metrics = make_stream_metrics(CollectorRegistry())
    app = SimpleNamespace(rebalancing=False, in_recovery=False)
    watch = StateExpiryWatch(app, {ANALYTES_TABLE: analytes, LEGACY_ANALYTES_TABLE: None}, expire, metrics, 4)
    assert [watch.sweep() for _ in range(3)] == [2, 2, 1]
    assert [len(keys) for keys in judged] == [4, 4, 2]  # the third slice ends the pass
    assert [key for keys in judged for key in keys] == sorted(f"rp-{n:02d}|2823-3" for n in range(10))
    assert sorted(analytes) == [f"rp-{n:02d}|2823-3" for n in range(0, 10, 2)]
    assert metrics.state_expired.labels(table=ANALYTES_TABLE)._value.get() == 5
    watch.sweep()
    assert judged[-1] == sorted(analytes)[:4]  # a new pass from the first key
    app.rebalancing = True
    assert watch.sweep() == 0 and len(judged) == 4  # keys move between workers: not now


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


class FakeStore:
    """Faust's RocksDB store as KeyCursor reads it: rocksdict databases by changelog partition."""

    use_rocksdict = True
    offset_key = b"__faust\x00offset__"

    def __init__(self, dbs: dict[int, Any]) -> None:
        self._dbs = dbs


class FakeTable:
    def __init__(self, store: FakeStore, active: set[int]) -> None:
        self.data = store
        self.changelog_topic_name = "app-analyte-states-changelog"
        self.partitions = 4
        topic = self.changelog_topic_name
        actives = {TP(topic, p) for p in active} | {TP("other", 0)}
        self.app = SimpleNamespace(assignor=SimpleNamespace(assigned_actives=lambda: actives))


def test_on_rocksdb_the_cursor_seeks_each_owned_partition_in_key_order(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    dbs = {p: Rdict(str(tmp_path / f"p{p}"), options=Options(raw_mode=True)) for p in range(3)}
    for p, db in dbs.items():
        for n in range(5):
            db[f"rp-{p}-{n}|2823-3".encode()] = b"{}"
        db[FakeStore.offset_key] = b"42"
    table = FakeTable(FakeStore(dbs), active={0, 2})  # partition 1 is another worker's
    cursor = KeyCursor(table)
    slices = [cursor.next_slice(3) for _ in range(4)]
    assert slices[0] == ["rp-0-0|2823-3", "rp-0-1|2823-3", "rp-0-2|2823-3"]
    assert slices[1] == ["rp-0-3|2823-3", "rp-0-4|2823-3", "rp-2-0|2823-3"]
    assert slices[2] == ["rp-2-1|2823-3", "rp-2-2|2823-3", "rp-2-3|2823-3"]
    assert slices[3] == ["rp-2-4|2823-3"]  # short: the pass ends
    del dbs[0][b"rp-0-0|2823-3"]
    assert cursor.next_slice(2) == ["rp-0-1|2823-3", "rp-0-2|2823-3"]
    for db in dbs.values():
        db.close()


def test_on_other_faust_stores_only_keys_of_owned_partitions_are_handed_out() -> None:
    keys = [f"rp-{n}|2823-3" for n in range(20)]

    class MemoryTable(FakeTable):
        def keys(self) -> list[str]:
            return keys

        def changelog_partition(self, key: bytes) -> int:
            return murmur2_partition(key.split(b"|", 1)[0], 4)

    table = MemoryTable(FakeStore({}), active={1, 3})
    table.data.use_rocksdict = False
    handed = KeyCursor(table).next_slice(100)
    owned = [key for key in keys if murmur2_partition(key.split("|", 1)[0].encode(), 4) in {1, 3}]
    assert handed == sorted(owned) and 0 < len(handed) < len(keys)
