"""Realistic, reproducible lab traffic from several institutions, each with its own codes and units.

Not a security context: `random.Random(seed)` is used on purpose so that a seed replays the same traffic.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass
from typing import Any

from streams.identity import NATIONAL_ID_CHECK, NATIONAL_ID_WEIGHTS


@dataclass(frozen=True)
class LocalTest:
    code: str
    display: str
    unit: str
    normal: tuple[float, float]
    critical: tuple[float, float]  # a value range that crosses a critical limit


@dataclass(frozen=True)
class Institution:
    institution_id: str
    name: str
    source_system: str
    mrn_format: str
    tests: tuple[LocalTest, ...]


# Two hospitals that disagree on codes and units, as real ones do.
INSTITUTIONS = (
    Institution(
        "H001",
        "City General Hospital",
        "LIS-Cerner",
        "MRN{:07d}",
        (
            LocalTest("K", "Potassium", "mmol/L", (3.5, 5.1), (6.3, 7.5)),
            LocalTest("NA", "Sodium", "mmol/L", (136, 145), (161, 170)),
            LocalTest("GLU", "Glucose", "mg/dL", (70, 110), (20, 45)),
            LocalTest("HGB", "Hemoglobin", "g/dL", (12.0, 16.0), (4.5, 5.9)),
            LocalTest("CREA", "Creatinine", "mg/dL", (0.6, 1.2), (0.6, 1.2)),
        ),
    ),
    Institution(
        "H002",
        "Riverside University Hospital",
        "LIS-LabWin",
        "{:010d}",
        (
            LocalTest("LAB0101", "钾 Potassium", "mmol/L", (3.5, 5.3), (2.0, 2.8)),
            LocalTest("LAB0102", "钠 Sodium", "mmol/L", (137, 147), (110, 118)),
            LocalTest("LAB0201", "葡萄糖 Glucose", "mmol/L", (3.9, 6.1), (23.0, 30.0)),
            LocalTest("LAB0301", "血红蛋白 Hemoglobin", "g/L", (115, 150), (45, 58)),
            LocalTest("LAB0302", "血小板 Platelets", "10*9/L", (125, 350), (5, 18)),
        ),
    ),
)


def national_id(rng: random.Random) -> str:
    """A synthetic GB 11643 number with a valid check character (not a real person's)."""
    region = rng.choice(["110101", "310104", "440305", "510107"])
    born = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 60))
    body = f"{region}{born:%Y%m%d}{rng.randrange(0, 1000):03d}"
    total = sum(int(d) * w for d, w in zip(body, NATIONAL_ID_WEIGHTS, strict=True))
    return body + NATIONAL_ID_CHECK[total % 11]


@dataclass(frozen=True)
class Patient:
    national_id: str | None
    mrns: dict[str, str]
    birth_year: int
    sex: str


def make_patients(rng: random.Random, count: int) -> list[Patient]:
    patients = []
    for n in range(count):
        nid = national_id(rng) if rng.random() < 0.8 else None
        mrns = {
            inst.institution_id: inst.mrn_format.format(rng.randrange(1, 10**6) * 10 + n % 10)
            for inst in INSTITUTIONS
            if rng.random() < 0.7 or inst is INSTITUTIONS[0]
        }
        patients.append(
            Patient(
                nid,
                mrns,
                int(nid[6:10]) if nid else rng.randrange(1940, 2005),
                rng.choice(["male", "female"]),
            )
        )
    return patients


def lab_record(
    institution: Institution,
    patient: Patient,
    test: LocalTest,
    value: float,
    when: dt.datetime,
    rng: random.Random,
) -> dict[str, Any]:
    event_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    return {
        "envelope": {
            "event_id": str(event_id),
            "institution_id": institution.institution_id,
            "source_system": institution.source_system,
            "source_message_id": f"MSG{rng.randrange(10**9):09d}",
            "event_time": when,
            "produced_time": when,
            "schema_version": "1",
            "correlation_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        },
        "result_id": f"{institution.institution_id}-R{rng.randrange(10**9):09d}",
        "patient_mrn": patient.mrns[institution.institution_id],
        "patient_national_id": patient.national_id,
        "patient_birth_year": patient.birth_year,
        "patient_sex": patient.sex,
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        "local_code": test.code,
        "local_code_system": f"LIS-{institution.institution_id}",
        "local_display": test.display,
        "loinc_code": None,
        "value_numeric": value,
        "value_text": None,
        "unit": test.unit,
        "reference_low": test.normal[0],
        "reference_high": test.normal[1],
        "abnormal_flag": None,
        "status": "final",
        "specimen_collected_time": when - dt.timedelta(minutes=rng.randrange(20, 90)),
        "result_time": when,
        "performing_lab": f"{institution.name} Central Laboratory",
        "ordering_clinician": f"DR{rng.randrange(1000):04d}",
    }


def simulate_labs(
    seed: int, count: int, critical_share: float = 0.1, patients: int = 20, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """`count` lab results spread over the institutions; about `critical_share` of them critical."""
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    population = make_patients(rng, patients)
    records = []
    for n in range(count):
        patient = rng.choice(population)
        institution = rng.choice([i for i in INSTITUTIONS if i.institution_id in patient.mrns])
        test = rng.choice(institution.tests)
        low, high = test.critical if rng.random() < critical_share else test.normal
        value = round(rng.uniform(low, high), 2)
        when = now - dt.timedelta(seconds=(count - n) * 2)
        records.append(lab_record(institution, patient, test, value, when, rng))
    return records
