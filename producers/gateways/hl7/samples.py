"""Realistic HL7 v2 messages as the region's institutions send them, for tests, the demo and the
benchmark: one function per message kind, returning the bytes on the wire (without MLLP framing),
parameterised by institution, MRN, control id, value and time. Local codes are each institution's own
(streams/data/terminology.json: H001 K, NA, GLU; H002 LAB0101, LAB0201; C003 K+, GLUC).

`oru_gb18030` is written in GB 18030 with a patient name, a ward and a test name whose GBK bytes have `|`
(0x7C) or `^` (0x5E) as their second byte (`gbk_trap_characters` finds them): a receiver that splits raw bytes
corrupts them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

DEFAULT_TIME = dt.datetime(2026, 11, 23, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))


@dataclass(frozen=True)
class LocalCodes:
    potassium: tuple[str, str, str]  # code, display, unit
    glucose: tuple[str, str, str]
    sodium: tuple[str, str, str]
    system: str
    application: str


CODES = {
    "H001": LocalCodes(
        ("K", "Potassium", "mmol/L"),
        ("GLU", "Glucose", "mg/dL"),
        ("NA", "Sodium", "mmol/L"),
        "L",
        "LIS-Cerner",
    ),
    "H002": LocalCodes(
        ("LAB0101", "钾 Potassium", "mmol/L"),
        ("LAB0201", "葡萄糖 Glucose", "mmol/L"),
        ("LAB0102", "钠 Sodium", "mmol/L"),
        "99LIS",
        "LIS-LabWin",
    ),
    "C003": LocalCodes(
        ("K+", "Potassium, serum", "meq/L"),
        ("GLUC", "Glucose, fasting", "mg/dL"),
        ("K+", "Potassium, serum", "meq/L"),
        "L",
        "EMR-OpenMRS",
    ),
}


def gbk_trap_characters(second_byte: int) -> list[str]:
    """CJK characters whose GBK (and GB 18030) encoding is two bytes, the second being `second_byte`."""
    found = []
    for point in range(0x4E00, 0xA000):
        try:
            encoded = chr(point).encode("gbk")
        except UnicodeEncodeError:
            continue
        if len(encoded) == 2 and encoded[1] == second_byte:
            found.append(chr(point))
    return found


# 東 is 0x96 0x7C ("|"), 區 is 0x85 0x5E ("^") in GBK: an east-district ward, as a Hong Kong or Taiwan
# style name a GB 18030 system still carries
TRAP_WARD = "東區病房"
TRAP_DISPLAY = "钾 Potassium(東區急診)"
# A Cantonese patient (Au Wai Tung) as a GB 18030 system writes the name: 區 (the surname) is 0x85 0x5E
# ("^"), 瑋 0xAC 0x7C and 東 0x96 0x7C ("|") in GBK
TRAP_FAMILY_NAME = "區"
TRAP_GIVEN_NAME = "瑋東"


def ts(at: dt.datetime, offset: bool = True) -> str:
    """HL7 TS: YYYYMMDDHHMMSS, with +ZZZZ when the time is aware and `offset`."""
    text = at.strftime("%Y%m%d%H%M%S")
    return text + at.strftime("%z") if offset and at.tzinfo is not None else text


def _codes(institution: str) -> LocalCodes:
    return CODES.get(institution, CODES["H001"])


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment from its fields by number (the others empty)."""
    values = [""] * max(fields)
    for number, value in fields.items():
        values[number - 1] = value
    return "|".join([name, *values])


def _finish(segments: list[str], encoding: str = "utf-8", terminator: str = "\r") -> bytes:
    return (terminator.join(segments) + terminator).encode(encoding)


def _msh(
    institution: str, message_type: str, control_id: str, at: dt.datetime, version: str, charset: str
) -> str:
    return (
        f"MSH|^~\\&|{_codes(institution).application}|{institution}|CLINHUB|REGION|{ts(at)}||{message_type}|"
        f"{control_id}|P|{version}|||AL|NE|CHN|{charset}"
    )


