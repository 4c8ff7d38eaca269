"""The CSV gateway without services: mappings, rows to events, rejects, ids, the ledger, failed publishes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from producers.exceptions import DeliveryFailedError
from producers.gateways.common import event_id_for
from producers.gateways.csv_import import (
    CsvFileError,
    Ledger,
    MappingError,
    content_digest,
    load_mapping,
    parse_lab_value,
    parse_mapping,
    run_import,
)

ROOT = Path(__file__).resolve().parents[4]
DEPLOY = ROOT / "deploy" / "csv"
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)

MINIMAL = """
time_zone = "Asia/Shanghai"
date_formats = ["%Y-%m-%d %H:%M"]
[columns]
patient_mrn = "MRN"
local_code = "Code"
value = "Value"
unit = "Unit"
result_time = "Time"
"""


class FakePublisher:
    """Records what it is asked to publish; `fail_from` makes every later delivery fail (broker down)."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.batches = 0
        self.fail_from = fail_from

    def publish_many(self, kind: str, records: Sequence[Mapping[str, Any]]) -> list[object]:
        self.batches += 1
        results: list[object] = []
        for record in records:
            event_id = str(record["envelope"]["event_id"])
            if self.fail_from is not None and len(self.sent) >= self.fail_from:
                results.append(DeliveryFailedError(event_id, "broker transport failure", retriable=True))
            else:
                self.sent.append(dict(record))
                results.append(object())
        return results


def _import(
    tmp_path: Path,
    csv_path: Path,
    mapping_text: str | None = None,
    mapping_path: Path | None = None,
    institution: str = "H001",
    publisher: FakePublisher | None = None,
    batch_size: int = 500,
) -> tuple[Any, FakePublisher, Path]:
    mapping = load_mapping(mapping_path) if mapping_path else parse_mapping(mapping_text or MINIMAL)
    publisher = publisher or FakePublisher()
    ledger = Ledger(tmp_path / "csv-ledger.sqlite3")
    rejects = tmp_path / "rejects.csv"
    try:
        summary = run_import(
            csv_path, mapping, institution, publisher, ledger, rejects, batch_size=batch_size, now=lambda: NOW
        )
    finally:
        ledger.close()
    return summary, publisher, rejects


def _write(tmp_path: Path, text: str, name: str = "export.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _rejects(path: Path, encoding: str = "utf-8", delimiter: str = ",") -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode(encoding)), delimiter=delimiter))


# ------------------------------------------------------------------------------------------ mappings


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda t: t.replace('value = "Value"\n', ""), "columns.value"),
        (lambda t: t.replace('unit = "Unit"', 'unitt = "Unit"'), "columns.unitt"),
        (lambda t: 'encoding = "latin-9"\n' + t, "encoding"),
        (lambda t: 'decimal = ";"\n' + t, "decimal"),
        (lambda t: 'delimiter = ";;"\n' + t, "delimiter"),
        (lambda t: t.replace('"Asia/Shanghai"', '"Mars/Olympus"'), "time_zone"),
        (lambda t: t.replace('date_formats = ["%Y-%m-%d %H:%M"]', "date_formats = []"), "date_formats"),
        (lambda t: t.replace('["%Y-%m-%d %H:%M"]', '["%Y", "YYYY-MM-DD"]'), "date_formats[1]"),
        (lambda t: 'kind = "imaging"\n' + t, "kind"),
        (lambda t: 'colour = "blue"\n' + t, "colour"),
        (lambda t: t + '[constants]\nreference_low = "low"\n', "constants.reference_low"),
        (lambda t: t + '[constants]\nunit = "mmol/L"\n', "constants.unit"),
        (lambda t: t + '[constants]\nresult_time = "now"\n', "constants.result_time"),
        (lambda t: t + '[constants]\nresult_id = "R1"\n', "constants.result_id"),
        (lambda t: t + '[constants]\npatient_family_name = "张"\n', "constants.patient_family_name"),
        (lambda t: t + '[constants]\npatient_given_name = "三"\n', "constants.patient_given_name"),
        (lambda t: t + '[status_values]\nF = "done"\n', "status_values.f"),
        (lambda t: t.replace('local_code = "Code"', "local_code = 3"), "columns.local_code"),
        (lambda t: t + "[columns", "(file)"),
    ],
)
def test_mapping_errors_name_the_key(change: Any, key: str) -> None:
    with pytest.raises(MappingError) as caught:
        parse_mapping(change(MINIMAL))
    assert caught.value.key == key
    assert key in str(caught.value)


