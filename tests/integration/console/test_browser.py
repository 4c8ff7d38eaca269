"""The clinician console in a real headless Chromium (Debian's `chromium`, driven by Playwright through
`executable_path`; Playwright's own browser download is never used) on the real stack: the SDK publishes
to Kafka, the stream worker raises, escalates and stores alerts in PostgreSQL, the console serves them
over a real socket. One stack for the module (one worker, warmed up once); each test its own patients.

Screenshots of the queue, an alert and a patient view, at desktop and phone width, go to tests/artifacts/.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, ViewportSize, expect, sync_playwright
from sqlalchemy import select
from sqlalchemy.orm import Session

from clinhub.infra import kafka, postgres
from clinhub.infra.registry import RegistryLayout
from producers.publisher import Publisher, make_publisher
from sinks.models import Alert, AlertAcknowledgement
from tests.factories import lab_record
from tests.integration.conftest import PROJECT_ROOT, HubEnv, running_hub
from tests.integration.console.conftest import PASSWORD, ConsoleServer, console_server
from tests.integration.test_clinical import decoded, escalations_by_alert, fast_escalation
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
ESCALATION_MINUTES = 0.2  # 12 s to acknowledge before the next level is called
ARRIVAL_LIMIT_SECONDS = 3.0


def chromium_executable() -> str:
    """Debian's chromium; its absence is a broken setup (scripts/bootstrap.sh installs it), not a skip."""
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError(
            "Debian's chromium is not installed: apt-get install -y chromium (scripts/bootstrap.sh does it)"
        )
    return path


@dataclass
class Stack:
    hub: HubEnv
    server: ConsoleServer
    publisher: Publisher
    warm_up_alert: str
    arrivals: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def publish_critical(self, mrn: str, value: float = 6.9) -> dict[str, Any]:
        record = lab_record("H001", "K", value, "mmol/L", mrn=mrn)
        self.publisher.publish_lab(record)
        return record

    def stored_alert(self, *, event_id: str | None = None, alert_id: str | None = None) -> Alert | None:
        where = Alert.source_event_id == event_id if event_id else Alert.alert_id == alert_id
        with Session(self.hub.engine) as session:
            return session.scalars(select(Alert).where(where)).first()

    def acknowledgements(self, alert_id: str) -> list[AlertAcknowledgement]:
        with Session(self.hub.engine) as session:
            query = select(AlertAcknowledgement).where(AlertAcknowledgement.alert_id == alert_id)
            return list(session.scalars(query))

    def wait_for_alert(self, record: dict[str, Any], timeout: float = 60) -> Alert:
        found: list[Alert] = []

        def stored() -> bool:
            alert = self.stored_alert(event_id=record["envelope"]["event_id"])
            if alert is not None:
                found.append(alert)
            return bool(found)

        wait_for(stored, self.hub, timeout, what=f"the alert of {record['patient_mrn']} in the store")
        return found[0]


