"""No critical result left silent: a dead-lettered lab result for an analyte with critical limits is
marked possibly critical (with its LOINC code), counted by institution and logged as such."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder, validate_record
from streams.domain.reference import load_reference
from streams.runtime.messages import RawMessage, Rejection, dead_letter_record
from streams.runtime.normaliser import NormaliserHandler, RejectedAnalyte, rejected_analyte
from streams.runtime.outputs import Output
from tests.factories import lab_record
from tests.unit.streams.runtime.test_app import NOW, make_components, stage_of

REFERENCE = load_reference()
POTASSIUM, CREATININE = "2823-3", "2160-0"
MRN = "MRN-SECRET-77"
KEY = f"H001|{MRN}".encode()


def lab(institution: str = "H001", code: str = "K", **fields: Any) -> dict[str, Any]:
    return lab_record(institution, code, 4.2, "mmol/L", mrn=MRN, at=NOW - dt.timedelta(minutes=5), **fields)


def test_the_reference_data_gives_potassium_critical_limits_and_creatinine_none() -> None:
    """What the table below relies on: creatinine has a delta check but no critical limits."""
    assert REFERENCE.rulebook.thresholds.get(POTASSIUM)
    assert not REFERENCE.rulebook.thresholds.get(CREATININE)
    assert REFERENCE.terminology["H001"]["K"] == POTASSIUM
    assert "K" not in REFERENCE.terminology["H002"]


@pytest.mark.parametrize(
    ("kind", "record", "institution", "expected"),
    [
        pytest.param("lab", lab(), "H001", RejectedAnalyte(POTASSIUM, True), id="mapped-code-with-limits"),
        pytest.param(
            "lab", lab(code=" K "), "H001", RejectedAnalyte(POTASSIUM, True), id="code-as-sent-padded"
        ),
        pytest.param("lab", lab("C003", "K+"), "C003", RejectedAnalyte(POTASSIUM, True), id="other-map"),
        pytest.param(
            "lab",
            lab(code="XYZ", loinc_code=POTASSIUM),
            "H001",
            RejectedAnalyte(POTASSIUM, True),
            id="explicit-loinc-with-limits",
        ),
        pytest.param(
            "lab",
            lab(code="CREA", loinc_code=POTASSIUM),
            "H001",
            RejectedAnalyte(POTASSIUM, True),
            id="explicit-loinc-wins-over-map",
        ),
        pytest.param("lab", lab(code="XYZ"), "H001", RejectedAnalyte(None, False), id="unmapped-code"),
        pytest.param(
            "lab", lab("H001", "K"), "H002", RejectedAnalyte(None, False), id="code-of-another-institution"
        ),
        pytest.param("lab", lab(code="K"), None, RejectedAnalyte(None, False), id="no-institution"),
        pytest.param(
            "lab", lab(code="CREA"), "H001", RejectedAnalyte(CREATININE, False), id="analyte-without-limits"
        ),
        pytest.param(
            "lab",
            lab(code="XYZ", loinc_code="99999-9"),
            "H001",
            RejectedAnalyte("99999-9", False),
            id="explicit-unknown-loinc",
        ),
        pytest.param(
            "lab", lab(status="cancelled"), "H001", RejectedAnalyte(POTASSIUM, False), id="cancelled-result"
        ),
        pytest.param("lab", None, "H001", RejectedAnalyte(None, False), id="undecodable"),
        pytest.param(
            "vitals",
            {"measurements": [{"local_code": "K", "loinc_code": POTASSIUM}], "local_code": "K"},
            "H001",
            RejectedAnalyte(None, False),
            id="not-a-lab-result",
        ),
        pytest.param(None, lab(), "H001", RejectedAnalyte(None, False), id="not-a-raw-topic"),
    ],
)
def test_a_rejected_lab_result_is_possibly_critical_when_its_analyte_has_critical_limits(
    kind: str | None, record: dict[str, Any] | None, institution: str | None, expected: RejectedAnalyte
) -> None:
    assert rejected_analyte(kind, record, institution, REFERENCE) == expected


def test_the_dead_letter_carries_the_flag_and_the_loinc_code() -> None:
    message = RawMessage("raw.H001.lab", 0, 5, key=KEY, value=b"\x00abc")
    flagged = Rejection(message, "UnknownUnitError", "unit", "unit 'x'", "H001", None, True, POTASSIUM)
    record = dead_letter_record(flagged, "streams.normaliser", NOW)
    validate_record(record, standard.load(standard.DEAD_LETTER))
    assert (record["possibly_critical"], record["loinc_code"]) == (True, POTASSIUM)
    plain = dead_letter_record(Rejection(message, "MagicByteError", None, "bad"), "p", NOW)
    assert (plain["possibly_critical"], plain["loinc_code"]) == (False, None)


def test_the_normaliser_publishes_counts_and_logs_a_possibly_critical_dead_letter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = ConfluentRegistry({"url": f"mock://possibly-critical-{uuid.uuid4().hex}"})
    components = make_components(registry)
    published: list[Output] = []

    async def capture(outputs: Sequence[Output]) -> None:
        published.extend(outputs)

    encode = make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)
    batch = [
        RawMessage("raw.H001.lab", 2, 10, KEY, encode(lab(unit="furlongs"))),  # K, unknown unit
        RawMessage("raw.H001.lab", 2, 11, KEY, encode(lab(code="CREA", unit="furlongs"))),  # no limits
        RawMessage("raw.H001.lab", 2, 12, KEY, b"\x01junk"),  # undecodable
        RawMessage("raw.H001.lab", 2, 13, KEY, encode(lab())),  # a good potassium
    ]
    handler = NormaliserHandler(stage_of("normaliser", components, capture), {})

    with caplog.at_level(logging.WARNING, logger="clinhub.streams"):
        asyncio.run(handler.handle(batch))

    decode = components.codecs.decoders["deadletter"]
    letters = {
        letter["original_offset"]: letter
        for letter in (decode(o.value) for o in published if o.topic == "deadletter")
    }
    assert sorted(letters) == [10, 11, 12]
    assert (letters[10]["possibly_critical"], letters[10]["loinc_code"]) == (True, POTASSIUM)
    assert letters[10]["institution_id"] == "H001" and letters[10]["field"] == "unit"
    assert (letters[11]["possibly_critical"], letters[11]["loinc_code"]) == (False, CREATININE)
    assert (letters[12]["possibly_critical"], letters[12]["loinc_code"]) == (False, None)
    assert [o.topic for o in published].count("norm.lab") == 1

    unjudged = components.metrics.unjudged_results
    assert unjudged.labels(institution="H001")._value.get() == 1

    (line,) = [r.getMessage() for r in caplog.records if "POSSIBLY CRITICAL" in r.getMessage()]
    assert "H001" in line and "raw.H001.lab[2]@10" in line and POTASSIUM in line
    assert "furlongs" in line, "the reason"
    assert MRN not in line and KEY.decode() not in line


def test_no_possibly_critical_dead_letter_counts_nothing() -> None:
    components = make_components(ConfluentRegistry({"url": f"mock://not-critical-{uuid.uuid4().hex}"}))

    async def capture(_outputs: Sequence[Output]) -> None:
        return None

    handler = NormaliserHandler(stage_of("normaliser", components, capture), {})
    asyncio.run(handler.handle([RawMessage("raw.H001.lab", 0, 0, KEY, b"\x01junk")]))
    assert components.metrics.rejects.labels(kind="raw", reason="MagicByteError")._value.get() == 1
    assert not any(
        sample.value
        for metric in components.metrics.unjudged_results.collect()
        for sample in metric.samples
        if sample.name == "clinhub_unjudged_results_total"
    )
