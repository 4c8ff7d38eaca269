"""The sink contract: one `write(batch)` that is idempotent and all-or-nothing."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

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
        """Write the whole batch in one transaction or nothing; raise StoreUnavailableError to be retried."""