@pytest.fixture(scope="module")
def stack(
    kafka_broker: kafka.KafkaLayout,
    schema_registry: RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("browser")
    with running_hub(kafka_broker, schema_registry, postgres_cluster, workdir) as hub:
        worker_env = fast_escalation(workdir, minutes=ESCALATION_MINUTES)
        hub.start_worker(worker_env)
        publisher = make_publisher(hub.settings, "H001")
        try:
            with console_server(hub, reference_dir=workdir / "reference") as server:
                stack = Stack(hub, server, publisher, warm_up_alert="")
                # The worker is running and caught up (partitions assigned, every stage through to the
                # store) before any test measures anything: a first critical result travels the whole way.
                warm_up = stack.wait_for_alert(stack.publish_critical("MRN-WARMUP"), timeout=120)
                stack.warm_up_alert = warm_up.alert_id
                yield stack
                if stack.arrivals:
                    seconds = ", ".join(f"{s:.2f}" for s in stack.arrivals)
                    print(f"\npublish -> row in the open queue, seconds: {seconds}")
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    (ARTIFACTS / "console-arrival-seconds.txt").write_text(seconds + "\n")
        finally:
            publisher.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture()
def contexts(browser: Browser) -> Iterator[list[BrowserContext]]:
    """Browser contexts (each its own cookie jar) a test opens; closed after it."""
    opened: list[BrowserContext] = []
    yield opened
    for context in opened:
        context.close()


def new_context(
    browser: Browser, contexts: list[BrowserContext], viewport: ViewportSize = DESKTOP
) -> BrowserContext:
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(15_000)
    contexts.append(context)
    return context


def sign_in(context: BrowserContext, url: str, username: str, then: str = "/queue") -> Page:
    page = context.new_page()
    page.goto(f"{url}/login?next={then}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}{then}")
    return page


def open_queue(context: BrowserContext, url: str, username: str) -> Page:
    page = sign_in(context, url, username)
    expect(page.locator("#live")).to_have_text("live")  # the event stream is connected
    return page


def row_of(page: Page, mrn: str) -> Locator:
    return page.locator("li.alert", has_text=f"MRN {mrn}")


def arrive(stack: Stack, page: Page, mrn: str) -> tuple[str, float]:
    """Publish a critical result for `mrn` and wait for its row in the open page; the row's alert id and
    the seconds from publish to the row appearing."""
    page.evaluate("window.__notReloaded = true")
    started = time.monotonic()
    stack.publish_critical(mrn)
    row = row_of(page, mrn)
    row.wait_for(state="visible", timeout=30_000)
    elapsed = time.monotonic() - started
    assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
    stack.arrivals.append(elapsed)
    return str(row.get_attribute("data-alert-id")), elapsed


def acknowledge_on_page(page: Page, mrn: str, value: str, note: str = "") -> None:
    page.get_by_label("Patient MRN or regional id").fill(mrn)
    page.get_by_label("Value").fill(value)
    if note:
        page.get_by_label("Action taken (optional)").fill(note)
    page.get_by_role("button", name=re.compile(r"^Acknowledge as ")).click()


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def horizontal_overflow(page: Page) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


def test_an_unauthenticated_visitor_gets_the_login_page(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    page = new_context(browser, contexts).new_page()
    for path in ("/queue", f"/alerts/{stack.warm_up_alert}", "/patients/anyone"):
        response = page.goto(f"{stack.url}{path}")
        assert response is not None and response.status == 200
        assert page.url.startswith(f"{stack.url}/login?next="), page.url
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        expect(page.get_by_label("Password")).to_be_visible()
        assert "MRN-WARMUP" not in page.content()
    assert httpx.get(f"{stack.url}/api/v1/alerts").status_code == 401


def test_a_published_critical_result_appears_in_the_open_queue_within_3_seconds(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    context = new_context(browser, contexts)
    script_errors: list[str] = []
    context.on("weberror", lambda error: script_errors.append(str(error.error)))
    page = open_queue(context, stack.url, "dr.icu")
    alert_id, elapsed = arrive(stack, page, "MRN-ARRIVES")
    assert elapsed < ARRIVAL_LIMIT_SECONDS, f"the row appeared {elapsed:.2f} s after publish"
    row = page.locator(f"#alert-{alert_id}")
    # what a clinician needs on the row itself
    for text in ("CRITICAL", "6.9 mmol/L", "MRN MRN-ARRIVES", "H001", "Level 0", "since result"):
        expect(row).to_contain_text(text)
    assert script_errors == []


def test_acknowledging_with_read_back_closes_the_loop(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    context = new_context(browser, contexts)
    queue = open_queue(context, stack.url, "dr.icu")
    alert_id, _ = arrive(stack, queue, "MRN-ACKED")
    alert = stack.stored_alert(alert_id=alert_id)
    assert alert is not None and alert.acknowledged_by is None

    page = context.new_page()
    page.goto(f"{stack.url}/alerts/{alert_id}")
    acknowledge_on_page(page, "MRN-ACKED", "6.9", note="repeat K, ECG, calcium gluconate")
    expect(page.get_by_role("status")).to_contain_text("Acknowledged")
    assert page.url.endswith(f"/alerts/{alert_id}?done=acknowledged")

    # it leaves the queue that is open in the other tab, without a reload
    expect(queue.locator(f"#alert-{alert_id}")).to_have_count(0, timeout=15_000)
    queue.reload()
    expect(queue.locator("#live")).to_have_text("live")
    expect(queue.locator(f"#alert-{alert_id}")).to_have_count(0)

    def stored() -> bool:
        row = stack.stored_alert(alert_id=alert_id)
        return row is not None and row.acknowledged_by == "dr.icu" and bool(stack.acknowledgements(alert_id))

    wait_for(stored, stack.hub, 30, what="the acknowledgement in the store")
    (ack,) = stack.acknowledgements(alert_id)
    assert ack.acknowledged_by == "dr.icu" and ack.read_back is True
    assert ack.note == "repeat K, ECG, calcium gluconate"

    # no escalation once its deadline has passed (the escalation timer runs: the warm-up alert escalates)
    assert alert.deadline_time is not None
    while dt.datetime.now(dt.UTC) < alert.deadline_time + dt.timedelta(seconds=6):
        time.sleep(0.5)
    levels = escalations_by_alert(stack.hub, 3)
    assert levels.get(stack.warm_up_alert), "the escalation timer is running"
    assert alert_id not in levels, f"an acknowledged alert escalated: {levels[alert_id]}"
    row = stack.stored_alert(alert_id=alert_id)
    assert row is not None and row.escalation_level == 0


def test_a_wrong_read_back_names_the_field_and_acknowledges_nothing(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    context = new_context(browser, contexts)
    queue = open_queue(context, stack.url, "dr.icu")
    alert_id, _ = arrive(stack, queue, "MRN-MISREAD")
    page = context.new_page()
    page.goto(f"{stack.url}/alerts/{alert_id}")

    acknowledge_on_page(page, "MRN-SOMEONE-ELSE", "6.9")
    error = page.get_by_role("alert")
    expect(error).to_contain_text("patient identifier")
    expect(error).to_contain_text("does not match")
    expect(page.get_by_label("Value")).to_have_value("6.9")  # what was typed is kept

    acknowledge_on_page(page, "MRN-MISREAD", "9.6")
    expect(page.get_by_role("alert")).to_contain_text("value")
    expect(page.get_by_role("alert")).to_contain_text("does not match the value")
    expect(page.get_by_role("button", name=re.compile(r"^Acknowledge as "))).to_be_visible()

    queue.wait_for_timeout(1000)
    expect(queue.locator(f"#alert-{alert_id}")).to_have_count(1)  # still open
    acks = [a for a in decoded(stack.hub, stack.hub.topics.acks_topic, 3) if str(a["alert_id"]) == alert_id]
    assert acks == [], "no acknowledgement was published"
    assert stack.acknowledgements(alert_id) == []
    failed = stack.server.audit(action="acknowledge", outcome="failed", alert_id=alert_id)
    assert len(failed) == 2


def test_an_unacknowledged_alert_reaches_the_next_level_of_the_chain_and_not_before(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    icu = open_queue(new_context(browser, contexts), stack.url, "dr.icu")
    attending = open_queue(new_context(browser, contexts), stack.url, "dr.attending")
    alert_id, _ = arrive(stack, icu, "MRN-IGNORED")
    alert = stack.stored_alert(alert_id=alert_id)
    assert alert is not None and alert.escalation_level == 0
    expect(attending.locator(f"#alert-{alert_id}")).to_have_count(0)
    with stack.server.api("dr.attending") as api:
        assert alert_id not in {a["alert_id"] for a in api.get("/api/v1/alerts").json()}

    # watch the attending's open page: the row may appear only once the store says level 1
    deadline = time.monotonic() + 60
    while attending.locator(f"#alert-{alert_id}").count() == 0:
        level = stack.stored_alert(alert_id=alert_id).escalation_level  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"not in the attending's queue; level {level}"
        attending.wait_for_timeout(200)
    row = stack.stored_alert(alert_id=alert_id)
    assert row is not None and row.escalation_level >= 1 and row.escalated_time is not None
    assert row.escalated_time >= alert.deadline_time
    expect(attending.locator(f"#alert-{alert_id}")).to_contain_text("attending physician")
    expect(icu.locator(f"#alert-{alert_id}")).to_contain_text("attending physician")  # still there too
    with stack.server.api("dr.attending") as api:
        listed = {a["alert_id"]: a for a in api.get("/api/v1/alerts").json()}
    assert listed[alert_id]["escalation_level"] >= 1


def test_a_clinician_of_another_institution_cannot_see_the_alert(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    icu = open_queue(new_context(browser, contexts), stack.url, "dr.icu")
    alert_id, _ = arrive(stack, icu, "MRN-PRIVATE")
    alert = stack.stored_alert(alert_id=alert_id)
    assert alert is not None

    page = open_queue(new_context(browser, contexts), stack.url, "dr.h2")
    expect(page.locator(f"#alert-{alert_id}")).to_have_count(0)
    response = page.goto(f"{stack.url}/alerts/{alert_id}")
    assert response is not None and response.status == 403
    expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
    assert "MRN-PRIVATE" not in page.content() and alert.regional_patient_id not in page.content()

    with stack.server.api("dr.h2") as api:
        answer = api.get(f"/api/v1/alerts/{alert_id}")
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "PermissionDeniedError"
    assert "MRN-PRIVATE" not in answer.text and alert.regional_patient_id not in answer.text

    denied = stack.server.audit(outcome="denied", username="dr.h2", alert_id=alert_id)
    assert [(e.action, e.institution_id) for e in denied] == [("view_alert", "H001")] * 2, "each attempt"


def test_the_queue_fits_a_phone(stack: Stack, browser: Browser, contexts: list[BrowserContext]) -> None:
    page = open_queue(new_context(browser, contexts, PHONE), stack.url, "dr.icu")
    alert_id, _ = arrive(stack, page, "MRN-PHONE-0000000042")
    assert page.evaluate("window.innerWidth") == PHONE["width"]
    assert horizontal_overflow(page) <= 0, "the queue scrolls sideways at phone width"
    page.goto(f"{stack.url}/alerts/{alert_id}")
    assert horizontal_overflow(page) <= 0, "the alert page scrolls sideways at phone width"


def test_screenshots_of_the_queue_the_alert_and_the_patient_view(
    stack: Stack, browser: Browser, contexts: list[BrowserContext]
) -> None:
    """Written to tests/artifacts/ to be looked at; each page also checked for sideways scrolling."""
    mrn = "MRN-TREND"
    earlier = dt.datetime.now(dt.UTC).replace(microsecond=0)
    named = {"patient_family_name": "區", "patient_given_name": "瑋東"}  # shown beside H001's MRN
    for hours, value in ((30, 4.1), (20, 4.6), (8, 5.3)):
        at = earlier - dt.timedelta(hours=hours)
        stack.publisher.publish_lab(lab_record("H001", "K", value, "mmol/L", mrn=mrn, at=at, **named))
        stack.publisher.publish_lab(lab_record("H001", "NA", 139 - hours / 10, "mmol/L", mrn=mrn, at=at))
    desktop = open_queue(new_context(browser, contexts), stack.url, "dr.icu")
    alert_id, _ = arrive(stack, desktop, mrn)
    with stack.server.api("dr.icu") as api:
        regional = api.get(f"/api/v1/alerts/{alert_id}").json()["alert"]["patient"]["regional_patient_id"]
        patients = [alert["patient"] for alert in api.get("/api/v1/alerts").json()]
    # each name beside its own MRN only (a mis-correlated query once showed it beside every MRN)
    assert {(p["mrn"], p["family_name"]) for p in patients if p["mrn"] == mrn} == {(mrn, "區")}
    assert all(p["family_name"] is None for p in patients if p["mrn"] != mrn), patients
    phone = open_queue(new_context(browser, contexts, PHONE), stack.url, "dr.icu")
    expect(phone.locator(f"#alert-{alert_id}")).to_have_count(1)

    for page, width in ((desktop, "desktop"), (phone, "phone")):
        for name, path in (
            ("queue", "/queue"),
            ("alert", f"/alerts/{alert_id}"),
            ("patient", f"/patients/{regional}"),
        ):
            response = page.goto(f"{stack.url}{path}")
            assert response is not None and response.status == 200, path
            if name == "queue":
                expect(page.locator(f"#alert-{alert_id}")).to_have_count(1)
            if name == "patient":
                expect(page.locator(".trends svg").first).to_be_visible()
            screenshot(page, f"console-{name}-{width}")
            if width == "phone":  # what a clinician sees first, at full resolution
                screenshot(page, f"console-{name}-phone-first-screen", full_page=False)
            assert horizontal_overflow(page) <= 0, f"{name} scrolls sideways at {width} width"