def test_gbk_and_gb2312_are_read_as_gb18030() -> None:
    for name in ("GBK", "GB2312", "gb18030"):
        assert parse_mapping(f'encoding = "{name}"\n' + MINIMAL).encoding == "gb18030"


def test_a_mapped_header_missing_from_the_file_names_the_mapping_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "MRN,Code,Result,Unit,Time\nM1,K,4.2,mmol/L,2026-11-30 08:00\n")
    with pytest.raises(CsvFileError, match=r"columns\.value: header 'Value'"):
        _import(tmp_path, path)


def test_a_mapping_for_another_institution_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="institution"):
        _import(tmp_path, DEPLOY / "h002-lab-example.csv", mapping_path=DEPLOY / "h002-lab.toml")


def test_a_file_not_in_the_mapping_encoding_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "MRN,Code,Value,Unit,Time\n张三,K,4.2,mmol/L,2026-11-30 08:00\n", encoding="gb18030"
    )
    with pytest.raises(CsvFileError, match="not utf-8"):
        _import(tmp_path, path)


# ------------------------------------------------------------------------------ the example exports


def test_h002_gb18030_decimal_comma_and_chinese_headers(tmp_path: Path) -> None:
    summary, publisher, rejects = _import(
        tmp_path,
        DEPLOY / "h002-lab-example.csv",
        mapping_path=DEPLOY / "h002-lab.toml",
        institution="H002",
    )
    assert (summary.rows_read, summary.published, summary.rejected, summary.not_published) == (8, 6, 2, 0)
    by_id = {r["result_id"]: r for r in publisher.sent}
    potassium = by_id["S2611300001-LAB0101"]
    assert potassium["value_numeric"] == 4.2 and potassium["value_comparator"] is None
    assert potassium["unit"] == "mmol/L" and potassium["local_display"] == "钾"
    assert potassium["patient_mrn"] == "0000012345" and potassium["patient_sex"] == "male"
    assert by_id["S2611300001-LAB0102"]["value_numeric"] == 139.5
    # local wall-clock time of Urumqi (UTC+6), aware, as the SDK expects
    assert potassium["result_time"] == dt.datetime(2026, 11, 30, 8, 1, tzinfo=ZoneInfo("Asia/Urumqi"))
    assert potassium["result_time"].astimezone(dt.UTC) == dt.datetime(2026, 11, 30, 2, 1, tzinfo=dt.UTC)
    assert potassium["envelope"]["event_time"] == potassium["result_time"]
    assert potassium["envelope"]["source_system"] == "LIS-LabWin"
    assert potassium["local_code_system"] == "LIS-H002"
    glucose = by_id["S2611300001-LAB0201"]
    assert (glucose["value_comparator"], glucose["value_numeric"]) == (">", 33.3)
    haemolysed = by_id["S2611300002-LAB0101"]
    assert haemolysed["value_numeric"] is None and haemolysed["value_text"] == "溶血"
    rows = _rejects(rejects, encoding="gb18030", delimiter=";")
    assert [(r["reject_row"], r["reject_column"]) for r in rows] == [("8", "病历号"), ("9", "报告时间")]
    assert rows[0]["姓名"] == "王五" and rows[1]["报告时间"] == "2026年11月30日 11:40"
    assert "matches none of the date formats" in rows[1]["reject_reason"]


