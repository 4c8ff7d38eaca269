"""Table changelogs through librdkafka: what a table write sends, and when a confirmation returns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import KafkaError

from core.exceptions import KafkaAuthorizationError
from streams.exceptions import ChangelogDeliveryError
from streams.runtime.changelog import ChangelogWriter, attach_changelogs, changelog_writer
from streams.runtime.tables import RawKeyTable, murmur2_partition, store_url

TOPIC = "app-state-changelog"


class _Message:
    def __init__(self, topic: str, partition: int, key: bytes, offset: int) -> None:
        self._where = (topic, partition, key, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def key(self) -> bytes:
        return self._where[2]

    def offset(self) -> int:
        return self._where[3]


class FakeProduce:
    """`KafkaOutputs.produce_nowait` that keeps each record until `deliver` reports it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes, bytes | None]] = []
        self._reports: list[tuple[tuple[str, int, bytes, bytes | None], Callable[[Any, Any], None]]] = []
        self._offsets: dict[tuple[str, int], int] = {}

    def __call__(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | None,
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        record = (topic, partition, key, value)
        self.sent.append(record)
        self._reports.append((record, on_delivery))

    def deliver(self, error: Any = None) -> None:
        """Report every record not reported yet: offsets in order per partition, or `error` for each."""
        reports, self._reports = self._reports, []
        for (topic, partition, key, _value), report in reports:
            offset = self._offsets.get((topic, partition), -1) + 1
            if error is None:
                self._offsets[(topic, partition)] = offset
            report(error, _Message(topic, partition, key, offset))


class FakeStore:
    def __init__(self) -> None:
        self.persisted: dict[tuple[str, int], int] = {}

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.persisted[(tp.topic, tp.partition)] = offset


class FakeTable:
    changelog_topic_name = TOPIC

    def __init__(self) -> None:
        self.data = FakeStore()
        self.now: dict[bytes, bytes | None] = {}

    def changelog_value_now(self, key: bytes) -> bytes | None:
        return self.now.get(key)


async def _pending(confirming: asyncio.Task[None]) -> bool:
    await asyncio.sleep(0.01)
    return not confirming.done()


def test_a_confirmation_returns_once_every_record_sent_before_it_is_confirmed() -> None:
    produce, table = FakeProduce(), FakeTable()
    writer = ChangelogWriter(produce)

    async def scenario() -> None:
        for n in range(3):
            writer.send(table, TOPIC, n % 2, f"k{n}".encode(), b"v")
        confirming = asyncio.create_task(writer.confirm())
        assert await _pending(confirming), "waits for the broker"
        produce.deliver()
        await confirming

    asyncio.run(scenario())
    assert table.data.persisted == {(TOPIC, 0): 1, (TOPIC, 1): 0}, "the highest offset, once per partition"


def test_nothing_sent_is_confirmed_at_once() -> None:
    asyncio.run(asyncio.wait_for(ChangelogWriter(FakeProduce()).confirm(), 1))


def test_a_confirmation_also_waits_for_records_of_a_round_another_one_closed() -> None:
    """Two stages of one worker share the writer: each one's records count, whoever confirms first."""
    produce, table = FakeProduce(), FakeTable()
    writer = ChangelogWriter(produce)

    async def scenario() -> None:
        writer.send(table, TOPIC, 0, b"clinical", b"v")
        first = asyncio.create_task(writer.confirm())
        await asyncio.sleep(0)
        second = asyncio.create_task(writer.confirm())  # its own round is empty
        assert await _pending(first)
        assert await _pending(second), "the record sent before it is not confirmed yet"
        produce.deliver()
        await asyncio.wait_for(asyncio.gather(first, second), 1)

    asyncio.run(scenario())


def test_a_failed_record_is_sent_again_with_its_keys_value_now_and_the_confirmation_fails() -> None:
    produce, table = FakeProduce(), FakeTable()
    writer = ChangelogWriter(produce)
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)

    async def scenario() -> None:
        writer.send(table, TOPIC, 2, b"rp-1", b"old")
        writer.send(table, TOPIC, 2, b"rp-2", b"gone")
        table.now = {b"rp-1": b"newer"}  # written again meanwhile; rp-2 deleted
        confirming = asyncio.create_task(writer.confirm())
        await asyncio.sleep(0)
        produce.deliver(timed_out)
        with pytest.raises(ChangelogDeliveryError, match="2 changelog record"):
            await confirming
        assert produce.sent[2:] == [(TOPIC, 2, b"rp-1", b"newer"), (TOPIC, 2, b"rp-2", None)]
        retry = asyncio.create_task(writer.confirm())  # what the stage's retry does
        assert await _pending(retry), "the records sent again are waited for"
        produce.deliver()
        await retry

    asyncio.run(scenario())
    assert table.data.persisted == {(TOPIC, 2): 1}


