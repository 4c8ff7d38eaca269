"""Table wiring that decides where state lives: the store for a URL, and how keys are serialised."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest

from streams.tables import SCHEME, RawKeyTable, store_url


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
