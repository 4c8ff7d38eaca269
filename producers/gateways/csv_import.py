"""CSV exports: a per-institution column mapping (TOML), each row to one regional event, rejects kept.

The mapping says which kind the export holds (`lab`, or `vitals` with one measurement per row), how the
file is written (encoding, delimiter, decimal mark), which CSV header feeds which field, how times are
written (strptime formats, read as the institution's local time unless the format carries an offset) and
constant fields (source system, local code system). The patient's names come from columns only (the
family and the given name each from its own), never from a constant. Rows are turned into the raw
records the publisher takes, checked with the SDK's own validation, published in batches (acks=all) and
remembered in a ledger of event ids Kafka durably accepted, so a re-run neither publishes nor even
re-sends them. Rows that cannot become a valid event go to a rejects file with their row number, column
and reason.

Everything here but `run_import`'s publisher and `Ledger`'s file is pure; the command that wires them to
the settings is `clinhub/csv_command.py`.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
import sqlite3
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from confluent_kafka import KafkaException

from core.exceptions import HubError
from producers.exceptions import DeliveryFailedError
from producers.gateways.common import event_id_for
from producers.gateways.exceptions import GatewayError
from producers.validation import COMPARATORS, check_event
from schemas import standard
from schemas.exceptions import RecordValidationError

GATEWAY = "csv"

# What the mapping's `encoding` may say, and the codec it is read with. GBK and GB2312 are subsets of
# GB 18030 as senders write them; decoding them as gb18030 reads every file they can write.
ENCODINGS = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "utf-8-sig": "utf-8-sig",
    "gb18030": "gb18030",
    "gb-18030": "gb18030",
    "gbk": "gb18030",
    "gb2312": "gb18030",
}

LAB_STATUSES = ("preliminary", "final", "corrected", "cancelled", "unknown")

# Per kind: the fields a column may feed, those that must be mapped, the time fields, the natural key.
_NAMES = ("patient_family_name", "patient_given_name")  # each from its own column, as written
_COMMON_PATIENT = (
    "patient_mrn",
    "patient_national_id",
    "patient_birth_year",
    "patient_sex",
    *_NAMES,
    "encounter_id",
)
_ENVELOPE_CONSTANTS = ("source_system",)
_KIND_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "lab": {
        "fields": (
            "result_id",
            *_COMMON_PATIENT,
            "local_code",
            "local_code_system",
            "local_display",
            "loinc_code",
            "value",
            "unit",
            "reference_low",
            "reference_high",
            "abnormal_flag",
            "status",
            "specimen_collected_time",
            "result_time",
            "performing_lab",
            "ordering_clinician",
        ),
        "required": ("patient_mrn", "local_code", "value", "result_time"),
        "times": ("result_time", "specimen_collected_time"),
        "numbers": ("reference_low", "reference_high"),
    },
    "vitals": {
        "fields": (
            "observation_id",
            *_COMMON_PATIENT,
            "local_code",
            "loinc_code",
            "value",
            "unit",
            "status",
            "measured_time",
            "device_id",
        ),
        "required": ("patient_mrn", "local_code", "value", "unit", "measured_time"),
        "times": ("measured_time",),
        "numbers": (),
    },
}
_NATURAL_KEY = {"lab": "result_id", "vitals": "observation_id"}
_EVENT_TIME = {"lab": "result_time", "vitals": "measured_time"}
_TOP_KEYS = (
    "kind",
    "institution",
    "encoding",
    "delimiter",
    "decimal",
    "time_zone",
    "date_formats",
    "columns",
    "constants",
    "status_values",
    "sex_values",
)


class CsvImportError(GatewayError):
    """Root of the CSV gateway's errors: the whole import cannot go on (nothing is published)."""


