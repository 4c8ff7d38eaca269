"""Every authorisation rule of the console, by page and by API, on an embedded SQLite store with a
recording acknowledgement sink in place of Kafka (the real stack: tests/integration/console)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import insert, text

from clinhub.console_service import ConsoleParts, build_console
from core.settings import ConsoleSettings, DatabaseSettings, HubSettings, load_settings
from sinks.models import Alert, DeadLetterRow, IdentifierLink, Patient, PatientName
from sinks.store import make_engine, upgrade

PASSWORD = "correct horse battery staple"  # noqa: S105 - test accounts
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


class RecordingAcks:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def publish(self, record: dict[str, Any]) -> None:
        self.records.append(record)


def seed_alert(
    engine: Any, institution: str, mrn: str, ward: str | None = "ICU", value: float = 6.9
) -> dict[str, str]:
    alert_id, patient = str(uuid.uuid4()), f"rp-{uuid.uuid4().hex[:12]}"
    with engine.begin() as connection:
        connection.execute(
            insert(Patient.__table__).values(
                regional_patient_id=patient, birth_year=1960, sex="female", created_time=NOW
            )
        )
        connection.execute(
            insert(IdentifierLink.__table__).values(
                institution_id=institution,
                patient_mrn=mrn,
                regional_patient_id=patient,
                linked_time=NOW,
                ingested_time=NOW,
            )
        )
        connection.execute(
            insert(Alert.__table__).values(
                alert_id=alert_id,
                source_event_id=str(uuid.uuid4()),
                regional_patient_id=patient,
                institution_id=institution,
                loinc_code="2823-3",
                analyte="Potassium",
                value=value,
                unit="mmol/L",
                limit_kind="HIGH",
                limit_value=6.1,
                severity="CRITICAL",
                message="Critical potassium",
                rule_source="ARUP",
                correlation_id="c",
                result_time=NOW - dt.timedelta(minutes=5),
                raised_time=NOW - dt.timedelta(minutes=4),
                deadline_time=NOW + dt.timedelta(minutes=11),
                ward=ward,
                changed_time=NOW,
            )
        )
    return {"alert_id": alert_id, "patient": patient, "mrn": mrn}


@pytest.fixture()
def parts(tmp_path: Path) -> Iterator[ConsoleParts]:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    upgrade(make_engine(url))
    base = load_settings()
    settings: HubSettings = base.model_copy(
        update={
            "database": DatabaseSettings(url=SecretStr(url)),
            "console": ConsoleSettings(secure_cookies=False),
        }
    )
    acks = RecordingAcks()
    built = build_console(settings, CollectorRegistry(), acks=acks, notify=False)
    built.app.state.recorded_acks = acks
    accounts = built.console.accounts
    for username, role, institution, wards, level in [
        ("dr.icu", "clinician", "H001", "ICU", 0),
        ("dr.attending", "clinician", "H001", "ICU", 1),
        ("dr.ward7", "clinician", "H001", "WARD7", 0),
        ("dr.h2", "clinician", "H002", None, 0),
        ("integ.h1", "integration", "H001", None, None),
        ("operator", "operator", None, None, None),
        ("admin", "admin", None, None, None),
    ]:
        accounts.add(
            username, PASSWORD, role, institution_id=institution, wards=wards, chain_level=level, now=NOW
        )
    yield built
    built.engine.dispose()


def client(parts: ConsoleParts) -> TestClient:
    return TestClient(parts.app, base_url="http://127.0.0.1")


def api(parts: ConsoleParts, username: str) -> TestClient:
    c = client(parts)
    response = c.post("/api/v1/tokens", json={"username": username, "password": PASSWORD})
    assert response.status_code == 200, response.text
    c.headers["Authorization"] = f"Bearer {response.json()['token']}"
    return c


def browser(parts: ConsoleParts, username: str) -> tuple[TestClient, str]:
    """A signed-in browser session and its CSRF token."""
    c = client(parts)
    page = c.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token
    done = c.post(
        "/login",
        data={"username": username, "password": PASSWORD, "login_token": token.group(1)},
        follow_redirects=False,
    )
    assert done.status_code == 303
    csrf = re.search(
        r'name="csrf_token" value="([^"]+)"',
        c.get("/").text if False else c.get(done.headers["location"]).text,
    )
    assert csrf
    return c, csrf.group(1)


def audit(parts: ConsoleParts, **where: Any) -> list[Any]:
    return [
        e
        for e in parts.console.audit_log.query(limit=500)
        if all(getattr(e, k) == v for k, v in where.items())
    ]


def test_unauthenticated_visitors_get_the_login_page_and_the_api_says_401(parts: ConsoleParts) -> None:
    c = client(parts)
    for path in ("/queue", "/patients/x", "/unprocessable", "/admin/audit", "/"):
        response = c.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    response = c.get("/api/v1/alerts")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert c.get("/api/v1/alerts", headers={"Authorization": "Bearer forged"}).status_code == 401


def test_logins_and_failed_logins_are_audited_without_saying_which_part_was_wrong(
    parts: ConsoleParts,
) -> None:
    c = client(parts)
    wrong_user = c.post("/api/v1/tokens", json={"username": "nobody", "password": PASSWORD})
    wrong_password = c.post("/api/v1/tokens", json={"username": "dr.icu", "password": "not it at all"})
    assert wrong_user.status_code == wrong_password.status_code == 401
    assert wrong_user.json()["error"]["message"] == wrong_password.json()["error"]["message"]
    api(parts, "dr.icu")
    assert audit(parts, username="nobody", outcome="failed")
    assert audit(parts, username="dr.icu", outcome="failed")
    assert audit(parts, username="dr.icu", outcome="ok", action="api_token")


def test_forms_without_the_csrf_token_are_refused(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    c, csrf = browser(parts, "dr.icu")
    form = {"patient_identifier": "MRN-1", "value": "6.9"}
    refused = c.post(f"/alerts/{alert['alert_id']}/acknowledge", data=form)
    assert refused.status_code == 403
    assert parts.app.state.recorded_acks.records == []
    denied = audit(parts, username="dr.icu", outcome="denied", action="access")
    assert denied and "CSRF" in (denied[0].detail or "")
    login = client(parts).post(
        "/login", data={"username": "dr.icu", "password": PASSWORD, "login_token": "x"}
    )
    assert login.status_code == 403, "the login form has its own double-submit token"
    done = c.post(
        f"/alerts/{alert['alert_id']}/acknowledge", data={**form, "csrf_token": csrf}, follow_redirects=False
    )
    assert done.status_code == 303
    assert parts.app.state.recorded_acks.records[0]["acknowledged_by"] == "dr.icu"


def test_the_session_cookie_is_httponly_and_samesite_strict(parts: ConsoleParts) -> None:
    c = client(parts)
    token = re.search(r'name="login_token" value="([^"]+)"', c.get("/login").text)
    assert token
    done = c.post(
        "/login",
        data={"username": "dr.icu", "password": PASSWORD, "login_token": token.group(1)},
        follow_redirects=False,
    )
    cookie = next(
        v for k, v in done.headers.multi_items() if k == "set-cookie" and v.startswith("clinhub_session=")
    )
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_another_institutions_alert_is_refused_by_page_and_api_and_audited(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    other = api(parts, "dr.h2")
    assert alert["alert_id"] not in {a["alert_id"] for a in other.get("/api/v1/alerts").json()}
    response = other.get(f"/api/v1/alerts/{alert['alert_id']}")
    assert response.status_code == 403
    assert alert["patient"] not in response.text and "MRN-1" not in response.text
    ack = other.post(
        f"/api/v1/alerts/{alert['alert_id']}/acknowledge",
        json={"patient_identifier": "MRN-1", "value": "6.9"},
    )
    assert ack.status_code == 403
    page, _ = browser(parts, "dr.h2")
    assert page.get(f"/alerts/{alert['alert_id']}").status_code == 403
    assert page.get("/queue?institution=H001").status_code == 403
    assert len(audit(parts, username="dr.h2", outcome="denied")) >= 4
    assert parts.app.state.recorded_acks.records == []


def test_wards_and_chain_levels_decide_the_queue(parts: ConsoleParts) -> None:
    icu = seed_alert(parts.engine, "H001", "MRN-1", ward="ICU")
    unknown_ward = seed_alert(parts.engine, "H001", "MRN-2", ward=None)
    queue = {a["alert_id"] for a in api(parts, "dr.icu").get("/api/v1/alerts").json()}
    assert queue == {icu["alert_id"], unknown_ward["alert_id"]}
    assert {a["alert_id"] for a in api(parts, "dr.ward7").get("/api/v1/alerts").json()} == {
        unknown_ward["alert_id"]
    }
    assert api(parts, "dr.attending").get("/api/v1/alerts").json() == [], "level 1: only once escalated"
    assert api(parts, "dr.ward7").get(f"/api/v1/alerts/{icu['alert_id']}").status_code == 403
    with parts.engine.begin() as connection:
        connection.execute(
            text("UPDATE alerts SET escalation_level = 1 WHERE alert_id = :a"), {"a": icu["alert_id"]}
        )
    assert [a["alert_id"] for a in api(parts, "dr.attending").get("/api/v1/alerts").json()] == [
        icu["alert_id"]
    ]


def test_the_mrn_is_shown_to_the_alerts_own_institution_only(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-77")
    shown = api(parts, "dr.icu").get(f"/api/v1/alerts/{alert['alert_id']}").json()
    assert shown["alert"]["patient"] == {
        "regional_patient_id": alert["patient"],
        "birth_year": 1960,
        "sex": "female",
        "mrn": "MRN-77",
        "family_name": None,  # H001 sent no name for MRN-77
        "given_name": None,
    }


def seed_name(
    engine: Any, institution: str, mrn: str, patient: str, family: str | None, given: str | None
) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(PatientName.__table__).values(
                institution_id=institution,
                patient_mrn=mrn,
                regional_patient_id=patient,
                family_name=family,
                given_name=given,
                event_time=NOW,
                event_id=str(uuid.uuid4()),
                ingested_time=NOW,
            )
        )


def link(engine: Any, institution: str, mrn: str, patient: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(IdentifierLink.__table__).values(
                institution_id=institution,
                patient_mrn=mrn,
                regional_patient_id=patient,
                linked_time=NOW,
                ingested_time=NOW,
            )
        )


def test_the_name_is_shown_beside_the_mrn_to_the_institution_that_sent_it(parts: ConsoleParts) -> None:
    """Queue row, alert page, patient page and API: the name H001 sent, where H001's MRN is shown."""
    alert = seed_alert(parts.engine, "H001", "MRN-77")
    seed_name(parts.engine, "H001", "MRN-77", alert["patient"], "區", "瑋東")
    patient = api(parts, "dr.icu").get(f"/api/v1/alerts/{alert['alert_id']}").json()["alert"]["patient"]
    assert (patient["mrn"], patient["family_name"], patient["given_name"]) == ("MRN-77", "區", "瑋東")
    (queued,) = api(parts, "dr.icu").get("/api/v1/alerts").json()
    assert (queued["patient"]["family_name"], queued["patient"]["given_name"]) == ("區", "瑋東")
    page, _ = browser(parts, "dr.icu")
    assert 'MRN <b class="rid">MRN-77</b> <b class="name">區 瑋東</b>' in page.get("/queue").text
    assert (
        'MRN <span class="rid">MRN-77</span> <span class="name">區 瑋東</span>'
        in page.get(f"/alerts/{alert['alert_id']}").text
    )
    assert (
        'MRN here: MRN-77 <span class="name">區 瑋東</span>' in page.get(f"/patients/{alert['patient']}").text
    )
    timeline = api(parts, "dr.icu").get(f"/api/v1/patients/{alert['patient']}/timeline").json()
    assert timeline["mrns_here"] == ["MRN-77"]
    assert timeline["names_here"] == [{"mrn": "MRN-77", "family_name": "區", "given_name": "瑋東"}]