def _pid(
    institution: str, mrn: str, national_id: str | None = "11010519491231002X", name: str = "WANG^Li^^^^^L"
) -> str:
    national = f"~{national_id}^^^CHN^NNCHN" if national_id else ""
    return f"PID|1||{mrn}^^^{institution}^MR{national}||{name}||19600314|F|||1 Harbour Rd^^Shanghai"


def oru_r01(
    institution: str = "H001",
    mrn: str = "MRN0000001",
    control_id: str = "ORU0001",
    potassium: str = "6.8",
    at: dt.datetime = DEFAULT_TIME,
) -> bytes:
    """ORU^R01 v2.5.1, UTF-8: one chemistry OBR with NM potassium (flag HH, range 3.5-5.1), SN glucose
    `>^600` (flag H, measuring range exceeded), NM sodium, ST creatinine `5.2 (H)` with an escaped
    comment in a second ST OBX (`\\T\\`, `\\F\\`, `\\S\\`), a CE urine protein `POS^Positive^L`;
    a second OBR, a vitals panel: HR and SBP (NM); and a DG1."""
    c = _codes(institution)
    when, collected = ts(at), ts(at - dt.timedelta(minutes=40))
    k, glu, na = c.potassium, c.glucose, c.sodium
    return _finish(
        [
            _msh(institution, "ORU^R01^ORU_R01", control_id, at, "2.5.1", "UNICODE UTF-8"),
            _pid(institution, mrn),
            segment("PV1", {1: "1", 2: "I", 3: "ICU^12^3^^^N", 7: "D1234^ZHANG^Wei", 19: "E20261123001"}),
            f"ORC|RE|PL7001|FL7001||CM||||{when}",
            segment(
                "OBR",
                {
                    1: "1",
                    2: "PL7001",
                    3: "FL7001",
                    4: "CHEM^Chemistry panel^L",
                    7: collected,
                    16: "D1234^ZHANG^Wei",
                    22: when,
                    25: "F",
                },
            ),
            f"OBX|1|NM|{k[0]}^{k[1]}^{c.system}||{potassium}|{k[2]}|3.5-5.1|HH|||F|||{collected}|||||{when}",
            f"OBX|2|SN|{glu[0]}^{glu[1]}^{c.system}||>^600|{glu[2]}|70-110|H|||F|||{collected}",
            f"OBX|3|NM|{na[0]}^{na[1]}^{c.system}||140.0|{na[2]}|136 - 145|N|||F",
            "OBX|4|ST|CREA^Creatinine^L||5.2 (H)|mg/dL|0.6-1.2|H|||F",
            "OBX|5|ST|COMMENT^Comment^L||haemolysed\\T\\repeat \\F\\ see \\S\\ lab||||||F",
            "OBX|6|CE|UPRO^Urine protein^L||POS^Positive^L||NEG|A|||F",
            f"OBR|2|PL7002|FL7002|VITALS^Vital signs^L|||{when}|||||||||||||||{when}|||F",
            f"OBX|1|NM|HR^Heart rate^L||128|/min|60-100|H|||F|||{when}||||MON-ICU-12",
            f"OBX|2|NM|8480-6^Systolic blood pressure^LN||85|mm[Hg]|90-140|L|||F|||{when}",
            f"DG1|1||E87.5^Hyperkalaemia^I10||{when}|W",
        ]
    )