class MappingError(CsvImportError):
    """The mapping file is wrong; `key` names the offending key (e.g. `columns.value`)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"mapping key {key}: {reason}")
        self.key = key
        self.reason = reason


class CsvFileError(CsvImportError):
    """The export cannot be read with its mapping (encoding, a mapped header missing)."""


@dataclass(frozen=True)
class CsvMapping:
    kind: str
    encoding: str  # the codec actually used
    delimiter: str
    decimal: str
    time_zone: ZoneInfo
    date_formats: tuple[str, ...]
    # field -> the CSV header(s) it is read from (several only for the natural key: joined with "-")
    columns: Mapping[str, tuple[str, ...]]
    constants: Mapping[str, Any]
    status_values: Mapping[str, str]
    sex_values: Mapping[str, str]
    institution: str | None = None

    def headers_of(self, name: str) -> str:
        return "+".join(self.columns.get(name, ()))


def _string(raw: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise MappingError(key, "is required")
    if not isinstance(value, str):
        raise MappingError(key, f"must be a string, not {value!r}")
    return value


def _string_table(raw: Mapping[str, Any], key: str) -> dict[str, str]:
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise MappingError(key, "must be a table")
    for name, value in table.items():
        if not isinstance(value, str):
            raise MappingError(f"{key}.{name}", f"must be a string, not {value!r}")
    return dict(table)


def parse_mapping(text: str) -> CsvMapping:
    """Read a mapping's TOML text; a MappingError names the first wrong key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError("(file)", f"is not valid TOML: {exc}") from None
    for key in raw:
        if key not in _TOP_KEYS:
            raise MappingError(key, f"unknown key; known keys: {', '.join(_TOP_KEYS)}")
    kind = _string(raw, "kind", "lab")
    if kind not in _KIND_FIELDS:
        raise MappingError("kind", f"{kind!r} is not supported; one of {', '.join(_KIND_FIELDS)}")
    spec = _KIND_FIELDS[kind]
    encoding_name = _string(raw, "encoding", "utf-8")
    encoding = ENCODINGS.get(encoding_name.strip().lower())
    if encoding is None:
        raise MappingError("encoding", f"{encoding_name!r} is not one of {', '.join(sorted(ENCODINGS))}")
    delimiter = _string(raw, "delimiter", ",")
    if delimiter == "\\t":
        delimiter = "\t"
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise MappingError("delimiter", f"{delimiter!r} must be one character (not a quote or line break)")
    decimal = _string(raw, "decimal", ".")
    if decimal not in (".", ","):
        raise MappingError("decimal", f"{decimal!r} must be '.' or ','")
    if decimal == delimiter:
        raise MappingError("decimal", f"{decimal!r} is also the delimiter")
    zone_name = _string(raw, "time_zone")
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise MappingError("time_zone", f"{zone_name!r} is not an IANA time zone") from None
    formats = raw.get("date_formats")
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) and f for f in formats):
        raise MappingError("date_formats", "must be a non-empty list of strptime formats")
    for i, fmt in enumerate(formats):
        if "%" not in fmt:
            raise MappingError(f"date_formats[{i}]", f"{fmt!r} has no strptime directive")
    columns_raw = raw.get("columns")
    if not isinstance(columns_raw, dict):
        raise MappingError("columns", "is required: a table of field = CSV header")
    columns: dict[str, tuple[str, ...]] = {}
    natural_key = _NATURAL_KEY[kind]
    for name, header in columns_raw.items():
        key = f"columns.{name}"
        if name not in spec["fields"]:
            raise MappingError(key, f"unknown {kind} field; one of {', '.join(spec['fields'])}")
        if isinstance(header, str) and header.strip():
            columns[name] = (header.strip(),)
        elif (
            name == natural_key
            and isinstance(header, list)
            and header
            and all(isinstance(h, str) and h.strip() for h in header)
        ):
            columns[name] = tuple(h.strip() for h in header)
        else:
            allowed = " (or a list of headers, joined with '-')" if name == natural_key else ""
            raise MappingError(key, f"must be a CSV header name{allowed}, not {header!r}")
    constants_raw = raw.get("constants", {})
    if not isinstance(constants_raw, dict):
        raise MappingError("constants", "must be a table of field = value")
    constants: dict[str, Any] = {}
    for name, value in constants_raw.items():
        key = f"constants.{name}"
        if name not in spec["fields"] and name not in _ENVELOPE_CONSTANTS:
            known = (*_ENVELOPE_CONSTANTS, *spec["fields"])
            raise MappingError(key, f"unknown field; one of {', '.join(known)}")
        if name in columns:
            raise MappingError(key, f"is also mapped to the column {columns[name][0]!r}")
        if name in ("value", natural_key, *spec["times"], *_NAMES):
            raise MappingError(key, "must come from a column, not a constant")
        if name == "patient_birth_year":
            if not isinstance(value, int) or isinstance(value, bool):
                raise MappingError(key, f"must be an integer, not {value!r}")
        elif name in spec["numbers"]:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise MappingError(key, f"must be a number, not {value!r}")
            value = float(value)
        elif not isinstance(value, str):
            raise MappingError(key, f"must be a string, not {value!r}")
        constants[name] = value
    for name in spec["required"]:
        if name not in columns:
            raise MappingError(f"columns.{name}", f"is required for {kind}: the CSV header it is read from")
    status_values = {k.strip().lower(): v for k, v in _string_table(raw, "status_values").items()}
    for source, target in status_values.items():
        if target not in LAB_STATUSES:
            raise MappingError(
                f"status_values.{source}", f"{target!r} is not one of {', '.join(LAB_STATUSES)}"
            )
    if "status" in constants and constants["status"] not in LAB_STATUSES:
        raise MappingError(
            "constants.status", f"{constants['status']!r} is not one of {', '.join(LAB_STATUSES)}"
        )
    sex_values = {k.strip(): v for k, v in _string_table(raw, "sex_values").items()}
    institution = raw.get("institution")
    if institution is not None and not isinstance(institution, str):
        raise MappingError("institution", f"must be a string, not {institution!r}")
    return CsvMapping(
        kind=kind,
        encoding=encoding,
        delimiter=delimiter,
        decimal=decimal,
        time_zone=zone,
        date_formats=tuple(formats),
        columns=columns,
        constants=constants,
        status_values=status_values,
        sex_values=sex_values,
        institution=institution,
    )


