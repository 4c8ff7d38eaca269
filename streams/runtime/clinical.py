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

Expiry (`expire_states`, run by the state expiry timer, streams/runtime/timers.py `StateExpiryWatch`):
analyte states and legacy maps that can no longer change a decision (streams/domain/expiry.py: newest
result and last write both older than the horizon, no alert of theirs still escalating) are deleted,
a tombstone on the changelog each. Every write of an analyte state carries its wall-clock time
(`UPDATED_FIELD`). `open_alerts` entries leave in `escalate_due` (acknowledged long ago). `wards` do
not expire: a DISCHARGE does not clear the ward, so the table cannot tell a long stay from a patient
gone. The identity links (normaliser) never expire: a pseudonym learnt from a national id must keep
naming the patient's later events.

Within a batch, state is read through an overlay so later messages see earlier ones; outputs are
published and confirmed first, then the state is written. A crash in between replays the batch,
which yields the same alert ids (the engine de-duplicates by event id within the state it keeps).

Outputs: each new alert once on alerts.critical (keyed by patient), and every change of an alert as an
AlertState on alerts.state (keyed by alert id, compacted): OPENED with the alert, REPEAT or NOTE for
each open alert the rules updated, ESCALATED for each escalation applied, ACKNOWLEDGED for each
acknowledgement applied. A replayed change yields the same state id (streams/domain/alert_state.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.contract import alert_key, regional_key
from core.exceptions import ServiceUnavailableError
from streams.domain.alert_state import AlertChange, alert_state_record, repeat_change, untracked
from streams.domain.escalation import (
    ACK_RETENTION,
    AckOutcome,
    EscalationDraft,
    OpenAlerts,
    OpenAlertState,
    acknowledge,
    apply_escalation,
    due_escalations,
    escalation_record,
    open_alert,
    prune,
    update_alert,
)
from streams.domain.expiry import (
    UPDATED_FIELD,
    Verdict,
    analyte_verdict,
    expiry_horizon,
    horizon_ms,
    legacy_verdict,
    stamped,
)
from streams.domain.reference import AlertPolicy
from streams.domain.rules import AnalyteState, LabFacts, alert_record, epoch_ms, evaluate, from_epoch_ms
from streams.runtime.messages import RawMessage, Rejection, carried_headers, seconds_since_raw_event
from streams.runtime.outputs import Output
from streams.runtime.stage import Stage, judge_each

log = logging.getLogger("clinhub.streams.runtime.clinical")


@dataclass
class ClinicalTables:
    """Changelogged Faust tables in the worker; plain dicts in tests. Values are JSON primitives."""

    analytes: MutableMapping[str, Any]
    open_alerts: MutableMapping[str, Any]
    wards: MutableMapping[str, Any]
    legacy_analytes: Mapping[str, Any] | None = None  # read-only: per-patient maps written before analytes


ANALYTES_TABLE = "analyte-states"
LEGACY_ANALYTES_TABLE = "patient-analytes"


def analyte_key(patient: str, loinc: str) -> str:
    return f"{patient}|{loinc}"


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

    def write_back(self, updated_ms: int) -> None:
        """One changelog write per key and batch, of the analytes this batch changed only; each analyte
        state with `updated_ms` (wall clock), its last write for expiry."""
        for key, state in self.analytes.items():
            record = state.to_dict()
            record[UPDATED_FIELD] = updated_ms
            self.tables.analytes[key] = record
        for key, alerts in self.open_alerts.items():
            self.tables.open_alerts[key] = alerts.to_dict()
        for key, ward in self.wards.items():
            self.tables.wards[key] = ward


def alert_latencies(outputs: Sequence[Output], alerts_topic: str, now: dt.datetime) -> list[float]:
    """Seconds from each published alert's raw event (its broker timestamp, the header the alert
    carries) to `now`, when the broker has confirmed the alerts; alerts without the header are left out."""
    latencies = []
    for output in outputs:
        if output.topic == alerts_topic:
            seconds = seconds_since_raw_event(output.headers, now)
            if seconds is not None:
                latencies.append(seconds)
    return latencies


def observe_alert_latency(stage: Stage, outputs: Sequence[Output]) -> None:
    """After the outputs are confirmed: clinhub_alert_latency_seconds for each alert among them."""
    for seconds in alert_latencies(outputs, stage.topics.alerts_topic, stage.clock()):
        stage.metrics.alert_latency_seconds.observe(seconds)


class ClinicalHandler:
    def __init__(self, stage: Stage, tables: ClinicalTables, policy: AlertPolicy) -> None:
        if policy.alert_within > ACK_RETENTION:
            raise ValueError(
                f"alerting on results up to {policy.alert_within} old needs acknowledged alerts remembered "
                f"that long; they are remembered {ACK_RETENTION}"
            )
        self.stage = stage
        self.tables = tables
        self.policy = policy
        self._escalations_in_flight: set[str] = set()
        self.expiry_horizon = expiry_horizon(stage.components.reference.rulebook, policy)
        topics = stage.topics
        # Per topic: the record it carries and what this stage does with one.
        self._routes = {
            topics.norm("encounter"): ("encounter", self._encounter),
            topics.norm("lab"): ("lab", self._lab),
            topics.acks_topic: ("ack", self._ack),
            topics.escalations_topic: ("escalation", self._escalation),
        }

    def _evaluate(self, messages: Sequence[RawMessage]) -> tuple[_Overlay, list[Output], list[Rejection]]:
        overlay = _Overlay(self.tables)
        outputs: list[Output] = []

        def decode(message: RawMessage) -> dict[str, Any]:
            return self.stage.codecs.decode(self._routes[message.topic][0], message.value)

        def process(message: RawMessage, record: dict[str, Any]) -> None:
            self._routes[message.topic][1](message, record, overlay, outputs)

        judged = judge_each(messages, decode, process)
        return overlay, outputs, judged.rejections

    def _state_output(
        self,
        entry: OpenAlertState,
        change: AlertChange,
        cause: str,
        changed_time: dt.datetime,
        correlation_id: str | None = None,
        carried: Mapping[str, bytes] | None = None,
    ) -> Output:
        """An alert's state after a change, on alerts.state keyed by alert id; `carried`: the raw
        event's timestamp header, when a result made the change."""
        record = alert_state_record(entry, change, cause, changed_time, correlation_id)
        value = self.stage.codecs.encode("alert_state", record)
        headers = {"correlation_id": correlation_id.encode()} if correlation_id else {}
        headers.update(carried or {})
        return Output(self.stage.topics.alert_states_topic, alert_key(entry.alert_id), value, headers)

    def _encounter(
        self, _message: RawMessage, record: dict[str, Any], overlay: _Overlay, _outputs: list[Output]
    ) -> None:
        if record.get("ward") and record.get("event_type") != "DISCHARGE":
            overlay.wards[record["regional_patient_id"]] = record["ward"]

    def _lab(
        self, message: RawMessage, record: dict[str, Any], overlay: _Overlay, outputs: list[Output]
    ) -> None:
        stage = self.stage
        patient = record["regional_patient_id"]
        facts = LabFacts.from_record(record, overlay.ward(patient))
        if facts is None:
            return
        previous = overlay.analyte(patient, facts.loinc_code)
        now = stage.clock()
        decision = evaluate(facts, previous, stage.components.reference.rulebook, now, self.policy)
        overlay.set_analyte(patient, facts.loinc_code, decision.state)
        if decision.late:
            stage.metrics.events.labels(
                institution=facts.institution_id, kind="lab", outcome="too-old-to-alert"
            ).inc()
        if decision.duplicate:
            # State is written only after outputs are confirmed, so a duplicate's alerts are out already.
            stage.metrics.events.labels(
                institution=facts.institution_id, kind="lab", outcome="duplicate"
            ).inc()
            return
        if not (decision.alerts or decision.updated_alerts):
            return
        alerts = overlay.alerts_of(patient)
        before = alerts
        carried = carried_headers(message)  # the raw event's timestamp: alert latency is measured from it
        headers = {"correlation_id": facts.correlation_id.encode(), **carried}
        for draft in decision.alerts:
            tracked = alerts is not None and alerts.get(draft.alert_id) is not None
            alerts = open_alert(alerts, draft)
            if tracked:
                continue  # raised, published and tracked before: a replay, not a new alert
            value = stage.codecs.encode("alert", alert_record(draft))
            outputs.append(Output(stage.topics.alerts_topic, regional_key(patient), value, headers))
            opened = alerts.alerts[draft.alert_id]
            outputs.append(
                self._state_output(
                    opened,
                    AlertChange.OPENED,
                    draft.source_event_id,
                    draft.raised_time,
                    draft.correlation_id,
                    carried,
                )
            )
            stage.metrics.alerts.labels(analyte=draft.analyte, severity=draft.severity).inc()
            log.info("ALERT %s %s correlation_id=%s", draft.severity, draft.message, draft.correlation_id)
        # the repeat count each updated alert had: the rules' state first, else the escalation state's
        repeats_before = {
            entry.alert.alert_id: entry.alert.suppressed_repeats
            for entry in (previous.open_alerts if previous is not None else ())
        }
        for draft in decision.updated_alerts:
            known = alerts.get(draft.alert_id) if alerts is not None else None
            counted = repeats_before.get(draft.alert_id, known.suppressed_repeats if known else None)
            change = repeat_change(draft, counted)
            alerts = update_alert(alerts, draft)
            entry = alerts.get(draft.alert_id) or untracked(draft)
            outputs.append(
                self._state_output(entry, change, facts.event_id, now, facts.correlation_id, carried)
            )
        if alerts is not None and alerts is not before and alerts.alerts:
            overlay.open_alerts[patient] = alerts

    def _ack(
        self, message: RawMessage, record: dict[str, Any], overlay: _Overlay, outputs: list[Output]
    ) -> None:
        patient = record.get("regional_patient_id") or (message.key or b"").decode()
        result = acknowledge(overlay.alerts_of(patient), record)
        if result.outcome is AckOutcome.UNKNOWN_ALERT:
            log.warning("acknowledgement %s for unknown alert %s", record["ack_id"], record["alert_id"])
            return
        overlay.open_alerts[patient] = result.state
        if result.outcome is AckOutcome.ACKNOWLEDGED:
            entry = result.state.alerts[str(record["alert_id"])]
            assert entry.acknowledged_ms is not None  # noqa: S101 - set by acknowledge
            outputs.append(
                self._state_output(
                    entry,
                    AlertChange.ACKNOWLEDGED,
                    str(record["ack_id"]),
                    from_epoch_ms(entry.acknowledged_ms),
                )
            )

    def _escalation(
        self, _message: RawMessage, record: dict[str, Any], overlay: _Overlay, outputs: list[Output]
    ) -> None:
        escalation = escalation_from_record(record)
        self._escalations_in_flight.discard(escalation.escalation_id)
        patient = escalation.regional_patient_id
        state = overlay.alerts_of(patient)
        before = state.get(escalation.alert_id) if state is not None else None
        applied = apply_escalation(state, escalation)
        overlay.open_alerts[patient] = applied
        entry = applied.get(escalation.alert_id)
        if entry is not None and entry != before:
            outputs.append(
                self._state_output(
                    entry, AlertChange.ESCALATED, escalation.escalation_id, escalation.escalated_time
                )
            )

    async def handle(self, messages: list[RawMessage]) -> None:
        stage = self.stage

        async def evaluate_and_publish() -> tuple[_Overlay, list[Rejection]]:
            overlay, outputs, rejections = await asyncio.to_thread(self._evaluate, messages)
            await stage.publish(outputs)
            observe_alert_latency(stage, outputs)
            return overlay, rejections

        overlay, rejections = await stage.attempt("clinical batch", evaluate_and_publish, messages)
        await stage.dead_letter(rejections, "norm")
        overlay.write_back(epoch_ms(stage.clock()))

    async def escalate_due(self) -> int:
        """Publish the escalations that are due; the agent applies them when it reads them back.

        A publish the broker cannot take now is tried again at the next tick; a refusal of the
        principal (`KafkaAccessError`: the worker stops) and any other error, a bug, propagate (the
        timer fails loudly)."""
        stage = self.stage
        now = stage.clock()
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
                    value = stage.codecs.encode("escalation", escalation_record(draft))
                    await stage.publish(
                        [Output(stage.topics.escalations_topic, regional_key(patient), value, {})]
                    )
                except ServiceUnavailableError as exc:
                    log.warning("escalation %s not published yet: %s", draft.escalation_id, exc)
                    return sent
                self._escalations_in_flight.add(draft.escalation_id)
                sent += 1
                log.warning(
                    "ESCALATED alert %s to level %d (%s)", draft.alert_id, draft.level, draft.recipient
                )
        return sent

    def _escalating(self, patient: str) -> set[str]:
        """The patient's alerts still escalating: in the open-alerts table and not acknowledged."""
        raw = self.tables.open_alerts.get(patient)
        if not raw:
            return set()
        return {
            alert_id for alert_id, entry in OpenAlerts.from_dict(raw).alerts.items() if not entry.acknowledged
        }

    def expire_states(self, table: str, keys: Sequence[str]) -> int:
        """Delete those of `keys` (of ANALYTES_TABLE or LEGACY_ANALYTES_TABLE) that can no longer matter
        (streams/domain/expiry.py); stamp the analyte states that have no write time yet. Returns how
        many were deleted.

        Each key is judged on its value as it is at its delete, read and deleted with no await between:
        the agent runs on the same event loop and writes its batch's states in one go (`write_back`), so
        no write of it falls between the read and the delete. A batch in flight that read a state before
        its delete writes it back after, stamped now: as if it had not expired, nothing lost."""
        now_ms = epoch_ms(self.stage.clock())
        horizon = horizon_ms(self.expiry_horizon)
        legacy = table == LEGACY_ANALYTES_TABLE
        target = self.tables.legacy_analytes if legacy else self.tables.analytes
        if not isinstance(target, MutableMapping):
            return 0
        judge = legacy_verdict if legacy else analyte_verdict
        deleted = 0
        for key in keys:
            record = target.get(key)
            if not record:
                continue
            verdict = judge(record, now_ms, horizon)
            if verdict is not Verdict.KEEP:  # old: kept all the same if an alert of it still escalates
                patient = key if legacy else key.split("|", 1)[0]
                verdict = judge(record, now_ms, horizon, self._escalating(patient))
            if verdict is Verdict.EXPIRE:
                del target[key]  # a tombstone on the changelog: a recovery does not bring it back
                deleted += 1
            elif verdict is Verdict.STAMP:
                target[key] = stamped(record, now_ms)
        return deleted
