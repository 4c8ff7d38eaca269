"""Critical-value rules over normalised results; pure functions, so every boundary is a table test."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from streams.normalise import NormalisedLab
from streams.reference import ThresholdRule

ALERT_NAMESPACE = uuid.UUID("6f1c2d9e-58a3-4c1b-9a57-0c6f5e2b7d10")
DEFAULT_ACK_DEADLINE = dt.timedelta(minutes=15)


@dataclass(frozen=True)
class AlertDraft:
    """An alert before it is stored and published; its id is derived, so reprocessing yields the same id."""

    alert_id: str
    source_event_id: str
    regional_patient_id: str
    institution_id: str
    loinc_code: str
    analyte: str
    value: float
    unit: str
    limit_kind: str
    limit_value: float
    severity: str
    message: str
    rule_source: str
    result_time: dt.datetime
    raised_time: dt.datetime
    deadline_time: dt.datetime
    correlation_id: str


def crossed_limit(value: float, rule: ThresholdRule) -> tuple[str, float] | None:
    """Which limit the value crosses, honouring whether the limit itself counts as critical."""
    if rule.low is not None and (value <= rule.low if rule.low_inclusive else value < rule.low):
        return "LOW", rule.low
    if rule.high is not None and (value >= rule.high if rule.high_inclusive else value > rule.high):
        return "HIGH", rule.high
    return None


def alert_id_for(event_id: str, loinc: str, kind: str) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{event_id}|{loinc}|{kind}"))


def evaluate_thresholds(
    lab: NormalisedLab,
    rules: dict[str, ThresholdRule],
    now: dt.datetime,
    deadline: dt.timedelta = DEFAULT_ACK_DEADLINE,
) -> list[AlertDraft]:
    """Alerts for a result that crosses its analyte's critical limits; cancelled results never alert."""
    if lab.loinc_code is None or lab.value is None or lab.unit is None or lab.status == "cancelled":
        return []
    rule = rules.get(lab.loinc_code)
    if rule is None:
        return []
    crossed = crossed_limit(lab.value, rule)
    if crossed is None:
        return []
    kind, limit = crossed
    sign = (
        "<="
        if kind == "LOW" and rule.low_inclusive
        else "<"
        if kind == "LOW"
        else (">=" if rule.high_inclusive else ">")
    )
    return [
        AlertDraft(
            alert_id=alert_id_for(lab.event_id, lab.loinc_code, kind),
            source_event_id=lab.event_id,
            regional_patient_id=lab.regional_patient_id,
            institution_id=lab.institution_id,
            loinc_code=lab.loinc_code,
            analyte=rule.analyte,
            value=lab.value,
            unit=lab.unit,
            limit_kind=kind,
            limit_value=limit,
            severity=rule.severity,
            message=f"{rule.message}: {lab.value:.4g} {lab.unit} ({sign} {limit:g} {lab.unit})",
            rule_source=rule.source,
            result_time=lab.result_time,
            raised_time=now,
            deadline_time=now + deadline,
            correlation_id=lab.correlation_id,
        )
    ]