def test_h001_utf8_example(tmp_path: Path) -> None:
    summary, publisher, rejects = _import(
        tmp_path, DEPLOY / "h001-lab-example.csv", mapping_path=DEPLOY / "h001-lab.toml"
    )
    assert (summary.published, summary.rejected) == (6, 2)
    by_id = {r["result_id"]: r for r in publisher.sent}
    assert by_id["H001-C0000004"]["value_numeric"] == 13.4
    assert by_id["H001-C0000004"]["reference_low"] == 12.0
    assert by_id["H001-C0000005"]["status"] == "corrected"
    assert (by_id["H001-C0000005"]["value_comparator"], by_id["H001-C0000005"]["value_numeric"]) == ("<", 0.2)
    assert by_id["H001-C0000001"]["patient_birth_year"] == 1958
    assert by_id["H001-C0000001"]["result_time"].utcoffset() == dt.timedelta(hours=8)
    assert [r["reject_column"] for r in _rejects(rejects)] == ["MRN", "Reported"]


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "decimal", "expected"),
    [
        ("4.2", ".", (4.2, None, None)),
        ("-0.5", ".", (-0.5, None, None)),
        (">600", ".", (600.0, ">", None)),
        ("> 600", ".", (600.0, ">", None)),
        ("<=0.01", ".", (0.01, "<=", None)),
        (">=33,3", ",", (33.3, ">=", None)),
        ("<1,0", ",", (1.0, "<", None)),
        ("7,1", ",", (7.1, None, None)),
        ("7,1", ".", (None, None, "7,1")),  # not a number in a "." export: text, for the normaliser
        ("7.1", ",", (None, None, "7.1")),  # nor the other way round: no guess
        ("1,234.5", ".", (None, None, "1,234.5")),
        ("5.2 (H)", ".", (None, None, "5.2 (H)")),
        ("HI", ".", (None, None, "HI")),
        ("阴性", ".", (None, None, "阴性")),
        (">abc", ".", (None, None, ">abc")),
        ("nan", ".", (None, None, "nan")),
    ],
)
def test_values_comparators_and_text(text: str, decimal: str, expected: tuple[Any, ...]) -> None:
    value = parse_lab_value(text, decimal)
    assert (value.numeric, value.comparator, value.text) == expected


def test_values_are_carried_as_sent_only_surrounding_whitespace_is_trimmed(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "MRN,Code,Value,Unit,Time\n"
        "  M1 ,K,  4.25  ,mmol/L,2026-11-30 08:00\n"
        "M1,NOTE,  trace  amount ,,2026-11-30 08:00\n",
    )
    summary, publisher, _ = _import(tmp_path, path)
    assert summary.published == 2
    assert publisher.sent[0]["patient_mrn"] == "M1" and publisher.sent[0]["value_numeric"] == 4.25
    assert publisher.sent[1]["value_text"] == "trace  amount" and publisher.sent[1]["unit"] is None


NAMED = MINIMAL.replace(
    'unit = "Unit"', 'unit = "Unit"\npatient_family_name = "姓"\npatient_given_name = "名"'
)


def test_patient_names_from_their_columns_as_written_in_gb18030(tmp_path: Path) -> None:
    """Each name from its own column (a full name in one column is not split: that would be a guess);
    GBK bytes with `|` or `^` second (區 0x85 0x5E, 瑋 0xAC 0x7C) stay one character."""
    path = _write(
        tmp_path,
        "MRN;姓;名;Code;Value;Unit;Time\n"
        "0000000042;區;瑋東;K;2,6;mmol/L;2026-11-30 08:00\n"
        "0000012345;欧阳;晓明 Tony;NA;139;mmol/L;2026-11-30 08:00\n"
        "0000067890;;;K;4,1;mmol/L;2026-11-30 08:00\n",
        encoding="gb18030",
    )
    mapping = 'encoding = "GBK"\ndelimiter = ";"\ndecimal = ","\n' + NAMED
    summary, publisher, _ = _import(tmp_path, path, mapping_text=mapping, institution="H002")
    assert summary.published == 3
    names = [(r["patient_mrn"], r["patient_family_name"], r["patient_given_name"]) for r in publisher.sent]
    assert names == [
        ("0000000042", "區", "瑋東"),
        ("0000012345", "欧阳", "晓明 Tony"),
        ("0000067890", None, None),  # empty cells: no name sent
    ]


