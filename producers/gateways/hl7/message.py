"""A typed view of an HL7 v2 message parsed by python-hl7 (`hl7.parse`, which has no type hints): each
segment as fields -> repetitions -> components -> subcomponents of raw text, read through `value()`,
which unescapes (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\) in the message's own character set. Also the
header (MSH) and HL7 TS times."""

from __future__ import annotations

import datetime as dt
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producers.gateways.exceptions import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    HL7ContentError,
)
from producers.gateways.hl7.charset import Decoded

# python-hl7 ships no type hints: it is used through this one untyped handle
_hl7: Any = importlib.import_module("hl7")

# fields -> repetitions -> components -> subcomponents
Field = list[list[list[str]]]


@dataclass(frozen=True)
class Segment:
    name: str
    sequence: int  # 1-based repetition of this segment name in the message
    fields: list[Field]  # fields[n] is field n (fields[0] is the name)
    message: Message

    def raw(self, field: int, repetition: int = 1, component: int = 1, subcomponent: int = 1) -> str:
        try:
            return self.fields[field][repetition - 1][component - 1][subcomponent - 1]
        except IndexError:
            return ""

    def value(self, field: int, component: int = 1, repetition: int = 1, subcomponent: int = 1) -> str:
        """The unescaped text at a position ('' when absent), with HL7 component whitespace stripped."""
        raw = self.raw(field, repetition, component, subcomponent)
        return self.message.unescape(raw, self, field, component).strip() if raw else ""

    def repetitions(self, field: int) -> int:
        return len(self.fields[field]) if field < len(self.fields) else 0

    def text(self, field: int, repetition: int = 1) -> str:
        """A whole repetition as written (components joined by the message's own separators), unescaped
        piece by piece: for ST/TX values that a sender did not escape."""
        if field >= len(self.fields) or repetition > len(self.fields[field]):
            return ""
        sep = self.message.separators
        parts = []
        for index, component in enumerate(self.fields[field][repetition - 1], start=1):
            parts.append(
                sep.subcomponent.join(self.message.unescape(s, self, field, index) for s in component)
            )
        return sep.component.join(parts).strip()

    def error(
        self, field: int | None, reason: str, code: int = DATA_TYPE_ERROR, component: int | None = None
    ) -> HL7ContentError:
        return HL7ContentError(
            self.name, field, reason, code=code, sequence=self.sequence, component=component
        )

    def required(self, field: int, what: str, component: int = 1) -> str:
        value = self.value(field, component)
        if not value:
            raise self.error(field, f"{what} is required", REQUIRED_FIELD_MISSING)
        return value


@dataclass(frozen=True)
class Separators:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


_ESCAPES = {"F": "field", "S": "component", "T": "subcomponent", "R": "repetition", "E": "escape"}
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")


