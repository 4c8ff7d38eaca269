"""A batch the store refuses is bisected: refused items are isolated, every other item is written once."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sinks.base import Sink, SinkItem, WriteResult, write_isolating
from sinks.exceptions import StoreRejectedError, StoreUnavailableError
from tests.unit.sinks.test_sql_sink import item


class RefusingSink(Sink):
    """Refuses any batch containing a poisoned event id, as a database constraint would."""

    def __init__(self, poisoned: set[str], unavailable: bool = False) -> None:
        self.poisoned = poisoned
        self.unavailable = unavailable
        self.stored: list[str] = []
        self.calls = 0

    def write(self, batch: Sequence[SinkItem]) -> WriteResult:
        self.calls += 1
        if self.unavailable:
            raise StoreUnavailableError("down")
        ids = [item.lab.event_id for item in batch]
        if self.poisoned & set(ids):
            raise StoreRejectedError("value too long for type character varying(8)")
        new = {i for i in ids if i not in self.stored}
        self.stored.extend(sorted(new))
        return WriteResult(frozenset(new), frozenset())


@pytest.mark.parametrize(
    ("size", "poisoned_at"),
    [(1, [0]), (2, [1]), (7, [0]), (7, [6]), (8, [2, 5]), (16, [0, 1, 15]), (5, [])],
)
def test_refused_items_are_isolated_and_the_rest_written_once(size: int, poisoned_at: list[int]) -> None:
    batch = [item() for _ in range(size)]
    poisoned = {batch[i].lab.event_id for i in poisoned_at}
    sink = RefusingSink(poisoned)

    result, refused = write_isolating(sink, batch)

    assert sorted(index for index, _ in refused) == poisoned_at
    assert all(isinstance(error, StoreRejectedError) for _, error in refused)
    expected = {entry.lab.event_id for entry in batch} - poisoned
    assert set(sink.stored) == expected
    assert len(sink.stored) == len(expected), "no item may be written twice"
    assert result.new_event_ids == frozenset(expected)


def test_a_clean_batch_is_one_write() -> None:
    sink = RefusingSink(set())
    write_isolating(sink, [item() for _ in range(50)])
    assert sink.calls == 1


def test_an_unavailable_store_is_not_mistaken_for_refused_data() -> None:
    """An outage must propagate (the batch is retried whole), never turn items into dead letters."""
    with pytest.raises(StoreUnavailableError):
        write_isolating(RefusingSink(set(), unavailable=True), [item() for _ in range(4)])