def load_mapping(path: Path) -> CsvMapping:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError("(file)", f"cannot read {path}: {exc}") from None
    return parse_mapping(text)


# ---------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class LabValue:
    numeric: float | None
    comparator: str | None
    text: str | None


def _number_pattern(decimal: str) -> re.Pattern[str]:
    mark = re.escape(decimal)
    return re.compile(rf"[+-]?(?:\d+(?:{mark}\d+)?|{mark}\d+)")


def parse_number(text: str, decimal: str) -> float | None:
    """The number a cell holds in the institution's notation, or None if it holds no plain number.

    No thousands separators and no other decimal mark are guessed: `1.234` in a decimal-comma export is
    not a number here."""
    if _number_pattern(decimal).fullmatch(text) is None:
        return None
    return float(text.replace(decimal, ".")) if decimal != "." else float(text)


_COMPARATOR = re.compile(r"(<=|>=|<|>)\s*(.+)")


def parse_lab_value(text: str, decimal: str) -> LabValue:
    """A plain number; a bound (`>600`, `< 0,5`) as comparator and number; anything else as text, for
    the normaliser to judge (`5.2 (H)`, `阴性`, `HI`)."""
    number = parse_number(text, decimal)
    if number is not None:
        return LabValue(number, None, None)
    match = _COMPARATOR.fullmatch(text)
    if match is not None:
        bound = parse_number(match.group(2), decimal)
        if bound is not None and match.group(1) in COMPARATORS:
            return LabValue(bound, match.group(1), None)
    return LabValue(None, None, text)


def parse_time(text: str, formats: Sequence[str], zone: ZoneInfo) -> dt.datetime | None:
    """The first format that reads the cell wins; a time without an offset is the institution's local
    wall-clock time (aware, in its zone, as the SDK expects)."""
    for fmt in formats:
        try:
            value = dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    return None


# ------------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Problem:
    column: str  # the CSV header (or "" when the problem is not one column's)
    reason: str


@dataclass
class RowResult:
    """One CSV row: its event (when valid) or the problems that keep it out."""

    row_number: int
    values: list[str]
    record: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def event_id(self) -> str:
        assert self.record is not None  # noqa: S101 - only asked of valid rows
        return str(self.record["envelope"]["event_id"])