class Message:
    """A parsed message: its segments in order, its separators and its codec (for \\Xhh\\)."""

    def __init__(self, decoded: Decoded) -> None:
        self.codec = decoded.codec
        text = decoded.text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
        self.separators = _separators(text)
        try:
            parsed: Any = _hl7.parse(text)
        except Exception as exc:  # noqa: BLE001 - python-hl7 raises assorted errors on malformed text
            raise HL7ContentError("MSH", None, f"not a parsable HL7 v2 message: {exc}", code=100) from None
        self.segments: list[Segment] = []
        counts: dict[str, int] = {}
        for seg in parsed:
            fields = [_uniform(f) for f in seg]
            name = fields[0][0][0][0] if fields and fields[0] else ""
            if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
                raise HL7ContentError(
                    name[:3] or "?", None, f"{name[:10]!r} is not a segment name", code=SEGMENT_SEQUENCE_ERROR
                )
            counts[name] = counts.get(name, 0) + 1
            self.segments.append(Segment(name, counts[name], fields, self))
        if self.segments[0].name != "MSH":  # pragma: no cover - hl7.parse refuses it already
            raise HL7ContentError("MSH", None, "the first segment is not MSH", code=SEGMENT_SEQUENCE_ERROR)
        if counts["MSH"] > 1:
            raise HL7ContentError(
                "MSH",
                None,
                "more than one MSH: batches are not accepted",
                code=SEGMENT_SEQUENCE_ERROR,
                sequence=2,
            )

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def first(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def unescape(self, raw: str, segment: Segment, field: int, component: int) -> str:
        """HL7 escape sequences to text. \\Xhh..\\ are bytes in the message's character set (decoded with
        its codec, so multibyte characters arrive whole); \\H\\ and \\N\\ (highlighting) are dropped,
        `.br` is a line break; character-set switches (\\C..\\, \\M..\\) and bytes that do not decode
        are errors naming the position. An escape character without its closing one stays as sent."""
        esc = self.separators.escape
        if not esc or esc not in raw or (segment.name == "MSH" and field <= 2):
            return raw
        out: list[str] = []
        i = 0
        while i < len(raw):
            char = raw[i]
            end = raw.find(esc, i + 1) if char == esc else -1
            if end < 0:
                out.append(char)
                i += 1
                continue
            body = raw[i + 1 : end]
            if body in _ESCAPES:
                out.append(getattr(self.separators, _ESCAPES[body]))
            elif body[:1] == "X" and _HEX.fullmatch(body[1:]):
                try:
                    out.append(bytes.fromhex(body[1:]).decode(self.codec))
                except UnicodeDecodeError:
                    raise segment.error(
                        field, f"escape {esc}{body}{esc} is not valid {self.codec}", component=component
                    ) from None
            elif body in ("H", "N"):
                pass
            elif body == ".br":
                out.append("\n")
            elif body[:1] in ("C", "M", "Z", "X", "."):
                raise segment.error(
                    field, f"escape sequence {esc}{body}{esc} is not supported", component=component
                )
            else:  # not an escape sequence: the escape character as sent
                out.append(char)
                i += 1
                continue
            i = end + 1
        return "".join(out)


def _separators(text: str) -> Separators:
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7ContentError("MSH", None, "the message does not start with an MSH segment", code=100)
    field = text[3]
    end = text.find(field, 4)
    encoding = text[4:end] if end > 0 else ""
    if field.isalnum() or field.isspace() or not 2 <= len(encoding) <= 5:
        raise HL7ContentError(
            "MSH", 2, f"encoding characters {text[3:9]!r} are not valid", code=DATA_TYPE_ERROR
        )
    chars = field + encoding
    if len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in chars):
        raise HL7ContentError(
            "MSH", 2, f"encoding characters {encoding!r} are not valid", code=DATA_TYPE_ERROR
        )
    padded = encoding + "^~\\&"[len(encoding) :]
    return Separators(field, padded[0], padded[1], padded[2], padded[3])


def _uniform(node: Any) -> Field:
    """python-hl7 nests only as deep as a field's separators go; make every field reps -> comps -> subs."""
    if isinstance(node, str):
        return [[[node]]]
    reps: Field = []
    for rep in node:
        if isinstance(rep, str):
            reps.append([[rep]])
            continue
        comps: list[list[str]] = []
        for comp in rep:
            comps.append([comp] if isinstance(comp, str) else [str(s) for s in comp])
        reps.append(comps)
    return reps


# HL7 TS / DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]
_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?")


def parse_ts(text: str, segment: Segment, field: int, zone: dt.tzinfo | None) -> dt.datetime:
    """An instant as sent: with its offset when it has one, else on the institution's clock (`zone`).
    At least a date; a malformed or impossible time is an error naming the field."""
    match = _TS.fullmatch(text)
    if match is None or match.group(3) is None:
        raise segment.error(field, f"{text!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS[.SSSS]]][+ZZZZ])")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        if offset is not None:
            sign = 1 if offset[0] == "+" else -1
            hours, minutes = int(offset[1:3]), int(offset[3:5])
            if hours > 14 or minutes > 59:
                raise ValueError(f"offset {offset}")
            tz: dt.tzinfo = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
        elif zone is not None:
            tz = zone
        else:
            raise segment.error(
                field, f"{text!r} has no UTC offset and the institution's time zone is not known"
            )
        micro = int((fraction or "0").ljust(6, "0")[:6])
        value = dt.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tz,
        )
    except ValueError as exc:
        raise segment.error(field, f"{text!r} is not a valid date/time ({exc})") from None
    if offset is None and zone is not None:
        round_trip = value.astimezone(dt.UTC).astimezone(zone).replace(tzinfo=None)
        if round_trip != value.replace(tzinfo=None):
            raise segment.error(field, f"{text!r} does not exist on the institution's clock (DST gap)")
    return value
