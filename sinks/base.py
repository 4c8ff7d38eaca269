"""The sink contract: one `write(batch)` that is idempotent and all-or-nothing."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

from sinks.exceptions import StoreRejectedError
from streams.normalise import NormalisedLab
from streams.rules import AlertDraft


@dataclass(frozen=True)
class SinkItem:
    """One normalised event and the alerts it raised, written together."""

    lab: NormalisedLab
    alerts: tuple[AlertDraft, ...] = ()


@dataclass(frozen=True)
class WriteResult:
    """What a batch changed: ids new to the store. Redelivered items appear in neither set."""

    new_event_ids: frozenset[str] = field(default_factory=frozenset)
    new_alert_ids: frozenset[str] = field(default_factory=frozenset)


class Sink(abc.ABC):
    @abc.abstractmethod
    def write(self, batch: Sequence[SinkItem]) -> WriteResult:
        """Write the whole batch in one transaction or nothing.

        Raise StoreUnavailableError when a retry may succeed, StoreRejectedError when the data itself
        is refused.
        """


def write_isolating(
    sink: Sink, batch: Sequence[SinkItem]
) -> tuple[WriteResult, list[tuple[int, StoreRejectedError]]]:
    """Write the batch; if the store refuses it, bisect to find the refused items and write the rest.

    One bad record must not block its partition forever. Good items end up written exactly once
    (writes are idempotent), refused ones are returned with their index for the dead-letter topic.
    StoreUnavailableError propagates: then the whole batch is retried later.
    """
    try:
        return sink.write(batch), []
    except StoreRejectedError as exc:
        if len(batch) == 1:
            return WriteResult(), [(0, exc)]
    middle = len(batch) // 2
    left, left_rejected = write_isolating(sink, batch[:middle])
    right, right_rejected = write_isolating(sink, batch[middle:])
    merged = WriteResult(left.new_event_ids | right.new_event_ids, left.new_alert_ids | right.new_alert_ids)
    return merged, left_rejected + [(index + middle, exc) for index, exc in right_rejected]