def content_digest(kind: str, cells: Mapping[str, str]) -> str:
    """A digest of what the row says through the mapping (field -> cell text), independent of column order."""
    text = json.dumps({"kind": kind, **cells}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RowBuilder:
    """Turns the rows of one export into raw records of the mapping's kind, validated like the SDK does."""

    def __init__(
        self,
        mapping: CsvMapping,
        institution: str,
        header: Sequence[str],
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        source_name: str = "",
    ) -> None:
        self.mapping = mapping
        self.institution = institution
        self.header = [h.strip() for h in header]
        self._now = now
        self._source_name = source_name
        self._schema = standard.load(standard.KIND_SCHEMAS[mapping.kind])
        self._index: dict[str, int] = {}
        for i, name in enumerate(self.header):
            self._index.setdefault(name, i)
        for name, headers in mapping.columns.items():
            for h in headers:
                if h not in self._index:
                    raise CsvFileError(
                        f"mapping key columns.{name}: header {h!r} is not in the file's header "
                        f"({', '.join(repr(x) for x in self.header)})"
                    )
        # which CSV header to name when the SDK's validation names a field
        self._field_columns = {name: mapping.headers_of(name) for name in mapping.columns}
        value_column = mapping.headers_of("value")
        for name in ("value_numeric", "value_comparator", "value_text"):
            self._field_columns[name] = value_column
        self._field_columns["envelope.event_time"] = mapping.headers_of(_EVENT_TIME[mapping.kind])
        self._field_columns["measurements"] = value_column

    def build(self, row_number: int, values: list[str]) -> RowResult:
        result = RowResult(row_number, values)
        if len(values) != len(self.header):
            result.problems.append(
                Problem("", f"row has {len(values)} fields, the header has {len(self.header)}")
            )
            return result
        cells = {
            name: "-".join(values[self._index[h]].strip() for h in headers)
            for name, headers in self.mapping.columns.items()
        }
        fields: dict[str, Any] = dict(self.mapping.constants)
        for name, text in cells.items():
            column = self.mapping.headers_of(name)
            if not text or (len(self.mapping.columns[name]) > 1 and not text.strip("-")):
                fields[name] = None
                if name in _KIND_FIELDS[self.mapping.kind]["required"]:
                    result.problems.append(Problem(column, f"{name} is empty"))
                continue
            try:
                fields[name] = self._convert(name, text)
            except ValueError as exc:
                result.problems.append(Problem(column, str(exc)))
        if result.problems:
            return result
        record = self._record(fields, cells)
        try:
            check_event(self.mapping.kind, record, self._schema, self.institution)
        except RecordValidationError as exc:
            column = self._field_columns.get(exc.field or "", "")
            result.problems.append(Problem(column, str(exc)))
            return result
        result.record = record
        return result

    def _convert(self, name: str, text: str) -> Any:
        m = self.mapping
        spec = _KIND_FIELDS[m.kind]
        if name in spec["times"]:
            value = parse_time(text, m.date_formats, m.time_zone)
            if value is None:
                raise ValueError(f"{text!r} matches none of the date formats {', '.join(m.date_formats)}")
            return value
        if name == "value":
            parsed = parse_lab_value(text, m.decimal)
            if m.kind == "vitals" and (parsed.numeric is None or parsed.comparator is not None):
                raise ValueError(f"{text!r} is not a number (decimal mark {m.decimal!r})")
            return parsed
        if name in spec["numbers"]:
            number = parse_number(text, m.decimal)
            if number is None:
                raise ValueError(f"{text!r} is not a number (decimal mark {m.decimal!r})")
            return number
        if name == "patient_birth_year":
            if not re.fullmatch(r"\d{4}", text):
                raise ValueError(f"{text!r} is not a year")
            return int(text)
        if name == "status":
            status = m.status_values.get(text.lower(), text.lower())
            if status not in LAB_STATUSES:
                raise ValueError(f"{text!r} is not a status ({', '.join(LAB_STATUSES)} or status_values)")
            return status
        if name == "patient_sex" and m.sex_values:
            if text not in m.sex_values:
                raise ValueError(f"{text!r} is not one of sex_values ({', '.join(m.sex_values)})")
            return m.sex_values[text]
        return text

    def _record(self, fields: dict[str, Any], cells: Mapping[str, str]) -> dict[str, Any]:
        kind = self.mapping.kind
        natural_key = _NATURAL_KEY[kind]
        digest = content_digest(kind, cells)
        # The same row again (this file re-run, or an overlapping later export) is the same event; a row
        # with the same result id but other content (a corrected value) is a new event of that result.
        natural = fields.get(natural_key)
        source_id = f"{natural}#{digest[:24]}" if natural else digest
        event_id = event_id_for(GATEWAY, self.institution, source_id, 0)
        if not natural:
            fields[natural_key] = f"csv-{digest[:20]}"
        when = fields[_EVENT_TIME[kind]]
        envelope = {
            "event_id": event_id,
            "institution_id": self.institution,
            "source_system": fields.pop("source_system", None) or "CSV export",
            "source_message_id": f"csv:{self._source_name}" if self._source_name else None,
            "event_time": when,
            "produced_time": self._now(),
            "schema_version": "1",
            "correlation_id": event_id,
        }
        patient = {name: fields.get(name) for name in _COMMON_PATIENT}
        if kind == "lab":
            value: LabValue = fields["value"]
            return {
                "envelope": envelope,
                "result_id": fields["result_id"],
                **patient,
                "local_code": fields["local_code"],
                "local_code_system": fields.get("local_code_system"),
                "local_display": fields.get("local_display"),
                "loinc_code": fields.get("loinc_code"),
                "value_numeric": value.numeric,
                "value_comparator": value.comparator,
                "value_text": value.text,
                "unit": fields.get("unit"),
                "reference_low": fields.get("reference_low"),
                "reference_high": fields.get("reference_high"),
                "abnormal_flag": fields.get("abnormal_flag"),
                "status": fields.get("status") or "final",
                "specimen_collected_time": fields.get("specimen_collected_time"),
                "result_time": when,
                "performing_lab": fields.get("performing_lab"),
                "ordering_clinician": fields.get("ordering_clinician"),
                "regional_patient_id": None,
                "canonical_value": None,
                "canonical_unit": None,
                "normalisation_flags": [],
            }
        measured: LabValue = fields["value"]
        return {
            "envelope": envelope,
            "observation_id": fields["observation_id"],
            **patient,
            "measured_time": when,
            "device_id": fields.get("device_id"),
            "status": fields.get("status") or "final",
            "measurements": [
                {
                    "loinc_code": fields.get("loinc_code"),
                    "local_code": fields["local_code"],
                    "value": measured.numeric,
                    "unit": fields["unit"],
                }
            ],
            "regional_patient_id": None,
        }


# ---------------------------------------------------------------------------------------------- files


def read_rows(path: Path, mapping: CsvMapping) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the records (1-based record number, header = 1; blank lines left out)."""
    data = path.read_bytes()
    try:
        text = data.decode(mapping.encoding)
    except UnicodeDecodeError as exc:
        raise CsvFileError(
            f"{path.name} is not {mapping.encoding} (mapping key encoding) at byte {exc.start}: {exc.reason}"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=mapping.delimiter)
    try:
        records = list(reader)
    except csv.Error as exc:
        raise CsvFileError(f"{path.name}: unreadable CSV near line {reader.line_num}: {exc}") from None
    if not records:
        raise CsvFileError(f"{path.name} is empty: no header row")
    rows = [(n, values) for n, values in enumerate(records[1:], start=2) if any(v.strip() for v in values)]
    return records[0], rows


REJECT_COLUMNS = ("reject_row", "reject_column", "reject_reason")


def write_rejects(
    path: Path, mapping: CsvMapping, header: Sequence[str], rejects: Iterable[RowResult]
) -> None:
    """In the export's own encoding and delimiter, so the file can be corrected and imported again with
    the same mapping (the three extra columns are not mapped)."""
    encoding = "utf-8-sig" if mapping.encoding == "utf-8-sig" else mapping.encoding
    with path.open("w", encoding=encoding, newline="") as out:
        writer = csv.writer(out, delimiter=mapping.delimiter)
        writer.writerow([*REJECT_COLUMNS, *header])
        for row in rejects:
            columns = "; ".join(dict.fromkeys(p.column for p in row.problems if p.column))
            reasons = "; ".join(p.reason for p in row.problems)
            writer.writerow([row.row_number, columns, reasons, *row.values])


class Ledger:
    """Event ids Kafka durably accepted (SQLite), so a re-run does not even send them again."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS imported (event_id TEXT PRIMARY KEY, institution TEXT NOT NULL, "
            "source TEXT NOT NULL, row_number INTEGER NOT NULL, imported_at TEXT NOT NULL)"
        )
        self._db.commit()

    def known(self, event_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(event_ids), 500):
            chunk = list(event_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT event_id FROM imported WHERE event_id IN ({marks})"  # noqa: S608 - only marks
            found.update(r[0] for r in self._db.execute(query, chunk))
        return found

    def record(self, institution: str, source: str, rows: Iterable[tuple[str, int]]) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO imported VALUES (?, ?, ?, ?, ?)",
                [(event_id, institution, source, row, now) for event_id, row in rows],
            )

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------------------------- import