def oru_r01_v23(
    institution: str = "C003",
    mrn: str = "HC-000042",
    control_id: str = "C3-0001",
    potassium: str = "7.1",
    at: dt.datetime = DEFAULT_TIME,
    terminator: str = "\r\n",
) -> bytes:
    """ORU^R01 v2.3, ASCII (empty MSH-18), segments ended by CR LF: times without offset (the clinic's
    clock), no ORC, repeated OBX (K+ NM with a corrected status, GLUC NM preliminary), an OBX without
    OBR-22, the unit only as CE text."""
    c = _codes(institution)
    local = ts(at, offset=False)
    return _finish(
        [
            f"MSH|^~\\&|{c.application}|{institution}|CLINHUB|REGION|{local}||ORU^R01|{control_id}|P|2.3",
            f"PID|1||{mrn}||CHAN^Tai Man||1975|M",
            f"OBR|1||C3F-0001|BMP^Basic metabolic^L|||{local}",
            f"OBX|1|NM|{c.potassium[0]}^{c.potassium[1]}^L||{potassium}|^{c.potassium[2]}|3.5-5.0|HH|||C",
            f"OBX|2|NM|{c.glucose[0]}^{c.glucose[1]}^L||95|{c.glucose[2]}|70-99|N|||P",
        ],
        encoding="ascii",
        terminator=terminator,
    )


def adt(
    trigger: str = "A01",
    institution: str = "H001",
    mrn: str = "MRN0000001",
    control_id: str = "ADT0001",
    encounter_id: str = "E20261123001",
    at: dt.datetime = DEFAULT_TIME,
    version: str = "2.5",
) -> bytes:
    """ADT^A01 (admit, two DG1), A02 (transfer ICU -> CCU, PV1-6 the prior location), A03 (discharge,
    PV1-45 and a final DG1), A04, A08 (update); UTF-8."""
    when = ts(at)
    ward, bed, prior = ("CCU", "4", "ICU^12^3") if trigger == "A02" else ("ICU", "3", "")
    pv1_44 = ts(at - dt.timedelta(days=2))
    pv1_45 = when if trigger == "A03" else ""
    segments = [
        _msh(institution, f"ADT^{trigger}^ADT_A01", control_id, at, version, "UNICODE UTF-8"),
        f"EVN|{trigger}|{when}||||{when}",
        _pid(institution, mrn),
        segment(
            "PV1",
            {
                1: "1",
                2: "I",
                3: f"{ward}^12^{bed}^^^N",
                6: prior,
                7: "D1234^ZHANG^Wei",
                10: "MED",
                19: encounter_id,
                44: pv1_44,
                45: pv1_45,
            },
        ),
    ]
    if trigger == "A01":
        segments += [
            f"DG1|1||E87.5^Hyperkalaemia^I10||{when}|A",
            f"DG1|2||N18.3^Chronic kidney disease, stage 3^I10||{when}|A",
        ]
    elif trigger == "A03":
        segments += [
            segment("DG1", {1: "1", 3: "E87.5^Hyperkalaemia^I10", 5: when, 6: "F", 15: "1", 16: "D1234"})
        ]
    elif trigger == "A08":
        segments += [f"DG1|1||I10^Hypertension^I10||{when}|W"]
    return _finish(segments)


def rde_o11(
    institution: str = "H001",
    mrn: str = "MRN0000001",
    control_id: str = "RDE0001",
    dose: str = "20",
    at: dt.datetime = DEFAULT_TIME,
) -> bytes:
    """RDE^O11 v2.5: a new order of potassium chloride 20 mmol IV q8h (RXE with its TQ in RXE-1: start and
    end, RXR) and a discontinued amoxicillin order: two ORC groups."""
    # ordered two hours before `at`, given from one hour before until `at` (no future times: the
    # normaliser refuses instants in the future)
    when, start, end = ts(at - dt.timedelta(hours=2)), ts(at - dt.timedelta(hours=1)), ts(at)
    return _finish(
        [
            _msh(institution, "RDE^O11^RDE_O11", control_id, at, "2.5", "UNICODE UTF-8"),
            _pid(institution, mrn),
            segment("PV1", {1: "1", 2: "I", 3: "ICU^12^3", 7: "D1234", 19: "E20261123001"}),
            f"ORC|NW|RX9001|PH9001||IP||||{when}|||D1234^ZHANG^Wei",
            f"RXE|^q8h^^{start}^{end}|KCL20^Potassium chloride^LOCAL|{dose}||mmol^mmol^UCUM|INJ",
            "RXR|IV^Intravenous^HL70162",
            f"ORC|DC|RX9000|PH9000||DC||||{when}|||D1234^ZHANG^Wei",
            "RXE|^BID|AMOX500^Amoxicillin 500 mg cap^LOCAL|500||mg|CAP",
            "RXR|PO",
        ]
    )