def test_a_mapping_without_name_columns_sends_no_name_and_keeps_its_event_ids(tmp_path: Path) -> None:
    """The row's digest covers the mapped cells only: exports imported before names were carried make the
    same events again."""
    row = "MRN,Code,Value,Unit,Time\nM1,K,4.2,mmol/L,2026-11-30 08:00\n"
    _, plain, _ = _import(tmp_path, _write(tmp_path, row))
    (record,) = plain.sent
    assert (record["patient_family_name"], record["patient_given_name"]) == (None, None)
    cells = {"patient_mrn": "M1", "local_code": "K", "value": "4.2", "unit": "mmol/L"}
    digest = content_digest("lab", {**cells, "result_time": "2026-11-30 08:00"})
    assert record["envelope"]["event_id"] == event_id_for("csv", "H001", digest, 0)


def test_vitals_carry_the_patient_names(tmp_path: Path) -> None:
    mapping = (
        'kind = "vitals"\ntime_zone = "Asia/Hong_Kong"\ndate_formats = ["%Y-%m-%d %H:%M"]\n'
        '[columns]\npatient_mrn = "MRN"\npatient_family_name = "Surname"\npatient_given_name = "Given"\n'
        'local_code = "Code"\nvalue = "Value"\nunit = "Unit"\nmeasured_time = "Time"\n'
    )
    path = _write(
        tmp_path, "MRN,Surname,Given,Code,Value,Unit,Time\nHC-1,CHAN,Tai Man,HR,72,/min,2026-11-30 08:00\n"
    )
    summary, publisher, _ = _import(tmp_path, path, mapping_text=mapping, institution="C003")
    assert summary.published == 1
    assert (publisher.sent[0]["patient_family_name"], publisher.sent[0]["patient_given_name"]) == (
        "CHAN",
        "Tai Man",
    )


# --------------------------------------------------------------------------------------------- rejects


def test_bad_rows_go_to_the_rejects_file_with_row_column_and_reason(tmp_path: Path) -> None:
    mapping = MINIMAL.replace('unit = "Unit"', 'unit = "Unit"\nreference_low = "Low"\nstatus = "Status"')
    path = _write(
        tmp_path,
        "MRN,Code,Value,Unit,Time,Low,Status\n"
        "M1,K,4.2,mmol/L,2026-11-30 08:00,3.5,final\n"  # row 2: good
        "M2,K,,mmol/L,2026-11-30 08:00,3.5,final\n"  # row 3: no value
        "M3,K,4.2,mmol/L,yesterday,3.5,final\n"  # row 4: time
        "M4,K,4.2,mmol/L,2026-11-30 08:00,low,final\n"  # row 5: reference not a number
        "M5,K,4.2,mmol/L,2026-11-30 08:00,3.5,done\n"  # row 6: status
        "M6,K,4.2\n"  # row 7: short row
        "\n"  # row 8: blank, skipped
        "M7,K,4.2,mmol/L,2126-11-30 08:00,3.5,final\n"  # row 9: good for the gateway (the hub judges)
        ",,,,,,\n",  # row 10: blank
    )
    summary, _, rejects = _import(tmp_path, path, mapping_text=mapping)
    assert summary.rows_read == 7 and summary.published == 2 and summary.rejected == 5
    rows = _rejects(rejects)
    assert [(r["reject_row"], r["reject_column"]) for r in rows] == [
        ("3", "Value"),
        ("4", "Time"),
        ("5", "Low"),
        ("6", "Status"),
        ("7", ""),
    ]
    assert rows[0]["reject_reason"] == "value is empty"
    assert "'yesterday' matches none of the date formats" in rows[1]["reject_reason"]
    assert "'low' is not a number" in rows[2]["reject_reason"]
    assert "row has 3 fields, the header has 7" in rows[4]["reject_reason"]
    assert rows[1]["MRN"] == "M3" and rows[1]["Time"] == "yesterday"  # the original values


