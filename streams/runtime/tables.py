"""Tables for state written outside stream iteration (batch handlers, timers), on RocksDB or in memory.

Faust's RocksDB store (faust/stores/rocksdb.py) keeps one RocksDB database per changelog partition and
picks the database of a write from the *current event* (`_set` asserts there is one). The clinical and
normaliser agents write their tables after a `linger_take` batch, and the escalation timer writes with no
event at all, so the stock store fails there.

The tables are created with `use_partitioner=True`: the changelog partition of a key is the producer's
partitioner's choice for the serialised key (aiokafka's DefaultPartitioner, murmur2 like Java). This store
puts the local copy in the database of that same partition, so the local database of partition N holds
exactly the keys of changelog partition N: recovery (which writes changelog records into the database of
their partition), the persisted changelog offsets and rebalancing all stay consistent.

Reads go to that one database too. Faust's own `_get`/`_contains` for `use_partitioner` tables look a key
up in its key index or else in every open partition database, and a table read is a `contains` and then
a `get`: a key the worker has not seen (most, after a restart or for a new patient) cost six RocksDB
look-ups. `_del` keeps Faust's (the indexed or every database).

Reads of a RocksDB table are cached, decoded (`RawKeyTable.get`, at most CACHED_VALUES keys a table):
each result judged read its analyte state from RocksDB and decoded its JSON, and the normaliser each
event's identity link, though the worker itself had written most of them a moment before. Writes and
deletes through the table update the cache; anything that writes the store behind it (recovery from the
changelog, a rebalance) empties it, and a read that raced with a write is not kept. Values read are
shared: callers must not change them in place (write a new value instead).

A key's partition is `RawKeyTable.key_partition`: murmur2 of its bytes (of the patient's, for a prefix
table) over the table's partitions, as Faust's producer hashes it, computed once per key (cached). With
a `ChangelogWriter` on the app (streams/runtime/changelog.py) a table write is serialised once and its
changelog record goes through librdkafka, confirmed before the batch is acked; without one (tests, or a
worker publishing elsewhere) through Faust's producer as before.
"""

from __future__ import annotations

import threading
from typing import Any

import faust
import rocksdict
from faust import stores
from faust.stores import rocksdb
from murmurhash2 import murmurhash2

from streams.runtime.changelog import changelog_writer

SCHEME = "rocksdb-keyed"


KEY_PARTITIONS_CACHED = 100_000  # key -> changelog partition; a key's partition never changes
CACHED_VALUES = 4096  # decoded values kept per RocksDB table (an analyte state is ~8 KB decoded)
_ABSENT = object()  # cached: the key has no value
_UNKNOWN = object()  # not cached


