"""Table wiring that decides where state lives: the store for a URL, and how keys are serialised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import pytest

from streams.runtime.tables import SCHEME, RawKeyTable, murmur2_partition, store_url


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ("rocksdb://", f"{SCHEME}://"),
        ("rocksdb:///var/state", f"{SCHEME}:///var/state"),
        ("memory://", "memory://"),
    ],
)
def test_rocksdb_means_the_store_that_partitions_by_key(configured: str, expected: str) -> None:
    assert store_url(configured) == expected


def test_the_keyed_store_is_what_faust_builds_for_the_url(tmp_path: Path) -> None:
    app = faust.App("tables-test", store=store_url("rocksdb://"), Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("state", default=None, partitions=3, use_partitioner=True)
    assert type(table.data).__name__ == "KeyPartitionedRocksDBStore"


def test_str_keys_reach_the_changelog_as_their_bytes_not_json(tmp_path: Path) -> None:
    """JSON keys would be hashed with their quotes, so the changelog partition would not be the topic's."""
    app = faust.App("tables-test", store="memory://", Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("state", default=None, partitions=3, use_partitioner=True)
    assert table.key_serializer == "raw"
    assert table.changelog_topic.key_serializer == "raw"
    assert app.serializers.dumps_key(table.changelog_topic.key_type, "rp-1", serializer="raw") == b"rp-1"


def _keyed_store(tmp_path: Path, partitions: dict[bytes, int]) -> Any:
    """The table's RocksDB store, with the changelog partitions of some keys already known (cached)."""
    app = faust.App("tables-test", store=store_url("rocksdb://"), Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("state", default=None, partitions=3, use_partitioner=True)
    table._partition_of.update(partitions)
    return table.data


def test_a_key_is_written_to_and_read_from_the_database_of_its_changelog_partition(tmp_path: Path) -> None:
    store = _keyed_store(tmp_path, {b"rp-1": 2, b"rp-2": 0})
    store._set(b"rp-1", b"one")
    store._set(b"rp-2", b"two")
    assert sorted(store._dbs) == [0, 2]
    assert store._dbs[2].get(b"rp-1") == b"one"
    assert store._dbs[0].get(b"rp-1") is None
    assert store._get(b"rp-1") == b"one"
    assert store._contains(b"rp-2")


def _wal_bytes(path: Path) -> int:
    return sum(log.stat().st_size for log in path.glob("*.log"))


def _flushed(path: Path) -> bool:
    """The memtable was written to a table file (a database still open holds it in memory otherwise)."""
    return any(path.glob("*.sst"))


def test_writes_skip_the_write_ahead_log_and_a_stop_flushes_them(tmp_path: Path) -> None:
    import asyncio

    store = _keyed_store(tmp_path, {b"rp-1": 2})
    for n in range(200):
        store._set(b"rp-1", b"value %d" % n)
    path = store.partition_path(2)
    held = store._dbs[2]  # Faust drops its databases at stop without closing them; this one stays open
    assert _wal_bytes(path) == 0  # the changelog is the durable copy
    assert not _flushed(path)
    asyncio.run(store.stop())
    assert _flushed(path)
    assert held.get(b"rp-1") == b"value 199"


def test_a_revoked_partition_is_flushed_before_it_is_dropped(tmp_path: Path) -> None:
    from faust.types import TP

    store = _keyed_store(tmp_path, {b"rp-1": 2, b"rp-2": 0})
    store._set(b"rp-1", b"one")
    store._set(b"rp-2", b"two")
    held = store._dbs[2]
    topic = next(iter(store.table.changelog_topic.topics))
    store.revoke_partitions(store.table, {TP(topic, 2)})
    assert sorted(store._dbs) == [0]
    assert _flushed(store.partition_path(2))
    assert not _flushed(store.partition_path(0))  # still held, not flushed
    assert held.get(b"rp-1") == b"one"


def test_a_key_of_a_partition_not_held_here_reads_as_absent(tmp_path: Path) -> None:
    store = _keyed_store(tmp_path, {b"rp-1": 2, b"rp-9": 1})
    store._set(b"rp-1", b"one")
    assert 1 not in store._dbs
    assert store._get(b"rp-9") is None
    assert not store._contains(b"rp-9")


def test_a_keys_partition_is_murmur2_over_the_tables_partitions_without_a_broker(tmp_path: Path) -> None:
    """As Faust's producer (aiokafka's murmur2 partitioner) chooses it, with no metadata to wait for."""
    from aiokafka.partitioner import DefaultPartitioner

    store = _keyed_store(tmp_path, {})
    keys = [f"rp-{n}".encode() for n in range(20)]
    for key in keys:
        store._set(key, b"v")
    for key in keys:
        expected = DefaultPartitioner()(key, [0, 1, 2], [0, 1, 2])
        assert store.table.key_partition(key) == expected
        assert store._dbs[expected].get(key) == b"v"
        assert store._get(key) == b"v"


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_get_reads_a_value_or_the_default_given(tmp_path: Path, store: str) -> None:
    app = faust.App("tables-test", store=store_url(store), Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("state", default=None, partitions=3, use_partitioner=True)
    if store.startswith("rocksdb"):
        table._partition_of.update({b"rp-1": 1, b"rp-2": 2})
    table.data["rp-1"] = {"ward": "ICU"}  # the store itself: a table write would send a changelog record
    assert table.get("rp-1") == {"ward": "ICU"}
    assert table.get("rp-2") is None
    assert table.get("rp-2", "none") == "none"


def test_a_table_with_a_default_still_reads_missing_keys_as_it(tmp_path: Path) -> None:
    app = faust.App("tables-test", store="memory://", Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("counts", default=int, partitions=3, use_partitioner=True)
    assert table.get("rp-1") == 0


@pytest.mark.parametrize("patient", [b"rp-1", b"rp-3f9a0c", "rp-患者".encode()])
def test_a_prefix_partitioned_key_goes_to_the_partition_of_its_patient(
    tmp_path: Path, patient: bytes
) -> None:
    """Composite state keys must stay in the partition of the patient's events (murmur2 of the patient)."""
    from aiokafka.partitioner import DefaultPartitioner

    app = faust.App("tables-test", store=store_url("rocksdb://"), Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("states", default=None, partitions=3, use_partitioner=True, partition_by_prefix="|")
    expected = DefaultPartitioner()(patient, [0, 1, 2], [0, 1, 2])
    assert murmur2_partition(patient, 3) == expected
    key = patient + b"|2823-3"
    assert table.changelog_partition(key) == expected
    assert table.partition_for_key(key.decode()) == expected
    table.data._set(key, b"state")  # no producer, no cache: the table's own partition
    assert list(table.data._dbs) == [expected]
    assert table.data._get(key) == b"state"


def test_tables_without_a_prefix_leave_the_partition_to_the_producer(tmp_path: Path) -> None:
    app = faust.App("tables-test", store="memory://", Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("wards", default=None, partitions=3, use_partitioner=True)
    assert table.changelog_partition(b"rp-1|x") is None
    assert table.partition_for_key("rp-1|x") is None


def _cached_table(tmp_path: Path) -> Any:
    """A RocksDB table whose changelog goes to a stand-in producer (streams/runtime/changelog.py)."""
    from streams.runtime.changelog import attach_changelogs
    from tests.unit.streams.runtime.test_changelog import FakeProduce

    app = faust.App("tables-test", store=store_url("rocksdb://"), Table=RawKeyTable, datadir=str(tmp_path))
    attach_changelogs(app, FakeProduce())
    return app.Table("states", default=None, partitions=3, use_partitioner=True)


def test_a_rocksdb_tables_reads_are_cached_and_its_writes_and_deletes_keep_the_cache_true(
    tmp_path: Path,
) -> None:
    table = _cached_table(tmp_path)
    table["rp-1"] = {"v": 1}
    assert table.get("rp-1") == {"v": 1}
    assert table.get("rp-2") is None
    table.data._set(b"rp-1", b'{"v":"behind"}')  # the store written behind the table: not read again
    table.data._set(b"rp-2", b'{"v":"behind"}')
    assert table.get("rp-1") == {"v": 1}
    assert table.get("rp-2", "none") == "none", "an absent key is cached too"
    table["rp-1"] = {"v": 2}
    del table["rp-2"]
    assert table.get("rp-1") == {"v": 2}
    assert table.get("rp-2") is None
    table.update({"rp-3": {"v": 3}})
    assert table.get("rp-3") == {"v": 3}


@pytest.mark.parametrize("behind", ["recovery", "rebalance"])
def test_what_writes_the_store_behind_the_table_empties_the_cache(tmp_path: Path, behind: str) -> None:
    import asyncio

    table = _cached_table(tmp_path)
    table["rp-1"] = {"v": 1}
    assert table.get("rp-1") == {"v": 1}
    table.data._set(b"rp-1", b'{"v":"recovered"}')
    if behind == "recovery":
        table.apply_changelog_batch([])
    else:
        asyncio.run(table.on_rebalance(set(), set(), set(), 1))
    assert table.get("rp-1") == {"v": "recovered"}


def test_a_read_that_raced_with_a_write_is_not_kept(tmp_path: Path) -> None:
    """Reads run in worker threads (asyncio.to_thread) while timers write on the event loop."""
    table = _cached_table(tmp_path)
    table["rp-1"] = {"v": 1}
    store = table.data
    read = store._get

    def read_while_written(key: bytes) -> Any:
        value = read(key)
        table["rp-2"] = {"v": 2}  # any write between the read and its caching
        return value

    table._forget_values()
    store._get = read_while_written
    assert table.get("rp-1") == {"v": 1}
    store._get = read
    store._set(b"rp-1", b'{"v":"newer"}')
    assert table.get("rp-1") == {"v": "newer"}, "the raced read was not cached"


def test_a_memory_table_is_read_as_it_is(tmp_path: Path) -> None:
    app = faust.App("tables-test", store="memory://", Table=RawKeyTable, datadir=str(tmp_path))
    table = app.Table("wards", default=None, partitions=3, use_partitioner=True)
    table.data["rp-1"] = "ICU"
    assert table.get("rp-1") == "ICU"
    table.data["rp-1"] = "4B"
    assert table.get("rp-1") == "4B"


def test_the_compiled_murmur2_partitions_as_kafkas_partitioner_does() -> None:
    import random

    from aiokafka.partitioner import DefaultPartitioner

    rng = random.Random(15)
    keys = [rng.randbytes(rng.randrange(0, 64)) for _ in range(5000)] + [b"rp-1|2823-3", "rp-\u00e9".encode()]
    for partitions in (1, 3, 12):
        expected = [DefaultPartitioner()(key, list(range(partitions)), []) for key in keys]
        assert [murmur2_partition(key, partitions) for key in keys] == expected
