"""Who sees which alert: institution, ward, place in the chain; roles without clinical access see none."""

from __future__ import annotations

import pytest

from console.domain.access import (
    AlertScope,
    Principal,
    can_see_alert,
    in_queue_of,
    parse_wards,
    sees_local_identity,
)


def clinician(institution: str = "H001", wards: str = "", level: int = 0) -> Principal:
    return Principal("u", "U", "clinician", institution, parse_wards(wards), level)


ICU_ALERT = AlertScope("H001", "ICU", 0)


def test_a_clinician_sees_alerts_of_their_institution_and_wards() -> None:
    assert can_see_alert(clinician(wards="ICU"), ICU_ALERT)
    assert can_see_alert(clinician(), ICU_ALERT), "no wards: every ward"
    assert not can_see_alert(clinician(wards="WARD7"), ICU_ALERT)
    assert not can_see_alert(clinician("H002"), ICU_ALERT)


def test_an_alert_without_a_ward_reaches_every_clinician_of_its_institution() -> None:
    assert can_see_alert(clinician(wards="WARD7"), AlertScope("H001", None, 0))


def test_the_queue_holds_alerts_escalated_to_the_users_level() -> None:
    attending = clinician(wards="ICU", level=1)
    assert not in_queue_of(attending, ICU_ALERT)
    assert in_queue_of(attending, AlertScope("H001", "ICU", 1))
    assert in_queue_of(clinician(wards="ICU"), AlertScope("H001", "ICU", 2)), "still open for level 0"


@pytest.mark.parametrize("role", ["integration", "operator", "admin"])
def test_other_roles_see_no_alert(role: str) -> None:
    assert not can_see_alert(Principal("u", "U", role, "H001"), ICU_ALERT)


def test_wards_parse_from_text_or_lists() -> None:
    assert parse_wards(" ICU, WARD7 ,,") == frozenset({"ICU", "WARD7"})
    assert parse_wards(["ICU"]) == frozenset({"ICU"})
    assert parse_wards(None) == frozenset()


def test_the_mrn_and_the_name_are_for_the_clinicians_of_the_institution_that_sent_them() -> None:
    assert sees_local_identity(clinician("H001"), "H001")
    assert sees_local_identity(clinician("H001", wards="WARD7", level=2), "H001")
    assert not sees_local_identity(clinician("H002"), "H001"), "another institution: neither MRN nor name"
    assert not sees_local_identity(clinician("H001"), None)
    for role in ("integration", "operator", "admin"):
        assert not sees_local_identity(Principal("u", "U", role, "H001"), "H001")