class BatchPublisher(Protocol):
    def publish_many(
        self, kind: str, records: Sequence[Mapping[str, Any]]
    ) -> Sequence[object | DeliveryFailedError]: ...


@dataclass
class ImportSummary:
    rows_read: int = 0
    published: int = 0
    already_imported: int = 0
    duplicates: int = 0  # rows repeating an earlier row of the same file (the same event)
    rejected: int = 0
    not_published: int = 0
    failure: str | None = None  # why publishing stopped, when it did
    rejects_path: Path | None = None

    def lines(self) -> list[str]:
        lines = [
            f"rows read: {self.rows_read}",
            f"published: {self.published}",
            f"already imported: {self.already_imported}",
            f"rejected: {self.rejected}" + (f" (see {self.rejects_path})" if self.rejected else ""),
            f"not published: {self.not_published}",
        ]
        if self.duplicates:
            lines.insert(3, f"repeated rows in the file (same event): {self.duplicates}")
        return lines


def check_export(
    path: Path, mapping: CsvMapping, institution: str
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Everything that stops the whole import, checked before any connection: the mapping is this
    institution's, the file decodes, every mapped header is there. Returns the header and the rows."""
    if mapping.institution is not None and mapping.institution != institution:
        raise MappingError("institution", f"the mapping is for {mapping.institution!r}, not {institution!r}")
    header, rows = read_rows(path, mapping)
    RowBuilder(mapping, institution, header)
    return header, rows


def run_import(
    path: Path,
    mapping: CsvMapping,
    institution: str,
    publisher: BatchPublisher,
    ledger: Ledger,
    rejects_path: Path,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> ImportSummary:
    """Read, check, publish in batches, record what Kafka accepted, write the rejects. Once a batch has a
    failed delivery (broker down), no further batch is sent: the rest counts as not published, and a
    re-run sends exactly what is not in the ledger."""
    header, rows = check_export(path, mapping, institution)
    builder = RowBuilder(mapping, institution, header, now=now, source_name=path.name)
    summary = ImportSummary(rejects_path=rejects_path)
    rejects: list[RowResult] = []
    seen: set[str] = set()
    pending: list[RowResult] = []

    def flush() -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        if summary.failure is not None:
            summary.not_published += len(batch)
            return
        known = ledger.known([r.event_id for r in batch])
        fresh = [r for r in batch if r.event_id not in known]
        summary.already_imported += len(batch) - len(fresh)
        if not fresh:
            return
        try:
            results = publisher.publish_many(mapping.kind, [r.record for r in fresh if r.record is not None])
        except (HubError, KafkaException) as exc:  # the broker or registry refused the whole batch
            summary.not_published += len(fresh)
            summary.failure = str(exc)
            return
        delivered: list[tuple[str, int]] = []
        for row, outcome in zip(fresh, results, strict=True):
            if isinstance(outcome, DeliveryFailedError):
                summary.not_published += 1
                summary.failure = summary.failure or outcome.reason
            else:
                delivered.append((row.event_id, row.row_number))
        ledger.record(institution, path.name, delivered)
        summary.published += len(delivered)

    for row_number, values in rows:
        summary.rows_read += 1
        result = builder.build(row_number, values)
        if result.record is None:
            rejects.append(result)
            summary.rejected += 1
        elif result.event_id in seen:
            summary.duplicates += 1
        else:
            seen.add(result.event_id)
            pending.append(result)
            if len(pending) >= batch_size:
                flush()
        if progress is not None:
            progress(1)
    flush()
    write_rejects(rejects_path, mapping, header, rejects)
    return summary
