"""Read-back: the clinician repeats the patient identifier and the value before an acknowledgement
counts (CLSI GP47; Joint Commission NPSG.02.03.01). Pure; the web layer passes what was typed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from console.exceptions import ReadBackMismatchError

_NUMBER = re.compile(r"^\s*(<=|>=|<|>)?\s*([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+))\s*$")


@dataclass(frozen=True)
class ReadBackTarget:
    """What the alert says: the patient's ids the user may know and the values that may be read back."""

    regional_patient_id: str
    mrn: str | None  # at the alert's institution, shown only to its users
    values: tuple[float, ...]  # as sent and canonical
    comparator: str | None = None


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def _same_value(typed: str, value: float) -> bool:
    """Equal at the precision of what was typed, or of the value as displayed (never looser than
    either): 6.8 is read back as 6.8 or 6.80, not as 7."""
    try:
        entered = Decimal(typed)
    except InvalidOperation:
        return False
    shown = format(Decimal(repr(value)).normalize(), "f")
    places = max(_decimals(typed), _decimals(shown))
    quantum = Decimal(1).scaleb(-places)
    return entered.quantize(quantum) == Decimal(repr(value)).quantize(quantum)


def check_read_back(target: ReadBackTarget, patient_identifier: str, value: str) -> None:
    """Raise ReadBackMismatchError naming the field that does not match; return when both do."""
    typed_id = (patient_identifier or "").strip()
    if not typed_id:
        raise ReadBackMismatchError("patient_identifier", "enter the patient's MRN or regional id")
    known = {target.regional_patient_id.lower()}
    if target.mrn:
        known.add(target.mrn.strip().lower())
    if typed_id.lower() not in known:
        raise ReadBackMismatchError("patient_identifier", "does not match this alert's patient")
    match = _NUMBER.match(value or "")
    if match is None:
        raise ReadBackMismatchError("value", "enter the value as a number, e.g. 6.8")
    comparator, number = match.group(1), match.group(2).replace(",", ".")
    if comparator is not None and target.comparator is not None and comparator != target.comparator:
        raise ReadBackMismatchError("value", f"the result was {target.comparator} a bound, not {comparator}")
    finite = [v for v in target.values if math.isfinite(v)]
    if not any(_same_value(number, v) for v in finite):
        raise ReadBackMismatchError("value", "does not match the value of this alert")
