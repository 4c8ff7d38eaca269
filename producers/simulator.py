"""Realistic, reproducible lab traffic from several institutions, each with its own codes and units.

Not a security context: `random.Random(seed)` is used on purpose so that a seed replays the same traffic.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from core.national_id import check_character


@dataclass(frozen=True)
class LocalTest:
    code: str
    display: str
    unit: str
    normal: tuple[float, float]
    abnormal: tuple[float, float]  # outside the reference range, not critical
    critical: tuple[float, float]  # crosses a critical limit


@dataclass(frozen=True)
class Institution:
    institution_id: str
    name: str
    source_system: str
    time_zone: str
    mrn_format: str
    tests: tuple[LocalTest, ...]
    drugs: tuple[tuple[str, str, float, str, str], ...]  # code, name, dose, dose unit, route


# Hospitals that disagree on codes, units, identifier formats and clocks, as real ones do.
INSTITUTIONS = (
    Institution(
        "H001",
        "City General Hospital",
        "LIS-Cerner",
        "Asia/Shanghai",
        "MRN{:07d}",
        (
            LocalTest("K", "Potassium", "mmol/L", (3.5, 5.1), (5.3, 5.9), (6.3, 7.5)),
            LocalTest("NA", "Sodium", "mmol/L", (136, 145), (146, 155), (161, 170)),
            LocalTest("GLU", "Glucose", "mg/dL", (70, 110), (130, 250), (20, 45)),
            LocalTest("HGB", "Hemoglobin", "g/dL", (12.0, 16.0), (8.0, 11.0), (4.5, 5.9)),
            LocalTest("CREA", "Creatinine", "mg/dL", (0.6, 1.2), (1.5, 3.0), (1.5, 3.0)),
        ),
        (
            ("AMOX500", "Amoxicillin 500 mg cap", 500, "mg", "PO"),
            ("KCL20", "Potassium chloride", 20, "mmol", "IV"),
        ),
    ),
    Institution(
        "H002",
        "Riverside University Hospital",
        "LIS-LabWin",
        "Asia/Urumqi",
        "{:010d}",
        (
            LocalTest("LAB0101", "钾 Potassium", "mmol/L", (3.5, 5.3), (3.1, 3.4), (2.0, 2.8)),
            LocalTest("LAB0102", "钠 Sodium", "mmol/L", (137, 147), (125, 135), (110, 118)),
            LocalTest("LAB0201", "葡萄糖 Glucose", "mmol/L", (3.9, 6.1), (7.5, 15.0), (23.0, 30.0)),
            LocalTest("LAB0301", "血红蛋白 Hemoglobin", "g/L", (115, 150), (80, 110), (45, 58)),
            LocalTest("LAB0302", "血小板 Platelets", "10*9/L", (125, 350), (50, 100), (5, 18)),
        ),
        (("X0001", "阿莫西林胶囊", 0.5, "g", "PO"), ("X0417", "呋塞米注射液", 20, "mg", "IV")),
    ),
    Institution(
        "C003",
        "Harbour Community Clinic",
        "EMR-OpenMRS",
        "Asia/Hong_Kong",
        "HC-{:06d}",
        (
            LocalTest("K+", "Potassium, serum", "meq/L", (3.5, 5.0), (5.2, 5.8), (6.4, 7.2)),
            LocalTest("GLUC", "Glucose, fasting", "mg/dL", (70, 99), (100, 180), (450, 600)),
        ),
        (("MET850", "Metformin 850 mg tab", 850, "mg", "PO"),),
    ),
)

KIND_WEIGHTS = {"lab": 0.5, "vitals": 0.2, "encounter": 0.1, "medication": 0.12, "diagnosis": 0.08}
VITALS = (
    ("8867-4", "HR", (55, 100), "/min"),
    ("8480-6", "SBP", (100, 140), "mm[Hg]"),
    ("8462-4", "DBP", (60, 90), "mm[Hg]"),
    ("59408-5", "SPO2", (93, 100), "%"),
    ("8310-5", "TEMP", (36.2, 37.6), "Cel"),
    ("9279-1", "RR", (12, 20), "/min"),
)
DIAGNOSES = (
    ("E87.5", "Hyperkalaemia"),
    ("E87.1", "Hyponatraemia"),
    ("E11.9", "Type 2 diabetes"),
    ("D64.9", "Anaemia"),
    ("N18.3", "Chronic kidney disease, stage 3"),
    ("I10", "Hypertension"),
)
WARDS = ("ICU", "CCU", "MED-3", "SURG-2", "ED")


def national_id(rng: random.Random) -> str:
    """A synthetic GB 11643 number with a valid check character (not a real person's)."""
    region = rng.choice(["110101", "310104", "440305", "510107"])
    born = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 60))
    body = f"{region}{born:%Y%m%d}{rng.randrange(0, 1000):03d}"
    return body + check_character(body)


@dataclass(frozen=True)
class Patient:
    national_id: str | None
    mrns: dict[str, str]
    birth_year: int
    sex: str


