"""HL7 v2 messages to the regional standard's raw records, exactly as the publisher takes them.

ORU^R01 (lab results from OBX in their OBR context; vital signs when OBX-3 is a vital-sign code),
ADT^A01/A02/A03/A04/A08 (and the cancels A11/A12/A13) as EncounterEvent, RDE^O11 and OMP^O09 as
MedicationOrder, and every DG1 as Diagnosis. Values as sent: nothing rounded, trimmed (beyond HL7
component whitespace) or guessed. The patient's name is PID-5's first repetition as written (family
name; given and middle names), carried on every event for the institution's own users. Times keep the
offset they were sent with; one without offset is on the institution's clock
(`streams/data/institutions.json`, read as data).
Event ids are deterministic (`event_id_for("mllp", institution, "<MSH-4>|<MSH-10>", n)`), so a resend
makes the same events.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from producers.gateways.common import event_id_for
from producers.gateways.exceptions import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_VERSION_ID,
    HL7ContentError,
    InstitutionMismatchError,
    UnsupportedMessageError,
)
from producers.gateways.hl7.charset import LATIN1, Decoded
from producers.gateways.hl7.message import Message, Segment, parse_ts

GATEWAY = "mllp"
DATA_DIR = Path(__file__).resolve().parents[3] / "streams" / "data"
VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")


@dataclass(frozen=True)
class Header:
    """What an ACK needs of a message (and what traces it): MSH-3/4/5/6, 7, 9, 10, 11, 12 and 18."""

    control_id: str
    sending_application: str
    sending_facility: str
    message_type: str  # e.g. "ORU^R01"
    version: str
    charset: str | None
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"

    @property
    def trigger(self) -> str:
        return self.message_type.partition("^")[2]


@dataclass(frozen=True)
class Mapped:
    header: Header
    events: list[tuple[str, dict[str, Any]]]  # (kind, raw Avro record) in message order


def _header(message: Message, charset: str | None) -> Header:
    msh = message.msh
    return Header(
        control_id=msh.value(10),
        sending_application=msh.value(3),
        sending_facility=msh.value(4),
        message_type="^".join(p for p in (msh.value(9, 1), msh.value(9, 2)) if p),
        version=msh.value(12),
        charset=charset,
        receiving_application=msh.value(5),
        receiving_facility=msh.value(6),
        processing_id=msh.value(11) or "P",
    )


def parse_header(decoded: Decoded) -> Header:
    """The header of a decoded message (for the ACK of one that fails mapping)."""
    return _header(Message(decoded), decoded.charset)


def salvage_header(raw: bytes) -> Header | None:
    """Best effort for the ACK of a message that does not even decode (wrong or unknown MSH-18): its MSH
    read as Latin-1, with no charset (the ACK goes in ASCII). None when there is no readable MSH."""
    body = raw.lstrip(b"\r\n")
    end = min((i for i in (body.find(b"\r"), body.find(b"\n")) if i >= 0), default=len(body))
    try:
        return _header(Message(Decoded(body[:end].decode(LATIN1), None, LATIN1)), None)
    except HL7ContentError:
        return None


@cache
def institution_zone(institution: str) -> ZoneInfo | None:
    """The clock of an institution's systems (institutions.json), for times sent without an offset."""
    try:
        doc = json.loads((DATA_DIR / "institutions.json").read_text(encoding="utf-8"))
        return ZoneInfo(doc["institutions"][institution]["time_zone"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@cache
def vital_sign_codes() -> dict[str, str]:
    """Local vital-sign codes (upper case) to LOINC, from codes.json; the LOINC codes map to themselves."""
    doc = json.loads((DATA_DIR / "codes.json").read_text(encoding="utf-8"))
    codes = {str(k).upper(): str(v) for k, v in doc["vital_signs"].items()}
    codes.update({v: v for v in list(codes.values())})
    return codes


class _Context:
    """One message being mapped: its segments, the patient, and the envelope every event shares."""

    def __init__(
        self,
        message: Message,
        header: Header,
        institution: str,
        received: dt.datetime,
        zone: dt.tzinfo | None,
    ) -> None:
        self.message = message
        self.header = header
        self.institution = institution
        self.received = received
        self.zone = zone
        self.events: list[tuple[str, dict[str, Any]]] = []
        source = f"{header.sending_facility}|{header.control_id}"
        self.source = source
        self.correlation_id = event_id_for(f"{GATEWAY}-correlation", institution, source, 0)
        self.message_time = self.ts(message.msh, 7, required=True)
        self.patient = self._patient()
        pv1 = message.first("PV1")
        self.pv1 = pv1
        self.encounter_id = pv1.value(19) if pv1 is not None else ""

    def ts(self, segment: Segment, field: int, required: bool = False) -> dt.datetime | None:
        text = segment.value(field)
        if not text:
            if required:
                raise segment.error(field, "date/time is required", REQUIRED_FIELD_MISSING)
            return None
        return parse_ts(text, segment, field, self.zone)

    def _patient(self) -> dict[str, Any]:
        pid = self.message.first("PID")
        if pid is None:
            if self.header.message_type.startswith(("RDE", "OMP", "ORU", "ADT")):
                raise HL7ContentError(
                    "PID", None, "the patient (PID) segment is required", code=REQUIRED_FIELD_MISSING
                )
            return {}
        mrn = national = ""
        for rep in range(1, pid.repetitions(3) + 1):
            ident, kind = pid.value(3, 1, rep), pid.value(3, 5, rep).upper()
            if not ident:
                continue
            if kind in ("NNCHN", "NI", "NNC") and not national:
                national = ident
            elif kind == "MR" and not mrn:
                mrn = ident
        if not mrn:
            mrn = next(
                (
                    pid.value(3, 1, rep)
                    for rep in range(1, pid.repetitions(3) + 1)
                    if pid.value(3, 1, rep) and pid.value(3, 5, rep).upper() not in ("NNCHN", "NI", "NNC")
                ),
                "",
            )
        if not mrn:
            raise pid.error(3, "the patient identifier (MRN) is required", REQUIRED_FIELD_MISSING)
        birth = pid.value(7)
        year = None
        if birth:
            if not re.fullmatch(r"\d{4}(\d{2}(\d{2}.*)?)?", birth):
                raise pid.error(7, f"{birth!r} is not an HL7 date of birth")
            year = int(birth[:4])
        sex_code = pid.value(8).upper()
        sex = _SEX.get(sex_code)
        if sex_code and sex is None:
            raise pid.error(
                8, f"administrative sex {sex_code!r} is not in HL7 table 0001", TABLE_VALUE_NOT_FOUND
            )
        family, given = _patient_name(pid)
        return {
            "patient_mrn": mrn,
            "patient_national_id": national or None,
            "patient_birth_year": year,
            "patient_sex": sex,
            "patient_family_name": family,
            "patient_given_name": given,
        }

    def add(self, kind: str, event_time: dt.datetime, fields: dict[str, Any]) -> None:
        envelope = {
            "event_id": event_id_for(GATEWAY, self.institution, self.source, len(self.events)),
            "institution_id": self.institution,
            "source_system": self.header.sending_application or "HL7v2",
            "source_message_id": self.header.control_id,
            "event_time": event_time,
            "produced_time": self.received,
            "schema_version": "1",
            "correlation_id": self.correlation_id,
        }
        record: dict[str, Any] = {"envelope": envelope}
        record.update(self.patient)
        record["encounter_id"] = self.encounter_id or None
        record.update(fields)
        self.events.append((kind, record))


_SEX = {"F": "female", "M": "male", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
HL7_NULL = '""'  # "delete the value" in HL7 v2: no value, never a name


def _patient_name(pid: Segment) -> tuple[str | None, str | None]:
    """(family, given) of PID-5's first repetition (XPN), as sent and unescaped in the message's own
    character set: the family name is XPN.1's first subcomponent (FN.1, the surname); the given name
    XPN.2, then XPN.3 (further given or middle names) after a space. None for what is not sent."""
    family = pid.value(5, 1, 1, 1)
    parts = [part for part in (pid.value(5, 2), pid.value(5, 3)) if part and part != HL7_NULL]
    return (family if family and family != HL7_NULL else None), (" ".join(parts) or None)


def map_message(
    decoded: Decoded, institution: str, received: dt.datetime, *, zone: dt.tzinfo | None = None
) -> Mapped:
    """The events of one message, with the institution of the connection (never MSH-4's). `zone`: the
    institution's clock for times without offset (default: its time zone in institutions.json)."""
    message = Message(decoded)
    header = _header(message, decoded.charset)
    msh = message.msh
    if not header.control_id:
        raise msh.error(10, "the message control id is required", REQUIRED_FIELD_MISSING)
    if header.sending_facility and header.sending_facility.casefold() != institution.casefold():
        raise InstitutionMismatchError(header.sending_facility, institution)
    if header.version not in VERSIONS:
        raise HL7ContentError(
            "MSH",
            12,
            f"version {header.version!r} is not one of {', '.join(VERSIONS)}",
            code=UNSUPPORTED_VERSION_ID,
        )
    code, trigger = msh.value(9, 1).upper(), msh.value(9, 2).upper()
    handler = _HANDLERS.get(code)
    if handler is None:
        raise UnsupportedMessageError(
            header.message_type, f"message type {header.message_type or '(empty)'!r} is not accepted"
        )
    if trigger not in handler[0]:
        raise UnsupportedMessageError(
            header.message_type,
            f"trigger event {header.message_type!r} is not accepted (only {', '.join(sorted(handler[0]))})",
            code=UNSUPPORTED_EVENT_CODE,
        )
    context = _Context(
        message, header, institution, received, zone if zone is not None else institution_zone(institution)
    )
    handler[1](context, trigger)
    _diagnoses(context)
    if not context.events:
        raise HL7ContentError(
            "MSH", 9, f"the {header.message_type} message carries no event", code=REQUIRED_FIELD_MISSING
        )
    return Mapped(header, context.events)


# ---- ORU^R01: lab results and vital signs ----------------------------------------------------------

_RESULT_STATUS = {"F": "final", "C": "corrected", "X": "cancelled", "P": "preliminary"}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_RANGE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*")
_COMPARATORS = ("<", "<=", ">=", ">")


def _finite(segment: Segment, field: int, text: str) -> float:
    """A number as sent (the double nearest its decimal text); one too large for a double is an error."""
    value = float(text)
    if not math.isfinite(value):
        raise segment.error(field, f"{text[:20]}... is too large a number")
    return value


def _oru(context: _Context, trigger: str) -> None:
    obr: Segment | None = None
    vitals: dict[int, list[Segment]] = {}
    order: list[tuple[Segment | None, list[Segment]]] = []
    for segment in context.message:
        if segment.name == "OBR":
            obr = segment
            order.append((obr, []))
        elif segment.name == "OBX":
            if not order:
                order.append((None, []))
            order[-1][1].append(segment)
    if not any(obxs for _, obxs in order):
        raise HL7ContentError("OBX", None, "an ORU^R01 needs at least one OBX", code=REQUIRED_FIELD_MISSING)
    codes = vital_sign_codes()
    for group, (obr, obxs) in enumerate(order):
        vital_obx = [o for o in obxs if _is_vital(o, codes)]
        for obx in obxs:
            if obx in vital_obx:
                vitals.setdefault(group, []).append(obx)
            else:
                _lab(context, obr, obx)
        if vital_obx:
            _vitals(context, obr, vital_obx)


def _is_vital(obx: Segment, codes: dict[str, str]) -> bool:
    code, system = obx.value(3, 1).upper(), obx.value(3, 3).upper()
    if system == "LN":
        return code in codes.values()
    return code in codes


def _order_id(context: _Context, obr: Segment | None) -> str:
    if obr is not None:
        return obr.value(3) or obr.value(2) or f"{context.header.control_id}/OBR{obr.sequence}"
    return context.header.control_id


def _status(obx: Segment, obr: Segment | None) -> str:
    code = obx.value(11).upper() or (obr.value(25).upper() if obr is not None else "")
    if not code:
        raise obx.error(11, "the result status is required", REQUIRED_FIELD_MISSING)
    return _RESULT_STATUS.get(code, "unknown")


def _lab(context: _Context, obr: Segment | None, obx: Segment) -> None:
    code = obx.required(3, "the observation identifier (OBX-3.1)")
    system = obx.value(3, 3)
    loinc = code if system.upper() == "LN" else (obx.value(3, 4) if obx.value(3, 6).upper() == "LN" else "")
    value = _value(obx)
    reference = _RANGE.fullmatch(obx.value(7))
    # every time field is read (a malformed one is an error even when another is chosen)
    obr22, obr7 = (context.ts(obr, 22), context.ts(obr, 7)) if obr is not None else (None, None)
    obx19, obx14 = context.ts(obx, 19), context.ts(obx, 14)
    result_time = obr22 or obx19 or obx14 or obr7 or context.message_time
    assert result_time is not None  # noqa: S101 - the message time is required
    sub_id = obx.value(4)
    context.add(
        "lab",
        result_time,
        {
            "result_id": "|".join(p for p in (_order_id(context, obr), code, sub_id) if p),
            "local_code": code,
            "local_code_system": system or None,
            "local_display": obx.value(3, 2) or None,
            "loinc_code": loinc or None,
            **value,
            "unit": obx.value(6, 1) or obx.value(6, 2) or None,
            "reference_low": _finite(obx, 7, reference.group(1)) if reference else None,
            "reference_high": _finite(obx, 7, reference.group(2)) if reference else None,
            "abnormal_flag": obx.value(8) or None,
            "status": _status(obx, obr),
            "specimen_collected_time": obr7 or obx14,
            "result_time": result_time,
            "performing_lab": obx.value(23) or obx.value(15) or None,
            "ordering_clinician": (obr.value(16) if obr is not None else "") or None,
        },
    )


def _value(obx: Segment) -> dict[str, Any]:
    """OBX-5 by OBX-2: NM a number (and its text), SN a bound or a number, CE/CWE the code, others text."""
    kind = obx.value(2).upper()
    numeric: float | None = None
    comparator: str | None = None
    text: str | None = None
    if kind == "NM":
        text = obx.value(5) or None
        if text is not None and _NUMBER.fullmatch(text):
            numeric = _finite(obx, 5, text)
    elif kind == "SN":
        sign, first, separator, second = (obx.value(5, c) for c in (1, 2, 3, 4))
        if not separator and not second and _NUMBER.fullmatch(first or "-"):
            if sign in ("", "="):
                numeric = _finite(obx, 5, first)
            elif sign in _COMPARATORS:
                numeric, comparator = _finite(obx, 5, first), sign
            else:
                raise obx.error(5, f"SN comparator {sign!r} is not one of =, <, <=, >=, >", component=1)
            text = f"{sign if sign != '=' else ''}{first}"
        elif first or second:
            text = f"{sign}{first}{separator}{second}"  # a range or a ratio: the normaliser reads text
        elif sign:
            raise obx.error(5, f"SN value {sign!r} has no number", component=2)
    elif kind in ("CE", "CWE", "CNE", "CF"):
        text = obx.value(5, 1) or obx.value(5, 2) or None
    else:
        lines = [obx.text(5, rep) for rep in range(1, obx.repetitions(5) + 1)]
        text = "\n".join(lines).strip("\n") or None
    return {"value_numeric": numeric, "value_comparator": comparator, "value_text": text}


def _vitals(context: _Context, obr: Segment | None, obxs: list[Segment]) -> None:
    measurements = []
    for obx in obxs:
        value = obx.value(5)
        if not _NUMBER.fullmatch(value):
            raise obx.error(5, f"vital sign {obx.value(3)!r} value {value!r} is not a number")
        unit = obx.value(6, 1) or obx.value(6, 2)
        if not unit:
            raise obx.error(6, f"vital sign {obx.value(3)!r} needs its unit", REQUIRED_FIELD_MISSING)
        code, system = obx.value(3, 1), obx.value(3, 3).upper()
        measurements.append(
            {
                "loinc_code": code if system == "LN" else None,
                "local_code": code,
                "value": _finite(obx, 5, value),
                "unit": unit,
            }
        )
    first = obxs[0]
    times = [context.ts(obx, 14) for obx in obxs]  # each read: a malformed one is an error
    statuses = [_status(obx, obr) for obx in obxs]
    obr7 = context.ts(obr, 7) if obr is not None else None
    measured = times[0] or obr7 or context.message_time
    assert measured is not None  # noqa: S101 - the message time is required
    context.add(
        "vitals",
        measured,
        {
            "observation_id": f"{_order_id(context, obr)}|vitals",
            "measured_time": measured,
            "device_id": first.value(18) or None,
            "status": statuses[0],
            "measurements": measurements,
        },
    )


# ---- ADT: encounters -------------------------------------------------------------------------------

_ADT_EVENTS = {
    "A01": "ADMIT",
    "A02": "TRANSFER",
    "A03": "DISCHARGE",
    "A04": "REGISTER",
    "A08": "UPDATE",
    "A11": "CANCEL",
    "A12": "CANCEL",
    "A13": "CANCEL",
}
_CLASSES = {"I": "INPATIENT", "O": "OUTPATIENT", "E": "EMERGENCY"}


def _adt(context: _Context, trigger: str) -> None:
    pv1 = context.pv1
    if pv1 is None:
        raise HL7ContentError(
            "PV1", None, "an ADT message needs its PV1 segment", code=REQUIRED_FIELD_MISSING
        )
    encounter = pv1.required(19, "the visit number (PV1-19)")
    evn = context.message.first("EVN")
    occurred = None
    if evn is not None:
        evn6, evn2 = context.ts(evn, 6), context.ts(evn, 2)
        occurred = evn6 or evn2
    occurred = occurred or context.message_time
    assert occurred is not None  # noqa: S101 - the message time is required
    patient_class = pv1.value(2).upper()
    transfer = trigger == "A02"
    context.add(
        "encounter",
        occurred,
        {
            "encounter_id": encounter,
            "event_type": _ADT_EVENTS[trigger],
            "encounter_class": _CLASSES.get(patient_class, "UNKNOWN"),
            "ward": pv1.value(3, 1) or None,
            "bed": pv1.value(3, 3) or None,
            "prior_ward": (pv1.value(6, 1) or None) if transfer or pv1.value(6, 1) else None,
            "prior_bed": pv1.value(6, 3) or None,
            "attending_clinician": pv1.value(7, 1) or None,
            "occurred_time": occurred,
            "admit_time": context.ts(pv1, 44),
            "discharge_time": context.ts(pv1, 45),
        },
    )


# ---- RDE^O11, OMP^O09: medication orders -------------------------------------------------------------

_ORDER_STATUS = {
    "CM": "COMPLETED",
    "CA": "CANCELLED",
    "DC": "STOPPED",
    "HD": "ON_HOLD",
    "IP": "ACTIVE",
    "SC": "ACTIVE",
    "A": "ACTIVE",
    "ER": "ENTERED_IN_ERROR",
}
_ORDER_CONTROL = {
    "NW": "ACTIVE",
    "XO": "ACTIVE",
    "RL": "ACTIVE",
    "CA": "CANCELLED",
    "OC": "CANCELLED",
    "DC": "STOPPED",
    "OD": "STOPPED",
    "HD": "ON_HOLD",
    "OH": "ON_HOLD",
}


def _orders(context: _Context, trigger: str) -> None:
    groups: list[dict[str, Segment]] = []
    for segment in context.message:
        if segment.name == "ORC":
            groups.append({"ORC": segment})
        elif segment.name in ("RXE", "RXO", "RXR", "TQ1") and groups and segment.name not in groups[-1]:
            groups[-1][segment.name] = segment
    if not groups:
        raise HL7ContentError(
            "ORC", None, "a medication order needs its ORC segment", code=REQUIRED_FIELD_MISSING
        )
    for group in groups:
        _order(context, group)


def _number(segment: Segment, field: int, component: int = 1) -> float | None:
    text = segment.value(field, component)
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise segment.error(field, f"{text!r} is not a number", component=component)
    return _finite(segment, field, text)


def _order(context: _Context, group: dict[str, Segment]) -> None:
    orc = group["ORC"]
    rx = group.get("RXE") or group.get("RXO")
    if rx is None:
        raise orc.error(None, "the order has no RXE or RXO segment", REQUIRED_FIELD_MISSING)
    give = 2 if rx.name == "RXE" else 1  # RXE-2 give code; RXO-1 requested give code
    amount, units = (3, 5) if rx.name == "RXE" else (2, 4)
    drug = rx.required(give, "the drug code")
    order_id = orc.value(2) or orc.value(3)
    if not order_id:
        raise orc.error(
            2, "the placer (ORC-2) or filler (ORC-3) order number is required", REQUIRED_FIELD_MISSING
        )
    status = _ORDER_STATUS.get(orc.value(5).upper()) or _ORDER_CONTROL.get(orc.value(1).upper(), "UNKNOWN")
    tq1, rxr = group.get("TQ1"), group.get("RXR")
    frequency = (
        (tq1.value(3) if tq1 else "") or (rx.value(1, 2) if rx.name == "RXE" else "") or orc.value(7, 2)
    )
    tq_start, tq_end = (context.ts(tq1, 7), context.ts(tq1, 8)) if tq1 else (None, None)
    rx_start, rx_end = (
        (_ts_component(context, rx, 1, 4), _ts_component(context, rx, 1, 5))
        if rx.name == "RXE"
        else (None, None)
    )
    start, end = tq_start or rx_start, tq_end or rx_end
    ordered = context.ts(orc, 9) or context.message_time
    assert ordered is not None  # noqa: S101 - the message time is required
    context.add(
        "medication",
        ordered,
        {
            "order_id": order_id,
            "drug_code": drug,
            "drug_code_system": rx.value(give, 3) or None,
            "drug_display": rx.value(give, 2) or None,
            "dose_value": _number(rx, amount),
            "dose_unit": rx.value(units, 1) or rx.value(units, 2) or None,
            "route": (rxr.value(1, 1) if rxr else "") or None,
            "frequency": frequency or None,
            "status": status,
            "ordered_time": ordered,
            "start_time": start,
            "end_time": end,
            "prescriber": orc.value(12) or None,
        },
    )


def _ts_component(context: _Context, segment: Segment, field: int, component: int) -> dt.datetime | None:
    text = segment.value(field, component)
    return parse_ts(text, segment, field, context.zone) if text else None


# ---- DG1: diagnoses (in any message) -----------------------------------------------------------------

_CODE_SYSTEMS = {
    "I10": "ICD-10",
    "ICD10": "ICD-10",
    "ICD-10": "ICD-10",
    "I10C": "ICD-10-CM",
    "ICD10CM": "ICD-10-CM",
    "ICD-10-CM": "ICD-10-CM",
    "ICD10CN": "ICD-10-CN",
    "ICD-10-CN": "ICD-10-CN",
    "GB/T14396": "ICD-10-CN",
}
_DIAGNOSIS_KINDS = {"A": "ADMISSION", "F": "DISCHARGE"}  # W (working): UNKNOWN


def _diagnoses(context: _Context) -> None:
    for dg1 in context.message.all("DG1"):
        code = dg1.required(3, "the diagnosis code (DG1-3.1)")
        sent_system = dg1.value(3, 3) or dg1.value(2)
        system = _CODE_SYSTEMS.get(sent_system.upper().replace(" ", "")) if sent_system else "ICD-10"
        if system is None:
            raise dg1.error(
                3,
                f"coding system {sent_system!r} is not an ICD-10 edition",
                TABLE_VALUE_NOT_FOUND,
                component=3,
            )
        kind = dg1.value(6).upper()
        role = "PRINCIPAL" if dg1.value(15) == "1" else _DIAGNOSIS_KINDS.get(kind, "UNKNOWN")
        recorded = context.ts(dg1, 5) or context.message_time
        assert recorded is not None  # noqa: S101 - the message time is required
        owner = context.encounter_id or f"MRN:{context.patient['patient_mrn']}"
        context.add(
            "diagnosis",
            recorded,
            {
                "diagnosis_id": dg1.value(20) or f"{owner}|{code}",
                "icd10_code": code,
                "code_system": system,
                "display": dg1.value(3, 2) or dg1.value(4) or None,
                "kind": role,
                "recorded_time": recorded,
                "clinician": dg1.value(16) or None,
            },
        )


def _no_events(context: _Context, trigger: str) -> None:
    """A message type whose only events are its DG1s."""


_HANDLERS: dict[str, tuple[frozenset[str], Callable[[_Context, str], None]]] = {
    "ORU": (frozenset({"R01"}), _oru),
    "ADT": (frozenset(_ADT_EVENTS), _adt),
    "RDE": (frozenset({"O11"}), _orders),
    "OMP": (frozenset({"O09"}), _orders),
}

__all__ = [
    "DATA_TYPE_ERROR",
    "Header",
    "Mapped",
    "map_message",
    "parse_header",
    "salvage_header",
]