def test_another_institution_sees_neither_the_mrn_nor_the_name(parts: ConsoleParts) -> None:
    """The patient is known at H002 too: H002's clinician sees H002's MRN and the name H002 sent, never
    H001's, on the patient page, in the API, and not beside H001's alert in the patient's alert list."""
    alert = seed_alert(parts.engine, "H001", "MRN-77")
    seed_name(parts.engine, "H001", "MRN-77", alert["patient"], "區", "瑋東")
    link(parts.engine, "H002", "H2-0042", alert["patient"])
    seed_name(parts.engine, "H002", "H2-0042", alert["patient"], "欧阳", "晓明")
    other = api(parts, "dr.h2")
    assert other.get(f"/api/v1/alerts/{alert['alert_id']}").status_code == 403
    timeline = other.get(f"/api/v1/patients/{alert['patient']}/timeline").json()
    assert timeline["mrns_here"] == ["H2-0042"]
    assert timeline["names_here"] == [{"mrn": "H2-0042", "family_name": "欧阳", "given_name": "晓明"}]
    page, _ = browser(parts, "dr.h2")
    html = page.get(f"/patients/{alert['patient']}").text
    assert "欧阳 晓明" in html and "Potassium" in html  # H001's alert is listed, without its name or MRN
    assert "區" not in html and "瑋東" not in html and "MRN-77" not in html
    assert "區" not in other.get(f"/api/v1/patients/{alert['patient']}/timeline").text
    # and H001 does not see the name H002 sent
    own = api(parts, "dr.icu").get(f"/api/v1/patients/{alert['patient']}/timeline").json()
    assert own["names_here"] == [{"mrn": "MRN-77", "family_name": "區", "given_name": "瑋東"}]
    for username in ("integ.h1", "operator", "admin"):
        assert "區" not in api(parts, username).get("/api/v1/alerts").text