def test_a_row_failing_the_sdk_validation_is_rejected_naming_its_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "MRN,Code,Value,Unit,Time\n   ,K,4.2,mmol/L,2026-11-30 08:00\n")
    summary, publisher, rejects = _import(tmp_path, path)
    assert summary.rejected == 1 and not publisher.sent
    assert _rejects(rejects)[0]["reject_column"] == "MRN"


def test_rejected_rows_can_be_imported_again_once_corrected(tmp_path: Path) -> None:
    path = _write(tmp_path, "MRN,Code,Value,Unit,Time\nM1,K,4.2,mmol/L,30.11.2026\n")
    _, _, rejects = _import(tmp_path, path)
    fixed = rejects.read_text().replace("30.11.2026", "2026-11-30 08:00")
    again = _write(tmp_path, fixed, name="fixed.csv")
    summary, publisher, _ = _import(tmp_path, again)
    assert summary.published == 1 and publisher.sent[0]["patient_mrn"] == "M1"


def test_a_utf8_bom_is_not_part_of_the_first_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "\ufeffMRN,Code,Value,Unit,Time\nM1,K,4.2,mmol/L,2026-11-30 08:00\n")
    summary, _, _ = _import(tmp_path, path)
    assert summary.published == 1


def test_time_formats_are_tried_in_order_and_an_offset_in_the_text_is_kept(tmp_path: Path) -> None:
    mapping = MINIMAL.replace('["%Y-%m-%d %H:%M"]', '["%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S%z"]')
    path = _write(
        tmp_path,
        "MRN,Code,Value,Unit,Time\n"
        "M1,K,4.2,mmol/L,2026-11-30 08:00\n"
        "M1,NA,140,mmol/L,2026-11-30T08:00:00+00:00\n",
    )
    _, publisher, _ = _import(tmp_path, path, mapping_text=mapping)
    assert publisher.sent[0]["result_time"] == dt.datetime(2026, 11, 30, 0, 0, tzinfo=dt.UTC)
    assert publisher.sent[1]["result_time"] == dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


# ------------------------------------------------------------------------------------ ids and re-runs


def test_event_ids_are_deterministic_and_follow_the_result_id(tmp_path: Path) -> None:
    mapping = MINIMAL.replace('unit = "Unit"', 'unit = "Unit"\nresult_id = "Id"')
    text = "Id,MRN,Code,Value,Unit,Time\nR1,M1,K,4.2,mmol/L,2026-11-30 08:00\n"
    first = _import(tmp_path / "a", _write(tmp_path, text, "a.csv"), mapping_text=mapping)[1].sent[0]
    second = _import(tmp_path / "b", _write(tmp_path, text, "b.csv"), mapping_text=mapping)[1].sent[0]
    event_id = first["envelope"]["event_id"]
    assert event_id == second["envelope"]["event_id"]
    assert first["result_id"] == "R1"
    cells = {"result_id": "R1", "patient_mrn": "M1", "local_code": "K", "value": "4.2", "unit": "mmol/L"}
    digest = content_digest("lab", {**cells, "result_time": "2026-11-30 08:00"})
    assert event_id == event_id_for("csv", "H001", f"R1#{digest[:24]}", 0)
    # another column order, same content: same event
    reordered = "MRN,Id,Code,Value,Unit,Time\nM1,R1,K,4.2,mmol/L,2026-11-30 08:00\n"
    third = _import(tmp_path / "c", _write(tmp_path, reordered, "c.csv"), mapping_text=mapping)[1].sent[0]
    assert third["envelope"]["event_id"] == event_id
    # a corrected value under the same result id is a new event of the same result
    corrected = text.replace("4.2", "4.3")
    fourth = _import(tmp_path / "d", _write(tmp_path, corrected, "d.csv"), mapping_text=mapping)[1].sent[0]
    assert fourth["result_id"] == "R1" and fourth["envelope"]["event_id"] != event_id