def make_patients(rng: random.Random, count: int) -> list[Patient]:
    """Patients known at one or more institutions; most carry a national id that links them."""
    patients = []
    for n in range(count):
        nid = national_id(rng) if rng.random() < 0.8 else None
        mrns = {
            inst.institution_id: inst.mrn_format.format(rng.randrange(1, 10**5) * 10 + n % 10)
            for inst in INSTITUTIONS
            if rng.random() < 0.6 or inst is INSTITUTIONS[n % len(INSTITUTIONS)]
        }
        birth_year = int(nid[6:10]) if nid else rng.randrange(1940, 2005)
        patients.append(Patient(nid, mrns, birth_year, rng.choice(["male", "female"])))
    return patients


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _envelope(institution: Institution, when: dt.datetime, rng: random.Random) -> dict[str, Any]:
    return {
        "event_id": _uuid(rng),
        "institution_id": institution.institution_id,
        "source_system": institution.source_system,
        "source_message_id": f"MSG{rng.randrange(10**9):09d}",
        "event_time": when,
        "produced_time": when,
        "schema_version": "1",
        "correlation_id": _uuid(rng),
    }


def _patient_fields(institution: Institution, patient: Patient) -> dict[str, Any]:
    return {
        "patient_mrn": patient.mrns[institution.institution_id],
        "patient_national_id": patient.national_id,
        "patient_birth_year": patient.birth_year,
        "patient_sex": patient.sex,
    }


def lab_record(
    institution: Institution,
    patient: Patient,
    test: LocalTest,
    value: float,
    when: dt.datetime,
    rng: random.Random,
) -> dict[str, Any]:
    return {
        "envelope": _envelope(institution, when, rng),
        "result_id": f"{institution.institution_id}-R{rng.randrange(10**9):09d}",
        **_patient_fields(institution, patient),
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        "local_code": test.code,
        "local_code_system": f"LIS-{institution.institution_id}",
        "local_display": test.display,
        "loinc_code": None,
        "value_numeric": value,
        "value_comparator": None,
        "value_text": None,
        "unit": test.unit,
        "reference_low": test.normal[0],
        "reference_high": test.normal[1],
        "abnormal_flag": None
        if test.normal[0] <= value <= test.normal[1]
        else ("L" if value < test.normal[0] else "H"),
        "status": "final",
        "specimen_collected_time": when - dt.timedelta(minutes=rng.randrange(20, 90)),
        "result_time": when,
        "performing_lab": f"{institution.name} Central Laboratory",
        "ordering_clinician": f"DR{rng.randrange(1000):04d}",
    }


def _vitals_record(
    institution: Institution, patient: Patient, when: dt.datetime, rng: random.Random
) -> dict[str, Any]:
    chosen = rng.sample(VITALS, k=rng.randrange(2, len(VITALS) + 1))
    return {
        "envelope": _envelope(institution, when, rng),
        "observation_id": f"{institution.institution_id}-VS{rng.randrange(10**9):09d}",
        **_patient_fields(institution, patient),
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        "measured_time": when,
        "device_id": rng.choice([None, f"MON-{rng.randrange(100):03d}"]),
        "status": "final",
        "measurements": [
            {"loinc_code": loinc, "local_code": code, "value": round(rng.uniform(*span), 1), "unit": unit}
            for loinc, code, span, unit in chosen
        ],
    }


def _encounter_record(
    institution: Institution, patient: Patient, when: dt.datetime, rng: random.Random
) -> dict[str, Any]:
    event_type = rng.choice(["ADMIT", "TRANSFER", "DISCHARGE", "REGISTER"])
    ward = rng.choice(WARDS)
    return {
        "envelope": _envelope(institution, when, rng),
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        **_patient_fields(institution, patient),
        "event_type": event_type,
        "encounter_class": "EMERGENCY" if ward == "ED" else "INPATIENT",
        "ward": ward,
        "bed": f"{ward}-{rng.randrange(1, 40):02d}",
        "prior_ward": rng.choice(WARDS) if event_type == "TRANSFER" else None,
        "prior_bed": None,
        "attending_clinician": f"DR{rng.randrange(1000):04d}",
        "occurred_time": when,
        "admit_time": when if event_type == "ADMIT" else None,
        "discharge_time": when if event_type == "DISCHARGE" else None,
    }


def _medication_record(
    institution: Institution, patient: Patient, when: dt.datetime, rng: random.Random
) -> dict[str, Any]:
    code, name, dose, unit, route = rng.choice(institution.drugs)
    return {
        "envelope": _envelope(institution, when, rng),
        "order_id": f"{institution.institution_id}-O{rng.randrange(10**9):09d}",
        **_patient_fields(institution, patient),
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        "drug_code": code,
        "drug_code_system": f"FORMULARY-{institution.institution_id}",
        "drug_display": name,
        "regional_drug_code": None,
        "dose_value": float(dose),
        "dose_unit": unit,
        "route": route,
        "frequency": rng.choice(["QD", "BID", "TID", "q8h", "STAT"]),
        "status": "ACTIVE",
        "ordered_time": when,
        "start_time": when,
        "end_time": None,
        "prescriber": f"DR{rng.randrange(1000):04d}",
    }


