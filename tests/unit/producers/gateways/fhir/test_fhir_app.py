"""The FHIR gateway's HTTP behaviour with a fake publisher: auth, status codes, OperationOutcome paths,
Location, If-None-Exist, Bundles in request order, metrics."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from producers.exceptions import DeliveryFailedError, TransactionFailedError
from producers.gateways.fhir.app import create_fhir_app
from producers.gateways.fhir.auth import parse_tokens, token_digest, token_line
from producers.gateways.fhir.ledger import ResourceLedger
from producers.publisher import Receipt
from producers.validation import check_event
from schemas import standard

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN_H001 = secrets.token_urlsafe(16)
TOKEN_H002 = secrets.token_urlsafe(16)
FHIR = {"Content-Type": "application/fhir+json"}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


class FakePublisher:
    """Validates like the real one, 'publishes' into a list; `down` makes every delivery fail."""

    def __init__(self, institution: str) -> None:
        self.institution = institution
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.down = False

    def validate(self, kind: str, record: Mapping[str, Any]) -> None:
        check_event(kind, record, standard.load(standard.KIND_SCHEMAS[kind]), self.institution)

    def publish_events(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[object]:
        for kind, record in events:
            self.validate(kind, record)
        ids = [str(r["envelope"]["event_id"]) for _k, r in events]
        if self.down:
            return [DeliveryFailedError(event_id, "Local: Message timed out", True) for event_id in ids]
        self.published += [(kind, dict(r)) for kind, r in events]
        return [Receipt(event_id, "raw", 0, i) for i, event_id in enumerate(ids)]

    def publish_atomically(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[object]:
        """One transaction: all published, or (down) TransactionFailedError and none."""
        for kind, record in events:
            self.validate(kind, record)
        ids = [str(r["envelope"]["event_id"]) for _k, r in events]
        if self.down:
            raise TransactionFailedError(ids, "Local: Message timed out")
        self.published += [(kind, dict(r)) for kind, r in events]
        return [Receipt(event_id, "raw", 0, i) for i, event_id in enumerate(ids)]


@pytest.fixture()
def publishers() -> dict[str, FakePublisher]:
    return {"H001": FakePublisher("H001"), "H002": FakePublisher("H002")}


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "fhir-ledger.sqlite3"


def make_client(publishers: dict[str, FakePublisher], ledger_path: Path, **options: Any) -> TestClient:
    tokens = {token_digest(TOKEN_H001): "H001", token_digest(TOKEN_H002): "H002"}
    app = create_fhir_app(
        publishers.__getitem__,
        tokens,
        CollectorRegistry(),
        lambda: None,
        ResourceLedger(ledger_path),
        **options,
    )
    return TestClient(app)


@pytest.fixture()
def client(publishers: dict[str, FakePublisher], ledger_path: Path) -> TestClient:
    return make_client(publishers, ledger_path, max_body_bytes=4096)


def auth(token: str = TOKEN_H001, **extra: str) -> dict[str, str]:
    return {**FHIR, "Authorization": f"Bearer {token}", **extra}


def post(client: TestClient, path: str, body: Any, **headers: str) -> Any:
    return client.post(path, content=json.dumps(body), headers=auth(**headers))


def expressions(response: Any) -> list[str]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert response.headers["content-type"].startswith("application/fhir+json")
    return [e for issue in body["issue"] for e in issue.get("expression", [])]


def test_metadata_is_an_r4_capability_statement(client: TestClient) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement" and body["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert types == {"Observation", "Encounter", "MedicationRequest", "Condition"}
    assert {i["code"] for i in body["rest"][0]["interaction"]} == {"transaction", "batch"}


def test_create_answers_201_with_location(client: TestClient, publishers: dict[str, FakePublisher]) -> None:
    response = post(client, "/Observation", fixture("observation-lab-comparator"))
    assert response.status_code == 201, response.text
    location = response.headers["location"]
    assert location.startswith("Observation/") and location.endswith("/_history/1")
    body = response.json()
    assert body["id"] == location.split("/")[1] and body["meta"]["versionId"] == "1"
    assert "name" not in body["contained"][0]  # the contained Patient's name is not kept
    ((kind, record),) = publishers["H001"].published
    assert kind == "lab" and record["value_comparator"] == ">" and record["value_numeric"] == 600.0


def test_each_resource_type_is_created(client: TestClient, publishers: dict[str, FakePublisher]) -> None:
    for path, name in [
        ("/Observation", "observation-vitals-bp"),
        ("/Encounter", "encounter-transfer"),
        ("/MedicationRequest", "medicationrequest"),
        ("/Condition", "condition"),
    ]:
        assert post(client, path, fixture(name)).status_code == 201, name
    assert [k for k, _ in publishers["H001"].published] == ["vitals", "encounter", "medication", "diagnosis"]


def test_institution_comes_from_the_token(client: TestClient, publishers: dict[str, FakePublisher]) -> None:
    post(client, "/Observation", fixture("observation-lab-comparator"), Authorization=f"Bearer {TOKEN_H002}")
    assert publishers["H001"].published == []
    ((_kind, record),) = publishers["H002"].published
    assert record["envelope"]["institution_id"] == "H002"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic dXNlcjpwYXNz", "Bearer "])
def test_missing_or_wrong_token_is_401(client: TestClient, header: str | None) -> None:
    headers = dict(FHIR)
    if header is not None:
        headers["Authorization"] = header
    response = client.post("/Observation", content=json.dumps(fixture("condition")), headers=headers)
    assert response.status_code == 401
    assert response.json()["issue"][0]["code"] == "login"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_unparseable_json_is_400(client: TestClient) -> None:
    response = client.post("/Observation", content=b"{not json", headers=auth())
    assert response.status_code == 400 and response.json()["resourceType"] == "OperationOutcome"


def test_nan_is_not_json(client: TestClient) -> None:
    text = json.dumps(fixture("observation-lab-string")).replace(
        '"valueString": " 6.80 (haemolysed) "', '"valueInteger": NaN'
    )
    assert client.post("/Observation", content=text, headers=auth()).status_code == 400


def test_wrong_resource_type_is_400(client: TestClient) -> None:
    response = post(client, "/Observation", fixture("condition"))
    assert response.status_code == 400 and expressions(response) == ["resourceType"]


def test_invalid_value_is_400_with_its_path(client: TestClient) -> None:
    response = post(client, "/Observation", fixture("invalid-value-not-decimal"))
    assert response.status_code == 400 and expressions(response) == ["Observation.valueQuantity.value"]


@pytest.mark.parametrize(
    ("name", "expression"),
    [
        ("unmappable-no-mrn", "Observation.subject.identifier.value"),
        ("unmappable-status", "Observation.status"),
    ],
)
def test_unmappable_is_422_with_its_path(client: TestClient, name: str, expression: str) -> None:
    response = post(client, "/Observation", fixture(name))
    assert response.status_code == 422 and expressions(response) == [expression]


def test_body_too_large_is_413(client: TestClient, publishers: dict[str, FakePublisher]) -> None:
    resource = fixture("observation-lab-string")
    resource["note"] = [{"text": "x" * 5000}]
    response = post(client, "/Observation", resource)
    assert response.status_code == 413 and response.json()["resourceType"] == "OperationOutcome"
    assert publishers["H001"].published == []


def test_not_json_content_type_is_415(client: TestClient) -> None:
    headers = {**auth(), "Content-Type": "application/fhir+xml"}
    assert client.post("/Observation", content=b"<Observation/>", headers=headers).status_code == 415


def test_unsupported_type_is_404_outcome(client: TestClient) -> None:
    response = post(client, "/Patient", {"resourceType": "Patient"})
    assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"


def test_kafka_not_confirming_is_503_and_nothing_recorded(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    publishers["H001"].down = True
    resource = fixture("observation-lab-string")
    query = "identifier=http://lis.h001.example/result|R-20261123-0101"
    response = post(client, "/Observation", resource, **{"If-None-Exist": query})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["issue"][0]["code"] == "transient"
    publishers["H001"].down = False
    retried = post(client, "/Observation", resource, **{"If-None-Exist": query})
    assert retried.status_code == 201  # not found in the ledger: the failed attempt recorded nothing
    assert len(publishers["H001"].published) == 1


def test_same_content_again_gives_the_same_location_and_event_ids(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    first = post(client, "/Observation", fixture("observation-lab-string"))
    second = post(client, "/Observation", fixture("observation-lab-string"))
    assert first.headers["location"] == second.headers["location"]
    ids = {r["envelope"]["event_id"] for _k, r in publishers["H001"].published}
    assert len(ids) == 1


def test_if_none_exist_returns_the_existing_and_publishes_nothing(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client = make_client(publishers, ledger_path)
    query = "identifier=http://lis.h001.example/result|R-20261123-0101"
    first = post(client, "/Observation", fixture("observation-lab-string"), **{"If-None-Exist": query})
    assert first.status_code == 201
    changed = fixture("observation-lab-string")
    changed["valueString"] = "7.1"
    # a new gateway on the same ledger file: it survives a restart
    again = post(make_client(publishers, ledger_path), "/Observation", changed, **{"If-None-Exist": query})
    assert again.status_code == 200
    assert again.headers["location"] == first.headers["location"]
    assert len(publishers["H001"].published) == 1
    # value only, any system; another institution's If-None-Exist does not see H001's resources
    assert (
        post(client, "/Observation", changed, **{"If-None-Exist": "identifier=R-20261123-0101"}).status_code
        == 200
    )
    other = post(
        client, "/Observation", changed, **{"If-None-Exist": query, "Authorization": f"Bearer {TOKEN_H002}"}
    )
    assert other.status_code == 201


def test_if_none_exist_with_an_unsupported_parameter_is_400(client: TestClient) -> None:
    response = post(client, "/Observation", fixture("observation-lab-string"), **{"If-None-Exist": "code=K"})
    assert response.status_code == 400 and expressions(response) == ["If-None-Exist"]


def test_transaction_publishes_every_entry_and_answers_in_order(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    response = post(client, "/", fixture("bundle-transaction"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["200 OK", "201 Created", "201 Created", "201 Created"]
    assert [e["response"]["location"].split("/")[0] for e in body["entry"][1:]] == [
        "Observation",
        "Condition",
        "MedicationRequest",
    ]
    published = publishers["H001"].published
    assert sorted(k for k, _ in published) == ["diagnosis", "lab", "medication"]
    lab = next(r for k, r in published if k == "lab")
    assert (lab["patient_mrn"], lab["patient_birth_year"], lab["patient_sex"]) == ("MRN0000077", 1971, "male")
    # the bundled Patient's name travels with the events of that patient, for H001's own users only
    assert (lab["patient_family_name"], lab["patient_given_name"]) == ("Ouyang", "Xiaoming")


def test_transaction_retry_with_if_none_exist_publishes_nothing_new(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    post(client, "/", fixture("bundle-transaction"))
    count = len(publishers["H001"].published)
    again = post(client, "/", fixture("bundle-transaction")).json()
    assert again["entry"][1]["response"]["status"] == "200 OK"  # ifNoneExist matched
    new = publishers["H001"].published[count:]
    assert {r["envelope"]["event_id"] for _k, r in new} <= {
        r["envelope"]["event_id"] for _k, r in publishers["H001"].published[:count]
    }


def test_transaction_with_one_bad_entry_publishes_nothing(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    bundle = fixture("bundle-transaction")
    bundle["entry"][3]["resource"]["status"] = "bogus"
    response = post(client, "/", bundle)
    assert response.status_code == 422
    assert expressions(response) == ["Bundle.entry[3].resource.status"]
    assert publishers["H001"].published == []


def test_transaction_with_invalid_fhir_names_the_entry(client: TestClient) -> None:
    bundle = fixture("bundle-transaction")
    bundle["entry"][1]["resource"]["valueQuantity"] = {"value": "six"}
    response = post(client, "/", bundle)
    assert response.status_code == 400
    assert expressions(response) == ["Bundle.entry[1].resource.valueQuantity.value"]


def test_transaction_when_kafka_is_down_is_503(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    publishers["H001"].down = True
    response = post(client, "/", fixture("bundle-transaction"))
    assert response.status_code == 503 and "retry-after" in response.headers
    publishers["H001"].down = False
    again = post(client, "/", fixture("bundle-transaction")).json()
    assert [e["response"]["status"] for e in again["entry"]][1] == "201 Created"  # nothing was recorded


def test_batch_answers_each_entry_on_its_own_in_order(
    client: TestClient, publishers: dict[str, FakePublisher]
) -> None:
    response = post(client, "/", fixture("bundle-batch"))
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "batch-response"
    entries = body["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "201 Created",
        "422 Unprocessable Entity",
        "201 Created",
    ]
    assert entries[1]["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[1].resource.subject"]
    assert [k for k, _ in publishers["H001"].published] == ["lab", "encounter"]


def test_bundle_of_another_type_is_400(client: TestClient) -> None:
    bundle = copy.deepcopy(fixture("bundle-batch"))
    bundle["type"] = "collection"
    response = post(client, "/", bundle)
    assert response.status_code == 400 and expressions(response) == ["Bundle.type"]


def test_bundle_entry_with_another_method_is_400(client: TestClient) -> None:
    bundle = fixture("bundle-transaction")
    bundle["entry"][2]["request"]["method"] = "PUT"
    response = post(client, "/", bundle)
    assert response.status_code == 400 and expressions(response) == ["Bundle.entry[2].request.method"]


def test_health_readiness_and_metrics(publishers: dict[str, FakePublisher], ledger_path: Path) -> None:
    registry = CollectorRegistry()
    problem: list[str | None] = [None]
    app = create_fhir_app(
        publishers.__getitem__,
        {token_digest(TOKEN_H001): "H001"},
        registry,
        lambda: problem[0],
        ResourceLedger(ledger_path),
    )
    client = TestClient(app)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    problem[0] = "kafka: no broker"
    assert client.get("/readyz").status_code == 503
    post(client, "/Observation", fixture("observation-lab-string"))
    post(client, "/Observation", fixture("unmappable-status"))
    client.post("/Observation", content=b"{}", headers=FHIR)
    text = client.get("/metrics").text
    assert 'clinhub_gateway_messages_received_total{gateway="fhir",institution="H001"} 2.0' in text
    assert 'clinhub_gateway_messages_accepted_total{gateway="fhir",institution="H001"} 1.0' in text
    assert 'reason="unmappable"' in text and 'reason="unauthorized"' in text
    assert 'clinhub_gateway_events_published_total{gateway="fhir",institution="H001",kind="lab"} 1.0' in text
    assert "clinhub_gateway_response_seconds_bucket" in text


def test_token_line_round_trip() -> None:
    token, line = token_line("H001")
    assert parse_tokens(f"# tokens\n\n{line}\n") == {token_digest(token): "H001"}
    assert len(token) >= 40


# --- client certificates (mutual TLS): the server puts the ASGI TLS extension in the scope -------------


def certificate_pem(cn: str) -> str:
    """A self-signed certificate for `cn`: the app trusts what the server verified, so any will do here."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(now)
    certificate = builder.not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