def omp_o09(
    institution: str = "H002",
    mrn: str = "0000000042",
    control_id: str = "OMP0001",
    at: dt.datetime = DEFAULT_TIME,
) -> bytes:
    """OMP^O09 v2.5, UTF-8, H002: furosemide injection 20 mg IV with TQ1 (repeat pattern, start, end),
    RXO requested give code and amount, Chinese drug name."""
    when = ts(at)
    return _finish(
        [
            _msh(institution, "OMP^O09^OMP_O09", control_id, at, "2.5", "UNICODE UTF-8"),
            _pid(institution, mrn, national_id=None),
            f"ORC|NW|OP5001|||SC||||{when}|||D0077",
            f"TQ1|1||BID||||{ts(at - dt.timedelta(hours=1))}|{when}",
            "RXO|X0417^呋塞米注射液^HIS-H002|20||mg^mg^UCUM",
            "RXR|IV",
        ]
    )


def oru_gb18030(
    institution: str = "H002",
    mrn: str = "0000000042",
    control_id: str = "GB0001",
    potassium: str = "2.6",
    at: dt.datetime = DEFAULT_TIME,
    charset: str = "GB 18030-2000",
    patient_name: str = f"{TRAP_FAMILY_NAME}^{TRAP_GIVEN_NAME}^^^^^L",
) -> bytes:
    """ORU^R01 v2.4 in GB 18030 (MSH-18 `GB 18030-2000`; `GBK` or `GB2312` as other senders write it):
    the patient's name (PID-5) `區^瑋東`, the ward (PV1-3) `東區病房` and the test name (OBX-3.2) carry GBK
    characters whose second byte is `|` or `^`; a Chinese diagnosis text in DG1."""
    c = _codes(institution)
    when = ts(at)
    return _finish(
        [
            _msh(institution, "ORU^R01", control_id, at, "2.4", charset),
            _pid(institution, mrn, name=patient_name),
            segment("PV1", {1: "1", 2: "I", 3: f"{TRAP_WARD}^08^2", 7: "D0077", 19: "V0042"}),
            f"OBR|1|PL0042|FL0042|ELEC^电解质^99LIS|||{when}|||||||||||||||{when}|||F",
            f"OBX|1|NM|{c.potassium[0]}^{TRAP_DISPLAY}^{c.system}||{potassium}|mmol/L|3.5-5.3|LL|||F",
            f"DG1|1||E87.6^低钾血症(東區)^I10||{when}|W",
        ],
        encoding="gb18030",
    )


def unsupported(
    institution: str = "H001", control_id: str = "SIU0001", at: dt.datetime = DEFAULT_TIME
) -> bytes:
    """SIU^S12 (a scheduling message): not a kind the hub takes."""
    return _finish(
        [
            _msh(institution, "SIU^S12^SIU_S12", control_id, at, "2.5", "UNICODE UTF-8"),
            _pid(institution, "MRN1"),
        ]
    )


def all_samples(institution: str = "H001") -> dict[str, bytes]:
    """Every accepted sample by name (the demo and the benchmark send these)."""
    return {
        "oru_r01": oru_r01(institution),
        "oru_r01_v23": oru_r01_v23("C003"),
        "adt_a01": adt("A01", institution),
        "adt_a02": adt("A02", institution, control_id="ADT0002"),
        "adt_a03": adt("A03", institution, control_id="ADT0003"),
        "adt_a04": adt("A04", institution, control_id="ADT0004"),
        "adt_a08": adt("A08", institution, control_id="ADT0008", version="2.3.1"),
        "rde_o11": rde_o11(institution),
        "omp_o09": omp_o09("H002"),
        "oru_gb18030": oru_gb18030("H002"),
    }