def _diagnosis_record(
    institution: Institution, patient: Patient, when: dt.datetime, rng: random.Random
) -> dict[str, Any]:
    code, display = rng.choice(DIAGNOSES)
    return {
        "envelope": _envelope(institution, when, rng),
        "diagnosis_id": f"{institution.institution_id}-D{rng.randrange(10**9):09d}",
        **_patient_fields(institution, patient),
        "encounter_id": f"V{rng.randrange(10**6):06d}",
        "icd10_code": code,
        "code_system": "ICD-10-CN" if institution.institution_id == "H002" else "ICD-10",
        "display": display,
        "kind": rng.choice(["ADMISSION", "DISCHARGE", "PRINCIPAL", "SECONDARY"]),
        "recorded_time": when,
        "clinician": f"DR{rng.randrange(1000):04d}",
    }


def simulate_events(
    seed: int,
    count: int,
    critical_share: float = 0.1,
    abnormal_share: float = 0.2,
    patients: int = 20,
    now: dt.datetime | None = None,
    kinds: dict[str, float] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """`count` (kind, record) pairs across institutions; the same seed gives the same traffic.

    Times are aware datetimes on each institution's own clock (its time zone); the Avro encoder
    stores them as UTC instants. Event times lie in the past, two seconds apart up to `now`; each
    envelope's `produced_time` is `now`, to be stamped again when the event is really published
    (`producers.pacing.publish_paced` does).
    """
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    population = make_patients(rng, patients)
    weights = kinds or KIND_WEIGHTS
    events: list[tuple[str, dict[str, Any]]] = []
    for n in range(count):
        patient = rng.choice(population)
        institution = rng.choice([i for i in INSTITUTIONS if i.institution_id in patient.mrns])
        when = (now - dt.timedelta(seconds=(count - n) * 2)).astimezone(ZoneInfo(institution.time_zone))
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        if kind == "lab":
            test = rng.choice(institution.tests)
            draw = rng.random()
            span = (
                test.critical
                if draw < critical_share
                else (test.abnormal if draw < critical_share + abnormal_share else test.normal)
            )
            record = lab_record(institution, patient, test, round(rng.uniform(*span), 2), when, rng)
        elif kind == "vitals":
            record = _vitals_record(institution, patient, when, rng)
        elif kind == "encounter":
            record = _encounter_record(institution, patient, when, rng)
        elif kind == "medication":
            record = _medication_record(institution, patient, when, rng)
        else:
            record = _diagnosis_record(institution, patient, when, rng)
        record["envelope"]["produced_time"] = now  # made now; a publisher stamps it again as it sends
        events.append((kind, record))
    return events


def simulate_labs(
    seed: int, count: int, critical_share: float = 0.1, patients: int = 20, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Lab results only, about `critical_share` of them critical."""
    events = simulate_events(seed, count, critical_share, patients=patients, now=now, kinds={"lab": 1.0})
    return [record for _, record in events]


def results_as_laboratories_write_them(seed: int, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Three critical lab results in the shapes real feeds send, one per institution, for the demo:

    - H001: a glucose above its analyser's measuring range, sent as the flag "HI" (no number; the
      institution's configuration says HI means more than 600 mg/dL);
    - H002: a sodium of 108 with its unit in capitals, "MMOL/L", as HL7 v2 feeds write units;
    - C003: a potassium of 6.9 whose local code is its LOINC code, 2823-3.
    """
    rng = random.Random(seed)
    now = now or dt.datetime.now(dt.UTC)
    by_id = {institution.institution_id: institution for institution in INSTITUTIONS}
    tests = {(i.institution_id, t.code): t for i in INSTITUTIONS for t in i.tests}
    written: list[tuple[str, str, dict[str, Any]]] = [
        ("H001", "GLU", {"value_numeric": None, "value_text": "HI", "unit": None}),
        ("H002", "LAB0102", {"value_numeric": 108.0, "unit": "MMOL/L"}),
        ("C003", "K+", {"value_numeric": 6.9, "local_code": "2823-3", "local_display": "Potassium"}),
    ]
    records = []
    for n, (institution_id, code, shape) in enumerate(written):
        institution = by_id[institution_id]
        patient = make_patients(rng, 1)[0]
        patient = Patient(
            patient.national_id, {institution_id: institution.mrn_format.format(900 + n)}, 1950, "female"
        )
        when = (now - dt.timedelta(seconds=3 - n)).astimezone(ZoneInfo(institution.time_zone))
        test = tests[(institution_id, code)]
        record = lab_record(institution, patient, test, test.critical[0], when, rng)
        record.update(shape)
        record["abnormal_flag"] = None
        records.append(record)
    return records
