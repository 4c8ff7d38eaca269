"""The console's JSON API fuzzed by schemathesis against the OpenAPI description it serves itself
(/openapi.json), on the real stack, for a fixed number of examples (derandomized: the same requests every
run, so a loaded machine makes the test slower, never weaker; about a minute on a quiet one).

Identities: dr.icu (clinician of H001), integ.h1 (integration staff of H001) and nobody (no token). Each
API operation gets generated requests, positive and negative, some aimed at what H002 holds (its alert
id, patient id and MRN, seeded beforehand through the pipeline). Every response must not be a 5xx,
must have a documented status code, content type and body, and must not carry anything of H002 the
request did not itself contain. Then the bug the fuzzer found (a NUL character reaching PostgreSQL: 500)
is probed on purpose in every operation and the pages, as generation may not hit it every run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from sqlalchemy import select
from sqlalchemy.orm import Session

from producers.publisher import make_publisher
from sinks.models import Alert, DeadLetterRow
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.console.conftest import ConsoleServer, console_server
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

EXAMPLES = {"dr.icu": 60, "integ.h1": 30, "nobody": 5}  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
H1_MRN, H2_MRN = "FUZZ-H1-0001", "FUZZ-H2-0002"


@dataclass(frozen=True)
class Seeded:
    h1_alert: str
    h1_patient: str
    h2_alert: str
    h2_patient: str

    def secrets(self) -> set[str]:
        """What of H002 no H001 user may ever read (the alert id also without its dashes)."""
        return {self.h2_alert, self.h2_alert.replace("-", ""), self.h2_patient, H2_MRN, "H002"}


def seed(hub: HubEnv) -> Seeded:
    """Through the pipeline: a critical result and an unreadable one at each institution."""
    hub.start_worker()
    h1 = make_publisher(hub.settings, "H001")
    h2 = make_publisher(hub.settings, "H002")
    h1_critical = lab_record("H001", "K", 6.9, "mmol/L", mrn=H1_MRN)
    h2_critical = lab_record("H002", "LAB0101", 7.1, "mmol/L", mrn=H2_MRN)
    h1.publish_lab(h1_critical)
    h2.publish_lab(h2_critical)
    h1.publish_lab(lab_record("H001", "K", 6.9, "furlongs", mrn=H1_MRN))  # unknown unit: dead letter
    h2.publish_lab(lab_record("H002", "LAB0101", 7.0, "furlongs", mrn=H2_MRN))
    h1.close()
    h2.close()

    found: dict[str, str] = {}

    def stored() -> bool:
        with Session(hub.engine) as session:
            for alert in session.scalars(select(Alert)):
                found[alert.institution_id] = alert.alert_id
            institutions = set(session.scalars(select(DeadLetterRow.institution_id)))
        return {"H001", "H002"} <= set(found) and {"H001", "H002"} <= institutions

    wait_for(stored, hub, 90, what="both institutions' alerts and dead letters in the store")
    with Session(hub.engine) as session:
        patients = {a.alert_id: a.regional_patient_id for a in session.scalars(select(Alert))}
    return Seeded(found["H001"], patients[found["H001"]], found["H002"], patients[found["H002"]])


def aimed(operation: Any, mode: GenerationMode, seeded: Seeded) -> st.SearchStrategy[Any]:
    """Generated requests, and the same with the path and query naming seeded ids of both institutions."""
    names = {(p.location.value, p.name) for p in operation.iter_parameters()}
    path_names = {name for location, name in names if location == "path"}
    query_names = {name for location, name in names if location == "query"}
    targets = []
    for alert, patient, mrn in (
        (seeded.h2_alert, seeded.h2_patient, H2_MRN),
        (seeded.h1_alert, seeded.h1_patient, H1_MRN),
    ):
        path = {
            name: value
            for name, value in (("alert_id", alert), ("regional_patient_id", patient))
            if name in path_names
        }
        query = {
            name: value for name, value in (("mrn", mrn), ("institution", "H002")) if name in query_names
        }
        if path or query:
            targets.append(operation.as_strategy(mode, path_parameters=path or None, query=query or None))
    return st.one_of(operation.as_strategy(mode), *targets)


def sent_text(case: Any) -> str:
    return repr((case.formatted_path, case.path_parameters, case.query, case.body, case.headers)).lower()


def test_the_api_fuzzed_against_its_own_openapi_has_no_5xx_conforms_and_leaks_nothing_of_h002(
    hub: HubEnv,
) -> None:
    seeded = seed(hub)
    with console_server(hub) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        results = list(schema.get_all_operations())
        assert all(isinstance(result, Ok) for result in results), "the description is valid OpenAPI"
        operations = [result.ok() for result in results if isinstance(result, Ok)]
        assert len(operations) >= 9, [op.label for op in operations]
        tokens = {name: server.token(name) for name in EXAMPLES if name != "nobody"}
        failures: dict[tuple[str, ...], str] = {}
        counts: dict[str, int] = {}
        started = time.monotonic()

        for identity, examples in EXAMPLES.items():
            auth = {"Authorization": f"Bearer {tokens[identity]}"} if identity in tokens else {}
            secrets = {s.lower() for s in seeded.secrets()}
            for operation in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    run = fuzz(operation, mode, seeded, server.url, auth, secrets, identity, failures, counts)
                    settings = hypothesis.settings(
                        max_examples=examples,
                        deadline=None,
                        database=None,
                        phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=list(HealthCheck),
                        derandomize=True,  # the same requests every run: a failure is reproducible
                    )
                    try:
                        settings(run)()
                    except Unsatisfiable:
                        # an operation without parameters or body has no invalid input to make
                        assert mode is GenerationMode.NEGATIVE, operation.label
        elapsed = time.monotonic() - started
        nul_answers = probe_nul(server, seeded)

    total = sum(counts[name] for name in EXAMPLES if name in counts)
    print(f"\nfuzzed {total} requests in {elapsed:.1f} s: {dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(failures.values())
    assert all(status == 422 for status in nul_answers.values()), nul_answers
    assert counts.get("dr.icu", 0) >= 200 and counts.get("integ.h1", 0) >= 100, counts
    assert counts.get("dr.icu aimed at H002", 0) >= 20, "requests named H002's alert, patient and MRN"
    assert counts.get("dr.icu 200", 0) >= 20, "some answers carried data (the caller's own)"


def probe_nul(server: ConsoleServer, seeded: Seeded) -> dict[str, int]:
    """What the fuzzer found (500s): PostgreSQL text holds no NUL. Now a NUL in any path, query, JSON or
    form value of the API and the pages is a 422 naming where, for every operation, every time."""
    nul = "x\x00y"
    alert = f"/api/v1/alerts/{seeded.h1_alert}"
    probes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/api/v1/tokens", {"json": {"username": nul, "password": nul}}),
        ("GET", "/api/v1/alerts", {"params": {"ward": nul, "severity": nul, "institution": nul}}),
        ("GET", "/api/v1/alerts/x%00y", {}),
        ("POST", f"{alert}/acknowledge", {"json": {"patient_identifier": nul, "value": "6.9"}}),
        ("POST", f"{alert}/action", {"json": {"note": nul}}),
        ("GET", "/api/v1/acknowledged", {"params": {"ward": nul}}),
        ("GET", "/api/v1/patients/x%00y/timeline", {}),
        ("GET", f"/api/v1/patients/{seeded.h1_patient}/timeline", {"params": {"cursor": nul}}),
        ("GET", "/api/v1/patients", {"params": {"mrn": nul}}),
        ("GET", "/api/v1/unprocessable", {"params": {"before": nul}}),
        ("GET", "/api/v1/figures/acknowledgement", {"params": {"days": nul}}),
        ("GET", "/api/v1/audit", {"params": {"username": nul, "action": nul}}),
        ("GET", "/queue", {"params": {"ward": nul}}),
        ("GET", "/alerts/x%00y", {}),
        ("GET", "/patients", {"params": {"q": nul}}),
        ("POST", "/login", {"data": {"username": nul, "password": nul, "login_token": nul}}),
    ]
    with server.api("dr.icu") as api:
        return {
            f"{method} {path}": api.request(method, path, **kwargs).status_code
            for method, path, kwargs in probes
        }


def fuzz(
    operation: Any,
    mode: GenerationMode,
    seeded: Seeded,
    base_url: str,
    auth: dict[str, str],
    secrets: set[str],
    identity: str,
    failures: dict[tuple[str, ...], str],
    counts: dict[str, int],
) -> Callable[..., None]:
    """One Hypothesis test over one operation; failures are collected (one per kind), not shrunk."""

    @hypothesis.given(case=aimed(operation, mode, seeded))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=auth, timeout=30)
        sent = sent_text(case)
        for name in (identity, f"{identity} {response.status_code}"):
            counts[name] = counts.get(name, 0) + 1
        if seeded.h2_alert in sent or seeded.h2_patient in sent or H2_MRN.lower() in sent:
            counts[f"{identity} aimed at H002"] = counts.get(f"{identity} aimed at H002", 0) + 1
        curl = case.as_curl_command(headers=auth, base_url=base_url)
        where = f"{identity} {mode.value} {operation.label} -> {response.status_code}"
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except (AssertionError, FailureGroup) as exc:  # a check failed: keep the first of each kind
            key = (operation.label, identity, str(response.status_code), type(exc).__name__, str(exc)[:200])
            failures.setdefault(key, f"{where}\n{exc}\n{curl}\n{response.text[:800]}")
        text = response.text.lower()
        leaked = sorted(s for s in secrets if s in text and s not in sent)
        if leaked:
            key = (operation.label, identity, "leak", *leaked)
            failures.setdefault(key, f"{where}\nLEAKED {leaked}\n{curl}\n{response.text[:800]}")

    return run
