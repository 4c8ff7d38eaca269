"""The clinical agent's handler: critical-value rules and escalation over changelogged tables.

Tables (all in the partition of the regional patient id, the key of every topic this agent reads, so
each table partition is the partition of the events that write it):
- `analytes`: "<patient>|<LOINC>" -> AnalyteState (last value, open alerts per limit kind), its
  changelog partition that of "<patient>" (`RawKeyTable(partition_by_prefix="|")`). One small record
  per result: a patient's whole map (`legacy_analytes`, "<patient>" -> {LOINC: AnalyteState}, the
  layout before) was rewritten for every result, 58 KB for 40 analytes. The legacy table is still
  read, never written, for analytes not judged since the upgrade;
- `open_alerts`: "<patient>" -> OpenAlerts (escalation level and deadline of each alert);
- `wards`: "<patient>" -> the ward of the latest encounter event.

Within a batch, state is read through an overlay so later messages see earlier ones; outputs are
published and confirmed first, then the state is written. A crash in between replays the batch,
which yields the same alert ids (the engine de-duplicates by event id within the state it keeps).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.exceptions import RegistryUnavailableError, SchemaError
from streams.escalation import (
    ACK_RETENTION,
    AckOutcome,
    EscalationDraft,
    OpenAlerts,
    acknowledge,
    apply_escalation,
    due_escalations,
    escalation_record,
    open_alert,
    prune,
)
from streams.outputs import Output, Publish
from streams.pipeline import RawMessage, Rejection
from streams.reference import AlertPolicy
from streams.rules import AnalyteState, LabFacts, alert_record, evaluate
from streams.topics import TopicNames

if TYPE_CHECKING:
    from streams.app import Components

log = logging.getLogger("clinhub.streams.clinical")


@dataclass
class ClinicalTables:
    analytes: Any
    open_alerts: Any
    wards: Any
    legacy_analytes: Any = None  # read-only: per-patient maps written before the analytes table


def analyte_key(patient: str, loinc: str) -> str:
    return f"{patient}|{loinc}"


def lab_facts(record: dict[str, Any], ward: str | None) -> LabFacts | None:
    """What the rules need from a normalised LabResult; None when it has no code, value or unit."""
    if (
        record.get("loinc_code") is None
        or record.get("canonical_value") is None
        or not record.get("canonical_unit")
    ):
        return None
    envelope = record["envelope"]
    return LabFacts(
        event_id=str(envelope["event_id"]),
        regional_patient_id=record["regional_patient_id"],
        institution_id=envelope["institution_id"],
        loinc_code=record["loinc_code"],
        value=float(record["canonical_value"]),
        unit=record["canonical_unit"],
        status=str(record["status"]),
        result_time=record["result_time"],
        correlation_id=str(envelope["correlation_id"]),
        birth_year=record.get("patient_birth_year"),
        sex=record.get("patient_sex"),
        ward=ward,
        result_id=f"{envelope['institution_id']}|{record['result_id']}",
    )


def escalation_from_record(record: dict[str, Any]) -> EscalationDraft:
    return EscalationDraft(
        escalation_id=str(record["escalation_id"]),
        alert_id=str(record["alert_id"]),
        regional_patient_id=record["regional_patient_id"],
        institution_id=record["institution_id"],
        level=int(record["level"]),
        recipient=record["recipient"],
        severity=record["severity"],
        message=record["message"],
        escalated_time=record["escalated_time"],
        next_deadline_time=record["next_deadline_time"],
    )


@dataclass
class _Overlay:
    """Batch-local view of the tables: reads fall through, writes wait until outputs are confirmed."""

    tables: ClinicalTables
    analytes: dict[str, AnalyteState] = field(default_factory=dict)  # "<patient>|<LOINC>" -> new state
    open_alerts: dict[str, OpenAlerts] = field(default_factory=dict)
    wards: dict[str, str] = field(default_factory=dict)
    # Each patient's legacy analyte map, read (and deserialised by the store) once per batch
    legacy_maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    stored_wards: dict[str, str | None] = field(default_factory=dict)

    def _legacy(self, patient: str, loinc: str) -> Any:
        if self.tables.legacy_analytes is None:
            return None
        if patient not in self.legacy_maps:
            self.legacy_maps[patient] = self.tables.legacy_analytes.get(patient) or {}
        return self.legacy_maps[patient].get(loinc)

    def analyte(self, patient: str, loinc: str) -> AnalyteState | None:
        key = analyte_key(patient, loinc)
        if key in self.analytes:
            return self.analytes[key]
        raw = self.tables.analytes.get(key) or self._legacy(patient, loinc)
        return AnalyteState.from_dict(raw) if raw else None

    def set_analyte(self, patient: str, loinc: str, state: AnalyteState) -> None:
        self.analytes[analyte_key(patient, loinc)] = state

    def alerts_of(self, patient: str) -> OpenAlerts | None:
        if patient in self.open_alerts:
            return self.open_alerts[patient]
        raw = self.tables.open_alerts.get(patient)
        return OpenAlerts.from_dict(raw) if raw else None

    def ward(self, patient: str) -> str | None:
        if patient in self.wards:
            return self.wards[patient]
        if patient not in self.stored_wards:  # one table read per patient and batch, also when absent
            self.stored_wards[patient] = self.tables.wards.get(patient)
        return self.stored_wards[patient]

    def write_back(self) -> None:
        """One changelog write per key and batch, of the analytes this batch changed only."""
        for key, state in self.analytes.items():
            self.tables.analytes[key] = state.to_dict()
        for key, alerts in self.open_alerts.items():
            self.tables.open_alerts[key] = alerts.to_dict()
        for key, ward in self.wards.items():
            self.tables.wards[key] = ward


class ClinicalHandler:
    def __init__(
        self,
        components: Components,
        topics: TopicNames,
        publish: Publish,
        tables: ClinicalTables,
        policy: AlertPolicy,
    ) -> None:
        if policy.alert_within > ACK_RETENTION:
            raise ValueError(
                f"alerting on results up to {policy.alert_within} old needs acknowledged alerts remembered "
                f"that long; they are remembered {ACK_RETENTION}"
            )
        self.c = components
        self.topics = topics
        self.publish = publish
        self.tables = tables
        self.policy = policy
        self._escalations_in_flight: set[str] = set()

    def _evaluate(self, messages: Sequence[RawMessage]) -> tuple[_Overlay, list[Output], list[Rejection]]:
        overlay = _Overlay(self.tables)
        outputs: list[Output] = []
        rejections: list[Rejection] = []
        for message in messages:
            try:
                self._one(message, overlay, outputs)
            except RegistryUnavailableError:
                raise
            except (SchemaError, KeyError, TypeError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                rejections.append(Rejection(message, type(exc).__name__, getattr(exc, "field", None), reason))
        return overlay, outputs, rejections

    def _one(
        self,
        message: RawMessage,
        overlay: _Overlay,
        outputs: list[Output],
    ) -> None:
        c, topics = self.c, self.topics
        if message.topic == topics.norm("encounter"):
            record = c.decoders["encounter"](message.value)
            if record.get("ward") and record.get("event_type") != "DISCHARGE":
                overlay.wards[record["regional_patient_id"]] = record["ward"]
        elif message.topic == topics.norm("lab"):
            record = c.decoders["lab"](message.value)
            patient = record["regional_patient_id"]
            facts = lab_facts(record, overlay.ward(patient))
            if facts is None:
                return
            previous = overlay.analyte(patient, facts.loinc_code)
            decision = evaluate(facts, previous, c.reference.rulebook, c.clock(), self.policy)
            overlay.set_analyte(patient, facts.loinc_code, decision.state)
            if decision.late:
                c.metrics.events.labels(
                    institution=facts.institution_id, kind="lab", outcome="too-old-to-alert"
                ).inc()
            if decision.duplicate:
                # State is written only after outputs are confirmed, so a duplicate's alerts are out already.
                c.metrics.events.labels(
                    institution=facts.institution_id, kind="lab", outcome="duplicate"
                ).inc()
                return
            alerts = overlay.alerts_of(patient) if decision.alerts else None
            headers = {"correlation_id": facts.correlation_id.encode()}
            for draft in decision.alerts:
                alerts = open_alert(alerts, draft)
                value = c.encoder("alert")(alert_record(draft))
                outputs.append(Output(topics.alerts_topic, patient.encode(), value, headers))
                c.metrics.alerts.labels(analyte=draft.analyte, severity=draft.severity).inc()
                log.info("ALERT %s %s correlation_id=%s", draft.severity, draft.message, draft.correlation_id)
            for draft in decision.updated_alerts:
                value = c.encoder("alert")(alert_record(draft))
                outputs.append(Output(topics.alerts_topic, patient.encode(), value, headers))
            if alerts is not None and decision.alerts:
                overlay.open_alerts[patient] = alerts
        elif message.topic == topics.acks_topic:
            record = c.decoders["ack"](message.value)
            patient = record.get("regional_patient_id") or (message.key or b"").decode()
            result = acknowledge(overlay.alerts_of(patient), record)
            if result.outcome is AckOutcome.UNKNOWN_ALERT:
                log.warning("acknowledgement %s for unknown alert %s", record["ack_id"], record["alert_id"])
            else:
                overlay.open_alerts[patient] = result.state
        elif message.topic == topics.escalations_topic:
            escalation = escalation_from_record(c.decoders["escalation"](message.value))
            self._escalations_in_flight.discard(escalation.escalation_id)
            patient = escalation.regional_patient_id
            overlay.open_alerts[patient] = apply_escalation(overlay.alerts_of(patient), escalation)

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        import asyncio

        from streams.app import retrying, send_dead_letters

        c = self.c

        async def evaluate_and_publish() -> tuple[_Overlay, list[Rejection]]:
            overlay, outputs, rejections = await asyncio.to_thread(self._evaluate, messages)
            await self.publish(outputs)
            return overlay, rejections

        overlay, rejections = await retrying(
            "clinical batch", evaluate_and_publish, c.metrics, c.retry_max_seconds
        )
        await retrying(
            "dead-letter clinical rejects",
            lambda: send_dead_letters(rejections, c, self.topics, self.publish, "clinical", "norm"),
            c.metrics,
            c.retry_max_seconds,
        )
        overlay.write_back()

    async def escalate_due(self) -> int:
        """Publish the escalations that are due; the agent applies them when it reads them back."""
        now = self.c.clock()
        sent = 0
        for patient, raw in list(self.tables.open_alerts.items()):
            if not raw:
                continue
            state = OpenAlerts.from_dict(raw)
            pruned = prune(state, now)
            if pruned is not state:
                if pruned.alerts:
                    self.tables.open_alerts[patient] = pruned.to_dict()
                else:
                    # a tombstone: every patient ever alerted would otherwise stay in the table, and
                    # this scan of it, every few seconds on the event loop, would grow without end
                    del self.tables.open_alerts[patient]
                    continue
            for draft in due_escalations(pruned, now, self.policy.escalation):
                if draft.escalation_id in self._escalations_in_flight:
                    continue
                try:
                    value = self.c.encoder("escalation")(escalation_record(draft))
                    await self.publish([Output(self.topics.escalations_topic, patient.encode(), value, {})])
                except Exception as exc:  # noqa: BLE001 - retried on the next tick
                    log.warning("escalation %s not published yet: %r", draft.escalation_id, exc)
                    return sent
                self._escalations_in_flight.add(draft.escalation_id)
                sent += 1
                log.warning(
                    "ESCALATED alert %s to level %d (%s)", draft.alert_id, draft.level, draft.recipient
                )
        return sent