def test_a_refusal_of_the_principal_is_the_typed_refusal() -> None:
    produce, table = FakeProduce(), FakeTable()
    writer = ChangelogWriter(produce, principal="clinhub-stream-clinical")

    async def scenario() -> None:
        writer.send(table, TOPIC, 0, b"rp-1", b"v")
        confirming = asyncio.create_task(writer.confirm())
        await asyncio.sleep(0)
        produce.deliver(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
        with pytest.raises(KafkaAuthorizationError):
            await confirming

    asyncio.run(scenario())


def test_a_drain_waits_at_most_its_timeout_and_leaves_failures_to_the_next_confirmation() -> None:
    produce, table = FakeProduce(), FakeTable()
    writer = ChangelogWriter(produce)

    async def scenario() -> None:
        writer.send(table, TOPIC, 0, b"rp-1", b"v")
        await writer.drain(timeout=0.01)  # nothing reported: gives up, quietly
        produce.deliver(KafkaError(KafkaError._MSG_TIMED_OUT))
        await writer.drain(timeout=1)
        with pytest.raises(ChangelogDeliveryError):
            await writer.confirm()

    asyncio.run(scenario())


def test_a_record_produce_refuses_is_not_waited_for() -> None:
    table = FakeTable()

    def refuse(*_args: Any) -> None:
        raise ValueError("message too large")

    writer = ChangelogWriter(refuse)

    async def scenario() -> None:
        with pytest.raises(ValueError, match="too large"):
            writer.send(table, TOPIC, 0, b"rp-1", b"v")
        await asyncio.wait_for(writer.confirm(), 1)

    asyncio.run(scenario())


def _app(tmp_path: Path, store: str) -> tuple[faust.App, FakeProduce]:
    app = faust.App("changelog-test", store=store_url(store), Table=RawKeyTable, datadir=str(tmp_path))
    produce = FakeProduce()
    attach_changelogs(app, produce)
    return app, produce


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_a_table_write_sends_one_record_in_its_keys_partition_and_keeps_the_value(
    tmp_path: Path, store: str
) -> None:
    app, produce = _app(tmp_path, store)
    table = app.Table("wards", default=None, partitions=3, use_partitioner=True)
    table["rp-1"] = {"ward": "ICU"}
    del table["rp-1"]
    table["rp-2"] = "4B"
    topic = table.changelog_topic_name
    assert produce.sent == [
        (topic, murmur2_partition(b"rp-1", 3), b"rp-1", b'{"ward":"ICU"}'),
        (topic, murmur2_partition(b"rp-1", 3), b"rp-1", None),  # a tombstone
        (topic, murmur2_partition(b"rp-2", 3), b"rp-2", b'"4B"'),
    ]
    assert table.get("rp-1") is None
    assert table.get("rp-2") == "4B"
    assert table.changelog_value_now(b"rp-2") == b'"4B"'
    assert table.changelog_value_now(b"rp-1") is None
    if store.startswith("rocksdb"):
        assert table.data._dbs[murmur2_partition(b"rp-2", 3)].get(b"rp-2") == b'"4B"'


def test_a_prefix_tables_records_go_to_the_partition_of_the_patient(tmp_path: Path) -> None:
    app, produce = _app(tmp_path, "rocksdb://")
    table = app.Table("states", default=None, partitions=3, use_partitioner=True, partition_by_prefix="|")
    table["rp-7|2823-3"] = {"last_value": 6.9}
    assert [record[1] for record in produce.sent] == [murmur2_partition(b"rp-7", 3)]
    assert table.get("rp-7|2823-3") == {"last_value": 6.9}


def test_without_a_writer_a_table_write_goes_through_faust(tmp_path: Path) -> None:
    app = faust.App("changelog-test", store="memory://", Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("wards", default=None, partitions=3, use_partitioner=True)
    assert changelog_writer(app) is None
    sent: list[Any] = []
    table.send_changelog = lambda partition, key, value, *args: sent.append((key, value)) or _Sent()
    table["rp-1"] = "ICU"
    assert sent == [("rp-1", "ICU")]


class _Sent:
    message = type("PendingMessage", (), {"partition": 0})()
