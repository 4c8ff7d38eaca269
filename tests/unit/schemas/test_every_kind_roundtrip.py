"""Every event kind of the standard survives encode -> decode, including awkward but legal values."""

from __future__ import annotations

import copy
import datetime as dt
import math
import uuid
from typing import Any

import pytest

from producers.simulator import simulate_events
from schemas import standard
from schemas.wire import AvroDecoder, ConfluentRegistry, make_encoder

EVENTS = simulate_events(seed=2026, count=400)
BY_KIND = {kind: [record for k, record in EVENTS if k == kind] for kind in standard.KIND_SCHEMAS}
OPTIONAL_STRINGS = {
    "lab": "local_display",
    "vitals": "device_id",
    "encounter": "ward",
    "medication": "drug_display",
    "diagnosis": "display",
}
EXTREME_DOUBLES = [0.0, -0.0, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308, math.inf]


def _roundtrip(kind: str, record: dict[str, Any]) -> dict[str, Any]:
    schema = standard.load(standard.KIND_SCHEMAS[kind])
    registry = ConfluentRegistry({"url": f"mock://roundtrip-{kind}"})
    return AvroDecoder(registry, schema)(make_encoder(registry, schema)(record))


def _comparable(value: Any) -> Any:
    """Decoded values are UTC datetimes and UUIDs; compare them as instants and strings."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).replace(microsecond=value.microsecond // 1000 * 1000)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _as_sent(decoded: dict[str, Any], record: dict[str, Any]) -> Any:
    """The decoded record, restricted to the fields the producer set (the reader fills the rest)."""
    return _comparable({key: decoded[key] for key in record})


def test_the_simulator_produces_every_kind() -> None:
    assert all(BY_KIND[kind] for kind in standard.KIND_SCHEMAS), {k: len(v) for k, v in BY_KIND.items()}


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_representative_records_roundtrip(kind: str) -> None:
    for record in BY_KIND[kind][:10]:
        assert _as_sent(_roundtrip(kind, record), record) == _comparable(record)


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_optional_fields_set_to_null_roundtrip(kind: str) -> None:
    record = copy.deepcopy(BY_KIND[kind][0])
    record["patient_national_id"] = None
    record["patient_birth_year"] = None
    record["envelope"]["source_message_id"] = None
    record[OPTIONAL_STRINGS[kind]] = None
    decoded = _roundtrip(kind, record)
    assert decoded["patient_national_id"] is None
    assert decoded[OPTIONAL_STRINGS[kind]] is None
    assert _as_sent(decoded, record) == _comparable(record)


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_chinese_text_roundtrips(kind: str) -> None:
    record = copy.deepcopy(BY_KIND[kind][0])
    record[OPTIONAL_STRINGS[kind]] = "张伟 急诊科 钾离子 𠀋"  # includes a character outside the BMP
    record["envelope"]["source_system"] = "检验信息系统 LIS"
    assert _roundtrip(kind, record)[OPTIONAL_STRINGS[kind]] == "张伟 急诊科 钾离子 𠀋"


@pytest.mark.parametrize("extreme", EXTREME_DOUBLES)
def test_extreme_numbers_roundtrip_exactly(extreme: float) -> None:
    lab = copy.deepcopy(BY_KIND["lab"][0])
    lab["value_numeric"] = extreme
    vitals = copy.deepcopy(BY_KIND["vitals"][0])
    vitals["measurements"][0]["value"] = extreme
    medication = copy.deepcopy(BY_KIND["medication"][0])
    medication["dose_value"] = extreme
    got = [
        _roundtrip("lab", lab)["value_numeric"],
        _roundtrip("vitals", vitals)["measurements"][0]["value"],
        _roundtrip("medication", medication)["dose_value"],
    ]
    assert all(math.copysign(1, g) == math.copysign(1, extreme) and g == extreme for g in got)


def test_not_a_number_survives_as_not_a_number() -> None:
    lab = copy.deepcopy(BY_KIND["lab"][0])
    lab["value_numeric"] = math.nan
    assert math.isnan(_roundtrip("lab", lab)["value_numeric"])


def test_times_keep_their_instant_across_time_zones() -> None:
    """Institutions send their own local clock; the standard stores the same instant in UTC."""
    record = copy.deepcopy(BY_KIND["encounter"][0])
    local = dt.datetime(2026, 3, 1, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    record["occurred_time"] = local
    decoded = _roundtrip("encounter", record)["occurred_time"]
    assert decoded == local
    assert decoded.utcoffset() == dt.timedelta(0)
    assert decoded.hour == 0