def test_without_a_result_id_column_the_id_is_a_digest_of_the_row(tmp_path: Path) -> None:
    text = "MRN,Code,Value,Unit,Time\nM1,K,4.2,mmol/L,2026-11-30 08:00\nM1,K,4.2,mmol/L,2026-11-30 08:00\n"
    summary, publisher, _ = _import(tmp_path, _write(tmp_path, text))
    assert summary.published == 1 and summary.duplicates == 1  # the repeated line is the same event
    record = publisher.sent[0]
    assert record["result_id"].startswith("csv-")
    cells = {"patient_mrn": "M1", "local_code": "K", "value": "4.2", "unit": "mmol/L"}
    digest = content_digest("lab", {**cells, "result_time": "2026-11-30 08:00"})
    assert record["envelope"]["event_id"] == event_id_for("csv", "H001", digest, 0)
    assert record["result_id"] == f"csv-{digest[:20]}"
    assert record["envelope"]["correlation_id"] == record["envelope"]["event_id"]


def test_the_example_ids_are_uuid5_of_the_gateway_namespace(tmp_path: Path) -> None:
    _, publisher, _ = _import(
        tmp_path, DEPLOY / "h001-lab-example.csv", mapping_path=DEPLOY / "h001-lab.toml"
    )
    for record in publisher.sent:
        assert uuid.UUID(record["envelope"]["event_id"]).version == 5


def test_a_rerun_sends_nothing_already_in_the_ledger(tmp_path: Path) -> None:
    first, _, _ = _import(tmp_path, DEPLOY / "h001-lab-example.csv", mapping_path=DEPLOY / "h001-lab.toml")
    assert first.published == 6 and first.already_imported == 0
    again, publisher2, _ = _import(
        tmp_path, DEPLOY / "h001-lab-example.csv", mapping_path=DEPLOY / "h001-lab.toml"
    )
    assert again.published == 0 and again.already_imported == 6 and again.rejected == 2
    assert publisher2.sent == [] and publisher2.batches == 0
    assert "already imported: 6" in again.lines()


def test_failed_publishes_are_not_in_the_ledger_and_a_rerun_sends_them(tmp_path: Path) -> None:
    lines = "".join(f"M{i},K,4.{i},mmol/L,2026-11-30 08:00\n" for i in range(10))
    path = _write(tmp_path, "MRN,Code,Value,Unit,Time\n" + lines)
    down = FakePublisher(fail_from=3)
    summary, _, _ = _import(tmp_path, path, publisher=down, batch_size=4)
    assert summary.published == 3 and summary.not_published == 7
    assert summary.failure == "broker transport failure"
    assert down.batches == 1  # after a failed batch, nothing more is sent
    again, publisher, _ = _import(tmp_path, path, batch_size=4)
    assert again.already_imported == 3 and again.published == 7 and again.not_published == 0
    assert sorted(r["patient_mrn"] for r in publisher.sent) == [f"M{i}" for i in range(3, 10)]


def test_a_batch_refused_whole_is_not_published(tmp_path: Path) -> None:
    from core.exceptions import ServiceUnavailableError

    class Refusing(FakePublisher):
        def publish_many(self, kind: str, records: Sequence[Mapping[str, Any]]) -> list[object]:
            raise ServiceUnavailableError("registry down")

    path = _write(tmp_path, "MRN,Code,Value,Unit,Time\nM1,K,4.2,mmol/L,2026-11-30 08:00\n")
    summary, _, _ = _import(tmp_path, path, publisher=Refusing())
    assert summary.not_published == 1 and "registry down" in (summary.failure or "")


