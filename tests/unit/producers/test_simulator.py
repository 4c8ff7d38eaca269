"""The traffic simulator: reproducible, valid against the standard, and consistent with the reference data."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from core.national_id import normalise_national_id
from producers.publisher import message_key
from producers.simulator import INSTITUTIONS, simulate_labs
from schemas import standard
from schemas.wire import validate_record
from streams.domain.reference import load_reference
from streams.domain.rules import AlertDraft, LabFacts, evaluate
from tests.factories import normalised

REFERENCE = load_reference()
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
SEEDS = [0, 1, 7, 2026]


def iso7064_mod11_2_ok(number: str) -> bool:
    """ISO 7064 MOD 11-2 by definition (weight 2**(i-1) mod 11 from the right), not the hub's tables."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    values = [int(c) for c in number[:17]] + [10 if number[17] == "X" else int(number[17])]
    return sum(v * pow(2, i, 11) for i, v in enumerate(reversed(values))) % 11 == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_same_seed_same_records(seed: int) -> None:
    """A seed replays the same traffic, so a failing demo or benchmark can be reproduced."""
    assert simulate_labs(seed, 50, now=NOW) == simulate_labs(seed, 50, now=NOW)


def test_different_seeds_differ() -> None:
    """Seeds are not ignored."""
    ids = {tuple(r["envelope"]["event_id"] for r in simulate_labs(seed, 5, now=NOW)) for seed in SEEDS}
    assert len(ids) == len(SEEDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_event_ids_are_unique(seed: int) -> None:
    """The hub de-duplicates on event id, so simulated events must not collide."""
    records = simulate_labs(seed, 300, now=NOW)
    assert len({r["envelope"]["event_id"] for r in records}) == len(records)


@pytest.mark.parametrize("seed", SEEDS)
def test_national_ids_pass_the_checksum(seed: int) -> None:
    """Every synthetic national id is well formed, so linkage across institutions is exercised."""
    nids = {r["patient_national_id"] for r in simulate_labs(seed, 300, patients=40, now=NOW)} - {None}
    assert nids, "the simulator should produce national ids"
    for nid in nids:
        assert iso7064_mod11_2_ok(nid), nid
        assert normalise_national_id(nid) == nid


@pytest.mark.parametrize(
    ("institution", "code", "unit"),
    [(inst.institution_id, test.code, test.unit) for inst in INSTITUTIONS for test in inst.tests],
)
def test_every_simulated_test_maps_and_its_unit_is_accepted(institution: str, code: str, unit: str) -> None:
    """Simulated traffic must not be dead-lettered for reference-data reasons."""
    loinc = REFERENCE.terminology[institution][code]
    assert unit in REFERENCE.analytes[loinc].factors


@pytest.mark.parametrize("seed", SEEDS)
def test_records_match_the_lab_result_schema(seed: int) -> None:
    """What the simulator produces is publishable as is."""
    schema = standard.load(standard.LAB_RESULT)
    for record in simulate_labs(seed, 100, now=NOW):
        validate_record(record, schema)


def _judge(record: dict[str, Any]) -> tuple[AlertDraft, ...]:
    """The alerts the rules raise for a simulated result, for a patient with no earlier results."""
    facts = LabFacts.from_record(normalised("lab", record, NOW))
    assert facts is not None, "simulated results carry a code, value and unit"
    return evaluate(facts, None, REFERENCE.rulebook, NOW, REFERENCE.policy).alerts


@pytest.mark.parametrize("seed", SEEDS)
def test_normal_traffic_raises_no_alerts(seed: int) -> None:
    """Normal ranges lie inside the critical limits, so share 0 gives a quiet stream."""
    assert all(_judge(r) == () for r in simulate_labs(seed, 200, critical_share=0.0, now=NOW))


@pytest.mark.parametrize("seed", SEEDS)
def test_critical_traffic_alerts_where_a_rule_exists(seed: int) -> None:
    """With share 1 every result of an analyte that has a rule crosses its limit."""
    for record in simulate_labs(seed, 200, critical_share=1.0, now=NOW):
        loinc = REFERENCE.terminology[record["envelope"]["institution_id"]][record["local_code"]]
        assert len(_judge(record)) == (1 if loinc in REFERENCE.rulebook.thresholds else 0), record[
            "local_code"
        ]


def test_times_are_in_the_past_and_ordered() -> None:
    """Results arrive in time order and never from the future, so normalisation accepts them."""
    records = simulate_labs(3, 100, now=NOW)
    times = [r["result_time"] for r in records]
    assert times == sorted(times) and times[-1] <= NOW
    assert all(r["specimen_collected_time"] < r["result_time"] for r in records)


def test_message_key_groups_a_patient_per_institution() -> None:
    """One patient at one institution always has the same key, so their events keep their order."""
    records = simulate_labs(5, 300, patients=10, now=NOW)
    keys: dict[tuple[str, str], set[bytes]] = {}
    for r in records:
        keys.setdefault((r["envelope"]["institution_id"], r["patient_mrn"]), set()).add(message_key(r))
    assert all(len(k) == 1 for k in keys.values())
    assert len({next(iter(k)) for k in keys.values()}) == len(keys)  # distinct patients, distinct keys


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("H001", "12345"), ("H002", "12345")),  # same MRN, different hospitals
        (("H001", "12345"), ("H001", "12346")),
    ],
)
def test_message_keys_differ(a: tuple[str, str], b: tuple[str, str]) -> None:
    """Different patients are not forced onto one key."""

    def key(institution: str, mrn: str) -> bytes:
        return message_key({"envelope": {"institution_id": institution}, "patient_mrn": mrn})

    assert isinstance(key(*a), bytes)
    assert key(*a) != key(*b)


def test_results_as_laboratories_write_them_are_publishable_and_each_is_judged_critical() -> None:
    from producers.simulator import results_as_laboratories_write_them

    records = results_as_laboratories_write_them(seed=3, now=NOW)
    assert [r["envelope"]["institution_id"] for r in records] == ["H001", "H002", "C003"]
    schema = standard.load(standard.LAB_RESULT)
    for record in records:
        validate_record(record, schema)
        assert [alert.severity for alert in _judge(record)] == ["CRITICAL"], record["local_code"]
    assert records[0]["value_text"] == "HI" and records[1]["unit"] == "MMOL/L"
    assert records[2]["local_code"] == "2823-3"


def test_produced_time_is_when_the_traffic_is_made_not_the_event_time() -> None:
    """The envelope's produced_time is the producer's, never the (past) event time; a publisher stamps
    it again as it sends."""
    for record in simulate_labs(3, 20, now=NOW):
        envelope = record["envelope"]
        assert envelope["produced_time"] == NOW
        assert envelope["event_time"] < NOW
