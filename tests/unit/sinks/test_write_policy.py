"""The store's write policies as data: every table has one that fits its schema, and the batch-side rule
(`keep_newest`, `merge_newest`) picks the row the database-side rule would keep."""

from __future__ import annotations

import datetime as dt

import pytest

from sinks.base import KINDS
from sinks.models import CONSOLE_TABLES, Base
from sinks.records import prepare
from sinks.sql import POLICIES, VITALS_SET, WRITE_POLICIES
from sinks.write_policy import Precedence, WritePolicy, keep_newest, merge_newest
from tests.unit.sinks.factory import NOW, realistic_batch

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def test_every_table_has_exactly_one_policy() -> None:
    """Every table of the store, that is every table but the console's own, which the store never writes."""
    assert len(POLICIES) == len(WRITE_POLICIES)
    assert set(POLICIES) == set(Base.metadata.tables) - set(CONSOLE_TABLES)


def test_the_console_tables_are_tables_and_none_has_a_policy() -> None:
    assert len(set(CONSOLE_TABLES)) == len(CONSOLE_TABLES)
    assert set(CONSOLE_TABLES) <= set(Base.metadata.tables)
    assert not set(CONSOLE_TABLES) & set(POLICIES)
    assert {"dead_letters", "alerts"} <= set(POLICIES), "the console reads these; the store writes them"


@pytest.mark.parametrize("policy", WRITE_POLICIES, ids=lambda policy: policy.name)
def test_a_policy_conflicts_on_its_table_primary_key(policy: WritePolicy) -> None:
    """ON CONFLICT needs a unique index over exactly the conflict columns: the primary key is one."""
    assert set(policy.precedence.key) == {column.name for column in policy.table.primary_key.columns}


@pytest.mark.parametrize("policy", WRITE_POLICIES, ids=lambda policy: policy.name)
def test_a_policy_names_only_its_table_columns(policy: WritePolicy) -> None:
    columns = set(policy.table.columns.keys())
    named = set(policy.precedence.version) | set(policy.replaced_columns) | set(policy.fills)
    assert named <= columns
    assert not (set(policy.replaced_columns) | set(policy.fills)) & set(policy.precedence.key)
    if policy.precedence.version:
        assert policy.replaced_columns or policy.fills, "a newer row must change something"
    else:
        assert not policy.fills, "without a version no row ever replaces another"


def test_the_vitals_set_is_the_observation_key_without_the_measurement() -> None:
    observation = POLICIES["observations"].precedence
    assert VITALS_SET.version == observation.version
    assert VITALS_SET.key == tuple(column for column in observation.key if column != "component")


def test_every_table_a_converter_fills_has_a_policy() -> None:
    batch = realistic_batch(seed=7, count=300)
    assert {item.kind for item in batch} == set(KINDS), "the batch should hold every stored kind"
    tables = {table for index, item in enumerate(batch) for table in prepare(index, item, NOW).rows}
    assert tables <= set(POLICIES)
    assert not tables & set(CONSOLE_TABLES)


def test_a_versioned_policy_replaces_every_column_but_the_key_unless_told() -> None:
    policy = POLICIES["medication_orders"]
    assert policy.replaced_columns == tuple(
        column.name for column in policy.table.columns if column.name not in policy.precedence.key
    )
    assert POLICIES["alerts"].replaced_columns == ("suppressed_repeats", "changed_time")
    assert POLICIES["dead_letters"].replaced_columns == (), "insert-or-ignore by dead-letter id"
    assert POLICIES["encounter_events"].replaced_columns == ()


EVENT = Precedence(("id",), ("time", "event"))


def test_keep_newest_keeps_the_higher_version_per_key() -> None:
    pairs = [
        ("a-old", {"id": "a", "time": T0, "event": "e1"}),
        ("b", {"id": "b", "time": T0, "event": "e9"}),
        ("a-new", {"id": "a", "time": T0 + dt.timedelta(minutes=1), "event": "e0"}),
        ("a-older", {"id": "a", "time": T0 - dt.timedelta(minutes=1), "event": "e9"}),
    ]
    kept = keep_newest(pairs, EVENT)
    assert {key: entry for key, (entry, _) in kept.items()} == {("a",): "a-new", ("b",): "b"}


def test_keep_newest_breaks_a_time_tie_by_the_next_version_column() -> None:
    pairs = [
        ("low", {"id": "a", "time": T0, "event": "e1"}),
        ("high", {"id": "a", "time": T0, "event": "e2"}),
    ]
    assert keep_newest(pairs, EVENT)[("a",)][0] == "high"
    assert keep_newest(reversed(pairs), EVENT)[("a",)][0] == "high"


def test_keep_newest_keeps_the_first_of_equal_versions_and_without_a_version() -> None:
    same = [
        ("first", {"id": "a", "time": T0, "event": "e1"}),
        ("copy", {"id": "a", "time": T0, "event": "e1"}),
    ]
    assert keep_newest(same, EVENT)[("a",)][0] == "first"
    unversioned = Precedence(("id",))
    pairs = [("first", {"id": "a", "n": 1}), ("second", {"id": "a", "n": 2})]
    assert keep_newest(pairs, unversioned)[("a",)][0] == "first"


def test_keep_newest_keys_on_every_key_column() -> None:
    two = Precedence(("site", "id"))
    pairs = [(1, {"site": "H1", "id": "a"}), (2, {"site": "H2", "id": "a"}), (3, {"site": "H1", "id": "a"})]
    assert {key: entry for key, (entry, _) in keep_newest(pairs, two).items()} == {
        ("H1", "a"): 1,
        ("H2", "a"): 2,
    }


def test_merge_newest_fills_gaps_from_older_rows_and_treats_no_version_as_oldest() -> None:
    patients = POLICIES["patients"]
    rows = [
        {"regional_patient_id": "p", "birth_year": None, "sex": None, "demographics_time": T0, "n": 2},
        {"regional_patient_id": "p", "birth_year": 1970, "sex": "F", "demographics_time": None, "n": 1},
        {
            "regional_patient_id": "p",
            "birth_year": None,
            "sex": "M",
            "demographics_time": T0 - dt.timedelta(1),
            "n": 3,
        },
        {"regional_patient_id": "q", "birth_year": None, "sex": None, "demographics_time": None, "n": 4},
    ]
    merged = merge_newest(rows, patients)
    assert merged[("p",)] == {
        "regional_patient_id": "p",
        "birth_year": 1970,
        "sex": "M",
        "demographics_time": T0,
        "n": 2,
    }
    assert merged[("q",)]["n"] == 4


def test_oldest_first_sorts_a_null_before_any_value_column_by_column() -> None:
    rows = [
        {"time": T0, "event": "e2"},
        {"time": None, "event": "e9"},
        {"time": T0, "event": None},
        {"time": T0, "event": "e1"},
    ]
    assert [row["event"] for row in sorted(rows, key=EVENT.oldest_first)] == ["e9", None, "e1", "e2"]
