"""The normaliser stage: raw.<institution>.<kind> -> norm.<kind> (keyed by regional patient id),
identity links, dead letters.

`normalise_batch` is the plain function (messages in, events and rejections out); the handler
publishes its outcome, and only then remembers the identity links the batch learnt.

No critical result left silent: a lab result rejected here was never judged by the rules. When its
analyte has critical limits (`rejected_analyte`), its dead letter says `possibly_critical` with the
LOINC code, is counted by institution (`clinhub_unjudged_results_total`) and logged as POSSIBLY
CRITICAL, for that institution's staff to see and resolve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from core.contract import RawTopic, TopicNames, patient_key, regional_key
from streams.domain.codes import CodeMaps
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import NormalisedEvent, lab_loinc, missing_normalisers, normalise_event
from streams.domain.reference import ReferenceData
from streams.domain.values import FLAG_NOT_JUDGED
from streams.exceptions import RejectedEvent
from streams.runtime.messages import RawMessage, Rejection, raw_event_headers
from streams.runtime.outputs import Output
from streams.runtime.stage import Codecs, Stage, judge_each

log = logging.getLogger("clinhub.streams")


@dataclass
class NormaliseOutcome:
    events: list[tuple[RawMessage, NormalisedEvent]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # link-table updates made by this batch


@dataclass(frozen=True)
class RejectedAnalyte:
    """What a rejected message was a result of: the LOINC code when known, and whether that analyte has
    critical limits (the result could have been critical, and nobody judged it)."""

    loinc_code: str | None = None
    possibly_critical: bool = False


def rejected_analyte(
    kind: str | None,
    record: Mapping[str, Any] | None,
    institution: str | None,
    reference: ReferenceData,
) -> RejectedAnalyte:
    """The analyte of a rejected message of `kind` from the topic's `institution`, decoded as `record`
    (None when it could not be decoded).

    Only a lab result names one, as the lab normaliser resolves it (`lab_loinc`). It is possibly
    critical when the rule book has threshold (critical) limits for that LOINC code, unless the result
    was cancelled (the rules never judge a cancelled result).
    """
    if kind != "lab" or record is None:
        return RejectedAnalyte()
    loinc = lab_loinc(record, institution or "", reference)
    if not loinc:
        return RejectedAnalyte()
    limited = bool(reference.rulebook.thresholds.get(loinc)) and record.get("status") != "cancelled"
    return RejectedAnalyte(loinc, limited)


def normalise_batch(
    messages: Iterable[RawMessage],
    codecs: Codecs,
    topics: TopicNames,
    reference: ReferenceData,
    codes: CodeMaps,
    identity: RegionalIdentity,
    known_link: Callable[[str], str | None],
    now: dt.datetime,
) -> NormaliseOutcome:
    """Decode and normalise raw events of any kind; bad input becomes rejections.

    Links learnt earlier in the batch are visible to later messages of the batch. An unavailable
    registry, and any error of the hub's own code, propagate: the batch is retried or the stage stops.
    """
    links: dict[str, str] = {}
    decoded: dict[int, tuple[RawTopic, dict[str, Any]]] = {}  # by id() of a message of this batch

    def lookup(key: str) -> str | None:
        return links.get(key) or known_link(key)

    def raw_topic(message: RawMessage) -> RawTopic:
        raw = topics.parse_raw(message.topic)
        if raw is None:
            raise RejectedEvent("topic", f"{message.topic!r} is not a raw.<institution>.<kind> topic")
        return raw

    def decode(message: RawMessage) -> dict[str, Any]:
        raw = raw_topic(message)
        record = codecs.decode(raw.kind, message.value)
        decoded[id(message)] = (raw, record)
        return record

    def process(message: RawMessage, record: dict[str, Any]) -> NormalisedEvent:
        raw = raw_topic(message)
        event = normalise_event(raw.kind, record, reference, codes, identity, lookup, raw.institution, now)
        if event.identity.remember is not None:
            institution = event.record["envelope"]["institution_id"]
            links[patient_key(institution, event.record["patient_mrn"])] = event.identity.remember
        return event

    def institution_of(message: RawMessage) -> str | None:
        raw = topics.parse_raw(message.topic)
        return raw.institution if raw else None

    def with_analyte(rejection: Rejection) -> Rejection:
        raw, record = decoded.get(id(rejection.message), (None, None))
        if raw is None:
            return rejection
        analyte = rejected_analyte(raw.kind, record, raw.institution, reference)
        return dataclasses.replace(
            rejection, possibly_critical=analyte.possibly_critical, loinc_code=analyte.loinc_code
        )

    batch = list(messages)
    judged = judge_each(batch, decode, process, institution_of)
    rejections = [with_analyte(rejection) for rejection in judged.rejections]
    return NormaliseOutcome(judged.results, rejections, links)


class NormaliserHandler:
    """One batch: normalise, publish events and links and dead letters, then remember the links."""

    def __init__(self, stage: Stage, links: MutableMapping[str, str]) -> None:
        identity = stage.components.identity
        if identity is None:
            raise ValueError("the normaliser needs the regional identity (the pseudonymisation key)")
        if missing := missing_normalisers():
            raise ValueError(f"no normaliser for the kinds {', '.join(missing)}")
        self.stage = stage
        self.identity = identity
        self.links = links

    async def handle(self, messages: list[RawMessage]) -> None:
        stage, c = self.stage, self.stage.components

        async def normalise() -> NormaliseOutcome:
            return await asyncio.to_thread(
                normalise_batch,
                messages,
                stage.codecs,
                stage.topics,
                c.reference,
                c.codes,
                self.identity,
                self.links.get,
                stage.clock(),
            )

        outcome = await stage.attempt("normalise batch", normalise, messages)
        # Encoded inside the attempt: an encoder's first call registers its schema, and may fail.
        await stage.attempt("publish normalised batch", lambda: self._publish(outcome), messages)
        await stage.dead_letter(outcome.rejections, "raw")
        self._possibly_critical(outcome.rejections)
        for key, regional_id in outcome.links.items():
            self.links[key] = regional_id
        self._count(outcome)

    def _possibly_critical(self, rejections: Iterable[Rejection]) -> None:
        """Count and log each published dead letter of a possibly critical result, by institution.

        Positions, LOINC and reason only: never the key or the MRN.
        """
        for rejection in rejections:
            if not rejection.possibly_critical:
                continue
            institution = rejection.institution_id or "?"
            self.stage.metrics.unjudged_results.labels(institution=institution).inc()
            message = rejection.message
            log.warning(
                "POSSIBLY CRITICAL result of institution %s not judged (dead-lettered, unreadable): "
                "%s[%d]@%d LOINC %s: %s (%s)",
                institution,
                message.topic,
                message.partition,
                message.offset,
                rejection.loinc_code,
                rejection.reason,
                rejection.field,
            )

    async def _publish(self, outcome: NormaliseOutcome) -> None:
        stage = self.stage
        outputs = []
        for message, event in outcome.events:
            key = regional_key(event.regional_patient_id)
            raw_timestamp = raw_event_headers(message)  # latencies downstream are measured from it
            headers = {
                "correlation_id": str(event.record["envelope"]["correlation_id"]).encode(),
                **raw_timestamp,
            }
            outputs.append(
                Output(
                    stage.topics.norm(event.kind), key, stage.codecs.encode(event.kind, event.record), headers
                )
            )
            if event.identity.link is not None:
                link = stage.codecs.encode("identity", event.identity.link)
                outputs.append(Output(stage.topics.identity_topic, key, link, raw_timestamp))
        await stage.publish(outputs)

    def _count(self, outcome: NormaliseOutcome) -> None:
        metrics = self.stage.metrics
        for _message, event in outcome.events:
            institution = event.record["envelope"]["institution_id"]
            metrics.events.labels(institution=institution, kind=event.kind, outcome="normalised").inc()
            for flag in event.flags:
                if flag.startswith("unmapped"):
                    code = event.record.get("local_code") or event.record.get("drug_code") or "?"
                    metrics.unmapped_codes.labels(institution=institution, code=str(code)).inc()
                elif flag == FLAG_NOT_JUDGED:
                    analyte = self.stage.components.reference.analytes.get(
                        event.record.get("loinc_code") or ""
                    )
                    name = analyte.name if analyte is not None else "other"  # a bounded label set
                    metrics.results_not_judged.labels(institution=institution, analyte=name).inc()
