"""The store names no event kind of its own: what it takes comes from core.contract, each kind's converter
registers itself, and the sink refuses to start when the two disagree."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from core import contract
from sinks import records
from sinks.base import KINDS
from sinks.queries import TIMELINE_KINDS, TIMELINE_SOURCES
from sinks.records import CONVERTERS, Prepared, check_converters, converts
from sinks.sql import SqlStoreSink
from sinks.store import make_engine


def test_the_store_takes_the_contracts_stored_records() -> None:
    assert KINDS == contract.STORED_RECORDS
    assert set(contract.KINDS) <= set(KINDS)
    assert contract.DEADLETTER.name in KINDS  # kept without its bytes, for the console


def test_every_stored_record_has_exactly_one_converter() -> None:
    assert sorted(CONVERTERS) == sorted(KINDS)
    check_converters()


def _imaging(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    return Prepared(index=index, kind="imaging", time=now)


def test_a_stored_record_without_a_converter_stops_the_sink_being_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(records, "KINDS", (*KINDS, "imaging"))
    with pytest.raises(LookupError, match="missing \\['imaging'\\]"):
        check_converters()
    with pytest.raises(LookupError, match="imaging"):
        SqlStoreSink(make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}"))


def test_a_converter_for_no_stored_record_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CONVERTERS, "imaging", _imaging)
    with pytest.raises(LookupError, match="not a stored record \\['imaging'\\]"):
        check_converters()


def test_a_second_converter_for_a_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="two converters for 'lab'"):
        converts("lab")(_imaging)
    assert CONVERTERS["lab"] is not _imaging


def test_the_timeline_shows_the_kinds_of_its_sources_once_each() -> None:
    assert tuple(kind for source in TIMELINE_SOURCES for kind in source.kinds) == TIMELINE_KINDS
    assert len(set(TIMELINE_KINDS)) == len(TIMELINE_KINDS)
    assert set(TIMELINE_KINDS) <= set(KINDS)