class KeyPartitionedRocksDBStore(rocksdb.Store):
    """Also: RocksDB's write-ahead log is off (`_open_for_partition`). The changelog is the table's
    durable copy, and a write reaches the local database only after its changelog record was sent; a
    crash loses the local database's latest writes (its memtable), never an older one without the
    newer, the persisted changelog offset among them: the recovery reads those records again from the
    changelog. A write cost 2.6x with the log (9.8 against 3.7 us). A clean stop or a revoked partition
    flushes the memtable first, so a restart does not read it again."""

    _partition_of: dict[bytes, int]

    def _open_for_partition(self, partition: int) -> Any:
        db = super()._open_for_partition(partition)
        if self.use_rocksdict:
            options = rocksdict.WriteOptions()
            options.disable_wal = True  # type: ignore[method-assign,assignment]  # a property; the stub says method
            db.set_write_options(options)
        return db

    def _flush(self, partitions: Any) -> None:
        for partition in partitions:
            db = self._dbs.get(partition)
            if db is not None and self.use_rocksdict:
                db.flush(True)  # waits for the memtable to be written

    def revoke_partitions(self, table: Any, tps: Any) -> None:
        self._flush([tp.partition for tp in tps if tp.topic in table.changelog_topic.topics])
        super().revoke_partitions(table, tps)

    async def stop(self) -> None:
        self._flush(list(self._dbs))
        await super().stop()

    def _key_partition(self, key: bytes) -> int:
        """The partition of the key's changelog record: `RawKeyTable.key_partition`; for another table
        the very computation Table.send_changelog makes for it (eager_partitioning), which raises when
        the producer has no metadata for the changelog topic yet.
        """
        if isinstance(self.table, RawKeyTable):
            return self.table.key_partition(key)
        cache = self.__dict__.setdefault("_partition_of", {})
        partition = cache.get(key)
        if partition is None:
            table: Any = self.table  # the concrete Collection has changelog_topic_name
            partition = self.app.producer.key_partition(table.changelog_topic_name, key).partition
            if len(cache) >= KEY_PARTITIONS_CACHED:
                cache.clear()
            cache[key] = partition
        return partition

    def _get(self, key: bytes) -> bytes | None:
        if not self.table.use_partitioner:
            return super()._get(key)
        try:
            partition = self._key_partition(key)
        except Exception:  # noqa: BLE001 - no partition metadata yet: Faust's search of every database
            return super()._get(key)
        db = self._dbs.get(partition)  # not open: the partition is not assigned here, so nothing is
        return None if db is None else db.get(key)

    def _contains(self, key: bytes) -> bool:
        if not self.table.use_partitioner:
            return super()._contains(key)
        return self._get(key) is not None

    def _set(self, key: bytes, value: bytes | None) -> None:
        if not self.table.use_partitioner:
            super()._set(key, value)  # co-partitioned tables: the current event's partition, as in Faust
            return
        self.put_in_partition(self._key_partition(key), key, value)

    def put_in_partition(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Write a serialised value in the database of its changelog partition."""
        self._db_for_partition(partition).put(key, value)
        self._key_index[key] = partition


# Kafka's murmur2 seed (Java's Utils.murmur2, librdkafka's murmur2 partitioners, aiokafka's murmur2)
KAFKA_MURMUR2_SEED = 0x9747B28C


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Java clients, librdkafka's murmur2 partitioners and aiokafka choose for a key.
    Compiled murmur2 (murmurhash2): aiokafka's, in Python, took 3.5 us a key, 5% of the clinical
    stage's time at 900 events/s with new patients arriving; this takes 0.14 us."""
    return (murmurhash2(key, KAFKA_MURMUR2_SEED) & 0x7FFFFFFF) % partitions


def store_url(configured: str) -> str:
    """The Faust store URL for the configured one: "rocksdb://..." means this store."""
    if configured.startswith("rocksdb://"):
        # faust.stores resolves a store URL by its scheme through these aliases
        stores.STORES.aliases.setdefault(SCHEME, f"{__name__}:KeyPartitionedRocksDBStore")
        return SCHEME + configured[len("rocksdb") :]
    return configured


class RawKeyTable(faust.Table):
    """A table whose str keys go to the changelog and the store as their UTF-8 bytes, not as JSON.

    Faust derives a table's key serializer from `key_type` only (json unless the type is bytes or a
    model), so a str key "rp-1" is written as b'"rp-1"' and `use_partitioner` hashes the quotes too: the
    changelog partition is then not the partition of the same key on the source topics (b"rp-1").
    `App(..., Table=RawKeyTable)` makes every `app.Table` of the app use raw str keys.
    """

    def __init__(self, app: Any, *, partition_by_prefix: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("key_type", str)
        self.partition_by_prefix = partition_by_prefix
        self._prefix = partition_by_prefix.encode() if partition_by_prefix is not None else None
        self._partition_of: dict[bytes, int] = {}
        self._topic_name: str | None = None
        self._values: dict[Any, Any] = {}  # key -> decoded value or _ABSENT (RocksDB tables only)
        self._values_lock = threading.Lock()  # reads run in worker threads, writes on the event loop
        self._values_generation = 0  # bumped by every write: a read that raced with one is not kept
        self._caching: bool | None = None  # decided on first read: the store is made lazily
        super().__init__(app, **kwargs)
        if self.key_type is str:
            # before TableManager.add builds the changelog topic and before the store is made
            self.key_serializer = "raw"

    def changelog_partition(self, key: bytes) -> int | None:
        """With `partition_by_prefix`, a composite key "<patient>|<more>" goes to the partition of
        "<patient>" alone, the partition of the patient's events on the source topics; so state can be
        kept in small pieces per patient and still move with the patient's partition. None: the
        producer's partitioner hashes the whole key."""
        if self.partition_by_prefix is None:
            return None
        return self.key_partition(key)

    def key_partition(self, key: bytes) -> int:
        """The changelog partition of a serialised key, as Faust's producer (aiokafka's murmur2
        partitioner, like Java's) chooses it for a `use_partitioner` table: murmur2 of the key, or of its
        patient before the prefix, over the table's partitions. Computed once per key."""
        partition = self._partition_of.get(key)
        if partition is None:
            owner = key.split(self._prefix, 1)[0] if self._prefix is not None else key
            partition = murmur2_partition(owner, self.partitions or self.app.conf.topic_partitions)
            if len(self._partition_of) >= KEY_PARTITIONS_CACHED:
                self._partition_of.clear()
            self._partition_of[key] = partition
        return partition

    def __setitem__(self, key: Any, value: Any) -> None:
        """Faust's write (changelog record, then the store) with the value serialised once and the
        record sent through the app's ChangelogWriter, when it has one."""
        writer = changelog_writer(self.app)
        if writer is None or not self.use_partitioner:
            super().__setitem__(key, value)
            self._cache(key, value)
            return
        store: Any = self.data
        key_bytes = store._encode_key(key)
        value_bytes = store._encode_value(value)
        partition = self.key_partition(key_bytes)
        writer.send(self, self._changelog_name(), partition, key_bytes, value_bytes)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)
        if isinstance(store, KeyPartitionedRocksDBStore):
            store.put_in_partition(partition, key_bytes, value_bytes)
        else:
            store[key] = value  # the memory store keeps values as they are
        self._cache(key, value)

    def __delitem__(self, key: Any) -> None:
        """Faust's delete (a tombstone, then the store), the tombstone through the app's ChangelogWriter."""
        writer = changelog_writer(self.app)
        if writer is None or not self.use_partitioner:
            super().__delitem__(key)
            self._cache(key, _ABSENT)
            return
        store: Any = self.data
        key_bytes = store._encode_key(key)
        partition = self.key_partition(key_bytes)
        writer.send(self, self._changelog_name(), partition, key_bytes, None)
        self._maybe_del_key_ttl(key, partition)
        self._sensor_on_del(self, key)
        del self.data[key]
        self._cache(key, _ABSENT)

    def changelog_value_now(self, key: bytes) -> bytes | None:
        """The serialised value a key has now (None: it has none, a tombstone), to send again."""
        store: Any = self.data
        decoded = store._decode_key(key)
        if decoded not in store:
            return None
        value: bytes | None = store._encode_value(store[decoded])
        return value

    def _changelog_name(self) -> str:
        if self._topic_name is None:
            self._topic_name = str(self.changelog_topic_name)
        return self._topic_name

    def partition_for_key(self, key: Any) -> int | None:
        if self.partition_by_prefix is None:
            return super().partition_for_key(key)
        return self.changelog_partition(key.encode() if isinstance(key, str) else key)

    def get(self, key: Any, default: Any = None) -> Any:
        """One store read (Mapping.get asks `key in data` and then `data[key]`, two look-ups), or
        none: a RocksDB table's values are cached, decoded (see the module)."""
        if self.default is not None:
            return super().get(key, default)  # a missing key reads as the table's default
        self.on_key_get(key)
        if self._caching is None:
            self._caching = isinstance(self.data, KeyPartitionedRocksDBStore)
        if not self._caching:
            try:
                return self.data[key]
            except KeyError:
                return default
        found = self._values.get(key, _UNKNOWN)
        if found is _UNKNOWN:
            generation = self._values_generation
            try:
                found = self.data[key]
            except KeyError:
                found = _ABSENT
            with self._values_lock:
                if generation == self._values_generation:  # no write since the read began
                    if len(self._values) >= CACHED_VALUES:
                        self._values.clear()
                    self._values[key] = found
        return default if found is _ABSENT else found

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Every key written as by `table[key] = value` (Faust's update writes the store directly)."""
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def _cache(self, key: Any, value: Any) -> None:
        """After a write of the store: the key's value now (_ABSENT once deleted)."""
        with self._values_lock:
            self._values_generation += 1
            if self._caching:
                self._values[key] = value

    def _forget_values(self) -> None:
        """The store was written behind the table (recovery, a rebalance): nothing cached holds."""
        with self._values_lock:
            self._values_generation += 1
            self._values.clear()

    async def on_rebalance(
        self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0
    ) -> None:
        self._forget_values()
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        self._forget_values()

    def apply_changelog_batch(self, batch: Any) -> None:
        self._forget_values()
        super().apply_changelog_batch(batch)
        self._forget_values()

    async def on_recovery_completed(self, active_tps: Any, standby_tps: Any) -> None:
        self._forget_values()
        await super().on_recovery_completed(active_tps, standby_tps)

    def reset_state(self) -> None:
        self._forget_values()
        super().reset_state()