# ---------------------------------------------------------------------------------------------- vitals


def test_vitals_one_measurement_per_row(tmp_path: Path) -> None:
    mapping = (
        'kind = "vitals"\ntime_zone = "Asia/Hong_Kong"\ndate_formats = ["%Y-%m-%d %H:%M"]\n'
        '[columns]\nobservation_id = "Obs"\npatient_mrn = "MRN"\nlocal_code = "Code"\nloinc_code = "LOINC"\n'
        'value = "Value"\nunit = "Unit"\nmeasured_time = "Time"\n'
    )
    path = _write(
        tmp_path,
        "Obs,MRN,Code,LOINC,Value,Unit,Time\n"
        "O1,HC-000001,HR,8867-4,72,/min,2026-11-30 08:00\n"
        "O2,HC-000001,SPO2,59408-5,>99,%,2026-11-30 08:00\n",
    )
    summary, publisher, rejects = _import(tmp_path, path, mapping_text=mapping, institution="C003")
    assert summary.published == 1 and summary.rejected == 1
    measurement = publisher.sent[0]["measurements"][0]
    assert measurement == {"loinc_code": "8867-4", "local_code": "HR", "value": 72.0, "unit": "/min"}
    assert _rejects(rejects)[0]["reject_column"] == "Value"


# ------------------------------------------------------------------------------------------ the command


class ClosingPublisher(FakePublisher):
    def close(self, timeout: float | None = None) -> None:
        return None


def _run_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, publisher: FakePublisher, mapping: Path
) -> Any:
    from typer.testing import CliRunner

    import clinhub.csv_command
    from clinhub.cli import app

    monkeypatch.setenv("CLINHUB_GATEWAY_LEDGER_PATH", str(tmp_path / "gateway-ledger.sqlite3"))
    monkeypatch.setattr(clinhub.csv_command, "make_publisher", lambda *args, **kwargs: publisher)
    export = tmp_path / "h002.csv"
    if not export.exists():
        export.write_bytes((DEPLOY / "h002-lab-example.csv").read_bytes())
    args = ["import", "csv", str(export), "--institution", "H002", "--mapping", str(mapping)]
    return CliRunner().invoke(app, args)


def test_the_command_exits_non_zero_when_rows_were_not_published_and_a_rerun_sends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mapping = DEPLOY / "h002-lab.toml"
    down = _run_command(tmp_path, monkeypatch, ClosingPublisher(fail_from=0), mapping)
    assert down.exit_code == 1, down.output
    assert "not published: 6" in down.output
    assert "6 row(s) were not published (broker transport failure)" in down.output
    assert "run the same command again" in down.output
    assert (tmp_path / "h002.csv.rejects.csv").exists()
    assert (tmp_path / "csv-ledger.sqlite3").exists()  # beside the gateways' ledger

    back = ClosingPublisher()
    up = _run_command(tmp_path, monkeypatch, back, mapping)
    assert up.exit_code == 0, up.output
    assert "published: 6" in up.output and "already imported: 0" in up.output
    assert len(back.sent) == 6

    again = _run_command(tmp_path, monkeypatch, ClosingPublisher(), mapping)
    assert again.exit_code == 0 and "already imported: 6" in again.output and "published: 0" in again.output


def test_the_command_reports_a_mapping_error_by_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text((DEPLOY / "h002-lab.toml").read_text().replace('value = "结果"\n', ""))
    result = _run_command(tmp_path, monkeypatch, ClosingPublisher(), broken)
    # clinhub.cli.main prints a HubError as "error: ..." and exits 2; the app itself lets it through
    assert isinstance(result.exception, MappingError) and result.exception.key == "columns.value"
