"""A batch the store refuses is bisected: refused records are isolated, every other record is written once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from sinks.base import Sink, StoreRecord, StoreWriteResult, write_records_isolating
from sinks.exceptions import StoreRejectedError, StoreUnavailableError
from tests.unit.sinks.factory import simulated

CASES = [
    (1, [0]),
    (2, [1]),
    (7, [0]),
    (7, [6]),
    (8, [2, 5]),
    (16, [0, 1, 15]),
    (5, []),
    (13, list(range(13))),
]


def _event_id(record: StoreRecord) -> str:
    return str(record.record["envelope"]["event_id"])


class RefusingSink(Sink):
    """Refuses any batch containing a poisoned event id, as a database constraint would."""

    def __init__(self, poisoned: set[str], unavailable: bool = False) -> None:
        self.poisoned = poisoned
        self.unavailable = unavailable
        self.stored: list[str] = []
        self.calls = 0

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        self.calls += 1
        ids = [_event_id(record) for record in batch]
        if self.unavailable:
            raise StoreUnavailableError("down")
        if self.poisoned & set(ids):
            raise StoreRejectedError("value too long for type character varying(8)")
        new = {i for i in ids if i not in self.stored}
        self.stored.extend(sorted(new))
        written: dict[str, int] = {}
        for record in batch:
            if _event_id(record) in new:
                written[record.kind] = written.get(record.kind, 0) + 1
        return StoreWriteResult(written, {})


@pytest.mark.parametrize(("size", "poisoned_at"), CASES)
def test_refused_records_are_isolated_and_the_rest_written_once(size: int, poisoned_at: list[int]) -> None:
    batch = simulated(seed=size, count=size)
    poisoned = {_event_id(batch[i]) for i in poisoned_at}
    sink = RefusingSink(poisoned)

    result, refused = write_records_isolating(sink, batch)

    assert sorted(index for index, _ in refused) == poisoned_at
    assert all(isinstance(error, StoreRejectedError) for _, error in refused)
    expected = {_event_id(record) for record in batch} - poisoned
    assert set(sink.stored) == expected
    assert len(sink.stored) == len(expected), "no record may be written twice"
    assert result.written == Counter(record.kind for record in batch if _event_id(record) not in poisoned)
    assert result.total_written == len(expected)


def test_a_clean_batch_is_one_write() -> None:
    sink = RefusingSink(set())
    write_records_isolating(sink, simulated(seed=1, count=50))
    assert sink.calls == 1


def test_an_unavailable_store_is_not_mistaken_for_refused_data() -> None:
    """An outage must propagate (the batch is retried whole), never turn records into dead letters."""
    sink = RefusingSink(set(), unavailable=True)
    with pytest.raises(StoreUnavailableError):
        write_records_isolating(sink, simulated(seed=2, count=4))
    assert sink.calls == 1


def test_results_of_the_halves_are_added_per_kind() -> None:
    left = StoreWriteResult({"lab": 2, "vitals": 1}, {"lab": 1})
    right = StoreWriteResult({"lab": 3}, {"alert": 2})
    assert left + right == StoreWriteResult({"lab": 5, "vitals": 1}, {"lab": 1, "alert": 2})


class FlakySink(RefusingSink):
    """Refuses its first write only, as a trigger or check that fails once would."""

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        if self.calls == 0:
            self.calls += 1
            raise StoreRejectedError("injected failure")
        return super().write_records(batch)


@pytest.mark.parametrize("size", [1, 2, 7])
def test_a_refusal_that_does_not_repeat_dead_letters_nothing(size: int) -> None:
    """A single record is only called refused when a second write of it is refused too."""
    batch = simulated(seed=size, count=size)
    sink = FlakySink(set())

    result, refused = write_records_isolating(sink, batch)

    assert refused == []
    assert sorted(sink.stored) == sorted({_event_id(record) for record in batch})
    assert result.total_written == size