def test_acknowledging_twice_gives_a_clear_answer(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    c = api(parts, "dr.icu")
    body = {"patient_identifier": alert["patient"], "value": "6.9"}
    first = c.post(f"/api/v1/alerts/{alert['alert_id']}/acknowledge", json=body)
    assert first.status_code == 200
    record = parts.app.state.recorded_acks.records[0]
    assert (record["read_back"], record["channel"], record["regional_patient_id"]) == (
        True,
        "CONSOLE",
        alert["patient"],
    )
    second = api(parts, "dr.attending").post(f"/api/v1/alerts/{alert['alert_id']}/acknowledge", json=body)
    assert second.status_code == 409
    assert second.json()["error"]["acknowledged_by"] == "dr.icu"
    assert len(parts.app.state.recorded_acks.records) == 1
    page, csrf = browser(parts, "dr.icu")
    again = page.post(f"/alerts/{alert['alert_id']}/acknowledge", data={**body, "csrf_token": csrf})
    assert again.status_code == 409 and "Already acknowledged by dr.icu" in again.text


def test_patient_timelines_are_for_clinicians_of_an_institution_that_knows_the_patient(
    parts: ConsoleParts,
) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    own = api(parts, "dr.icu").get(f"/api/v1/patients/{alert['patient']}/timeline")
    assert own.status_code == 200
    assert [e["kind"] for e in own.json()["entries"]] == ["alert"]
    assert own.json()["mrns_here"] == ["MRN-1"]
    for username in ("dr.h2", "integ.h1", "operator", "admin"):
        assert api(parts, username).get(f"/api/v1/patients/{alert['patient']}/timeline").status_code == 403
    assert audit(
        parts, username="dr.icu", action="view_patient", outcome="ok", regional_patient_id=alert["patient"]
    )
    assert audit(parts, username="dr.h2", action="view_patient", outcome="denied")
    page, _ = browser(parts, "dr.icu")
    found = page.get("/patients?q=MRN-1", follow_redirects=False)
    assert found.headers["location"] == f"/patients/{alert['patient']}"


def test_unprocessable_results_are_for_their_institutions_integration_staff(parts: ConsoleParts) -> None:
    with parts.engine.begin() as connection:
        for institution in ("H001", "H002"):
            connection.execute(
                insert(DeadLetterRow.__table__).values(
                    deadletter_id=str(uuid.uuid4()),
                    original_topic=f"raw.{institution}.lab",
                    original_partition=0,
                    original_offset=1,
                    kind="lab",
                    error_class="UnknownUnitError",
                    field="unit",
                    reason=f"unknown unit at {institution}",
                    institution_id=institution,
                    processor="normaliser",
                    possibly_critical=True,
                    loinc_code="2823-3",
                    failed_time=NOW,
                    ingested_time=NOW,
                )
            )
    rows = api(parts, "integ.h1").get("/api/v1/unprocessable").json()
    assert [row["reason"] for row in rows] == ["unknown unit at H001"]
    assert rows[0]["possibly_critical"] is True
    for username in ("dr.icu", "operator", "dr.h2"):
        assert api(parts, username).get("/api/v1/unprocessable").status_code == 403


def test_figures_for_operators_and_the_audit_log_for_admins(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    with parts.engine.begin() as connection:
        connection.execute(
            text("UPDATE alerts SET acknowledged_time = :t, acknowledged_by = 'dr.icu' WHERE alert_id = :a"),
            {"t": NOW, "a": alert["alert_id"]},
        )
    figures = api(parts, "operator").get("/api/v1/figures/acknowledgement").json()
    assert figures[0]["institution_id"] == "H001" and figures[0]["median_minutes"] == pytest.approx(5.0)
    assert figures[0]["within_target_share"] == 1.0
    assert api(parts, "dr.icu").get("/api/v1/figures/acknowledgement").status_code == 403
    assert api(parts, "admin").get("/api/v1/audit").status_code == 200
    for username in ("dr.icu", "operator", "integ.h1"):
        assert api(parts, username).get("/api/v1/audit").status_code == 403
    assert api(parts, "operator").get("/api/v1/alerts").status_code == 403
    metrics = client(parts).get("/metrics").text
    assert (
        'clinhub_alert_time_to_acknowledge_seconds_count{institution="H001",severity="CRITICAL"} 1.0'
        in metrics
    )
    assert alert["patient"] not in metrics


def test_a_disabled_account_is_signed_out_at_once(parts: ConsoleParts) -> None:
    c = api(parts, "dr.icu")
    assert c.get("/api/v1/alerts").status_code == 200
    parts.console.accounts.set_disabled("dr.icu", True, NOW)
    assert c.get("/api/v1/alerts").status_code == 401
    assert (
        client(parts).post("/api/v1/tokens", json={"username": "dr.icu", "password": PASSWORD}).status_code
        == 401
    )


def test_the_audit_log_refuses_updates_and_deletes(parts: ConsoleParts) -> None:
    api(parts, "dr.icu")
    with pytest.raises(Exception, match="append-only"), parts.engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET username = 'someone else'"))
    with pytest.raises(Exception, match="append-only"), parts.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log"))


def test_the_api_is_described_by_openapi(parts: ConsoleParts) -> None:
    paths = client(parts).get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/alerts",
        "/api/v1/alerts/{alert_id}/acknowledge",
        "/api/v1/patients/{regional_patient_id}/timeline",
        "/api/v1/unprocessable",
    } <= set(paths)


def test_an_acknowledgement_without_action_is_owned_until_the_action_is_recorded(parts: ConsoleParts) -> None:
    alert = seed_alert(parts.engine, "H001", "MRN-1")
    c = api(parts, "dr.icu")
    ack = c.post(
        f"/api/v1/alerts/{alert['alert_id']}/acknowledge",
        json={"patient_identifier": "MRN-1", "value": "6.9"},
    )
    assert ack.status_code == 200
    assert parts.app.state.recorded_acks.records[-1]["note"] is None
    # the store takes the acknowledgement (as the store stage would from alerts.ack)
    with parts.engine.begin() as connection:
        connection.execute(
            text("UPDATE alerts SET acknowledged_time = :t, acknowledged_by = 'dr.icu' WHERE alert_id = :a"),
            {"t": NOW - dt.timedelta(minutes=31), "a": alert["alert_id"]},
        )
    owned = c.get("/api/v1/acknowledged").json()
    assert [a["alert_id"] for a in owned] == [alert["alert_id"]]
    assert owned[0]["no_action_recorded"] is True, "30 minutes (the default) have passed"
    assert api(parts, "dr.attending").get("/api/v1/acknowledged").json() == [], (
        "the owner is who acknowledged"
    )
    page, _ = browser(parts, "dr.icu")
    assert "acknowledged, no action recorded" in page.get("/queue").text
    assert c.post(f"/api/v1/alerts/{alert['alert_id']}/action", json={"note": "  "}).status_code == 422
    done = c.post(f"/api/v1/alerts/{alert['alert_id']}/action", json={"note": "repeat K+ in 1 h, ECG"})
    assert done.status_code == 204
    action = parts.app.state.recorded_acks.records[-1]
    assert (action["note"], action["read_back"], action["alert_id"]) == (
        "repeat K+ in 1 h, ECG",
        False,
        alert["alert_id"],
    )


def test_the_patient_page_names_analytes_and_plots_their_trend_against_the_critical_limits(
    parts: ConsoleParts,
) -> None:
    from sinks.models import Observation

    alert = seed_alert(parts.engine, "H001", "MRN-1")
    with parts.engine.begin() as connection:
        for hours, value in ((30, 4.1), (20, 4.8), (5, 6.9)):
            connection.execute(
                insert(Observation.__table__).values(
                    institution_id="H001", category="laboratory", result_id=f"R{hours}", component="",
                    event_id=str(uuid.uuid4()), event_time=NOW, source_system="LIS",
                    regional_patient_id=alert["patient"], local_code="K", loinc_code="2823-3", analyte=None,
                    value=value, unit="mmol/L", status="final", flags="",
                    effective_time=NOW - dt.timedelta(hours=hours), ingested_time=NOW,
                )
            )  # fmt: skip
    page, _ = browser(parts, "dr.icu")
    html = page.get(f"/patients/{alert['patient']}").text
    assert "Potassium <small>(LOINC 2823-3)</small>" in html
    assert "3 results, 4.1\u20136.9 mmol/L; critical below 3 or above 6.1" in html
    assert html.count("<circle") == 3