class WithClientCertificate:
    """What TLSScopeProtocol does on a mutual TLS connection: the client certificate in the scope."""

    def __init__(self, app: Any, pem: str | None) -> None:
        self.app, self.pem = app, pem

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.pem is not None:
            chain = [self.pem]
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": chain, "tls_version": 0x0304}}}
        await self.app(scope, receive, send)


def certificate_client(
    publishers: dict[str, FakePublisher], ledger_path: Path, cn: str | None, mutual_tls: bool = True
) -> tuple[TestClient, CollectorRegistry]:
    registry = CollectorRegistry()
    app = create_fhir_app(
        publishers.__getitem__,
        {token_digest(TOKEN_H001): "H001", token_digest(TOKEN_H002): "H002"},
        registry,
        lambda: None,
        ResourceLedger(ledger_path),
        mutual_tls=mutual_tls,
        certificate_institutions={"lis.h002.example": "H002"},
        institutions={"H001", "H002"},
    )
    return TestClient(WithClientCertificate(app, None if cn is None else certificate_pem(cn))), registry


def test_a_client_certificate_is_the_institution_without_token(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, registry = certificate_client(publishers, ledger_path, "H001")
    response = client.post(
        "/Observation", content=json.dumps(fixture("observation-lab-comparator")), headers=FHIR
    )
    assert response.status_code == 201, response.text
    ((_kind, record),) = publishers["H001"].published
    assert record["envelope"]["institution_id"] == "H001"
    assert (
        registry.get_sample_value(
            "clinhub_gateway_messages_accepted_total", {"gateway": "fhir", "institution": "H001"}
        )
        == 1.0
    )


def test_a_mapped_certificate_cn_and_its_own_token(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, _ = certificate_client(publishers, ledger_path, "lis.h002.example")
    response = post(
        client, "/Observation", fixture("observation-lab-comparator"), Authorization=f"Bearer {TOKEN_H002}"
    )
    assert response.status_code == 201, response.text
    assert publishers["H001"].published == [] and len(publishers["H002"].published) == 1


def test_a_certificate_and_another_institutions_token_is_403(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, registry = certificate_client(publishers, ledger_path, "H001")
    response = post(
        client, "/Observation", fixture("observation-lab-comparator"), Authorization=f"Bearer {TOKEN_H002}"
    )
    assert response.status_code == 403
    issue = response.json()["issue"][0]
    assert (
        issue["code"] == "forbidden" and "H001's" in issue["diagnostics"] and "H002's" in issue["diagnostics"]
    )
    assert "www-authenticate" not in response.headers
    assert publishers["H001"].published == [] and publishers["H002"].published == []
    assert (
        registry.get_sample_value(
            "clinhub_gateway_messages_rejected_total",
            {"gateway": "fhir", "institution": "-", "reason": "forbidden"},
        )
        == 1.0
    )


def test_a_certificate_of_no_institution_is_403(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, _ = certificate_client(publishers, ledger_path, "stranger-lis")
    response = client.post("/Observation", content=json.dumps(fixture("condition")), headers=FHIR)
    assert response.status_code == 403
    assert "'stranger-lis' names no institution" in response.json()["issue"][0]["diagnostics"]


def test_without_mutual_tls_a_certificate_in_the_scope_is_not_a_credential(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, _ = certificate_client(publishers, ledger_path, "H001", mutual_tls=False)
    response = client.post("/Observation", content=json.dumps(fixture("condition")), headers=FHIR)
    assert response.status_code == 401
    assert publishers["H001"].published == []


def test_metadata_names_certificates_with_mutual_tls(
    publishers: dict[str, FakePublisher], ledger_path: Path
) -> None:
    client, _ = certificate_client(publishers, ledger_path, None)
    services = client.get("/metadata").json()["rest"][0]["security"]["service"]
    assert [s["coding"][0]["code"] for s in services] == ["Bearer", "Certificates"]
    plain = make_client(publishers, ledger_path).get("/metadata").json()["rest"][0]["security"]["service"]
    assert [s["coding"][0]["code"] for s in plain] == ["Bearer"]
