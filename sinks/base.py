"""The sink contract: idempotent, all-or-nothing batch writes of the regional standard's decoded records
of every kind (`write_records(batch of StoreRecord)`)."""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.contract import STORED_RECORDS
from sinks.exceptions import StoreRejectedError

# The kinds of record the store takes: named once, in the hub's contract.
KINDS: tuple[str, ...] = STORED_RECORDS


@dataclass(frozen=True)
class StoreRecord:
    """One decoded record of the regional standard and its kind (one of KINDS).

    `record` is what fastavro decodes (uuid fields may be uuid.UUID, times are aware datetimes), with the
    normaliser's fields filled in (`regional_patient_id`; `patient_national_id` must be None). For
    "identity" it is an IdentityLink: institution_id, patient_mrn, regional_patient_id, alias_of,
    linked_time (link_id optional).
    """

    kind: str
    record: Mapping[str, Any]


@dataclass(frozen=True)
class StoreWriteResult:
    """Per kind, how many records of the batch changed the store and how many changed nothing.

    A record is *written* when it inserted or replaced a row (for "vitals" one record is one set of
    measurements; for "encounter" the event joins the history even when an older event leaves the
    encounter's current state alone). It is *unchanged* when it was a redelivery of an event id the
    store already has, an older version than the stored one, superseded by a newer version in the same
    batch, or (alerts) repeated without a higher `suppressed_repeats`. written + unchanged = records.
    """

    written: Mapping[str, int] = field(default_factory=dict)
    unchanged: Mapping[str, int] = field(default_factory=dict)

    def __add__(self, other: StoreWriteResult) -> StoreWriteResult:
        return StoreWriteResult(
            dict(Counter(self.written) + Counter(other.written)),
            dict(Counter(self.unchanged) + Counter(other.unchanged)),
        )

    @property
    def total_written(self) -> int:
        return sum(self.written.values())


class Sink(abc.ABC):
    @abc.abstractmethod
    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        """Write the whole batch in one transaction or nothing; redelivery changes nothing.

        Raise StoreUnavailableError when a retry of the whole batch may succeed, StoreRejectedError
        when the data itself is refused (then `write_records_isolating` finds the culprits).
        """


def write_records_isolating(
    sink: Sink, batch: Sequence[StoreRecord]
) -> tuple[StoreWriteResult, list[tuple[int, StoreRejectedError]]]:
    """Write the batch; if the store refuses it, bisect to find the refused records and write the rest.

    Good records end up written exactly once (writes are idempotent); refused ones come back with their
    index in `batch`, for the dead-letter topic. StoreUnavailableError propagates: retry the whole batch.
    A record is only called refused when a second write of it alone is refused too: an error the
    database raised once (a trigger, a check on changing state) must not dead-letter a good record.
    A batch of n records with k refused takes about 2k·log2(n) + k writes.
    """
    try:
        return sink.write_records(batch), []
    except StoreRejectedError:
        if len(batch) == 1:
            try:
                return sink.write_records(batch), []
            except StoreRejectedError as again:
                return StoreWriteResult(), [(0, again)]
    middle = len(batch) // 2
    left, left_rejected = write_records_isolating(sink, batch[:middle])
    right, right_rejected = write_records_isolating(sink, batch[middle:])
    return left + right, left_rejected + [(index + middle, exc) for index, exc in right_rejected]
