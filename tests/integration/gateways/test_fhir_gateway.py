"""The FHIR R4 gateway on a real socket (uvicorn) against the real broker, registry and store; on HTTPS
and mutual TLS with certificates of a test CA (tests/certificates.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from clinhub.gateway_fhir import build_fhir_gateway, token_line
from clinhub.infra.process import free_port
from core.settings import GatewaySettings, HubSettings
from sinks.models import Observation
from tests.certificates import Pki, make_pki
from tests.certificates import client_context as client_tls
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[2] / "unit" / "producers" / "gateways" / "fhir" / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@dataclass
class Gateway:
    url: str
    token: str | None
    verify: ssl.SSLContext | bool = True  # the client's TLS context (its CA, and its certificate if any)

    def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        bearer = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.post(
            f"{self.url}{path}",
            content=json.dumps(body),
            headers={"Content-Type": "application/fhir+json", **bearer, **headers},
            timeout=60,
            verify=self.verify,
        )


@dataclass
class Served:
    gateway: Gateway
    stop: Any
    port: int
    tokens: dict[str, str]  # institution -> its bearer token


def serve(
    settings: HubSettings,
    workdir: Path,
    publish_timeout: float = 10.0,
    institutions: tuple[str, ...] = ("H001",),
    **tls: Any,
) -> Served:
    """A gateway with a token for each of `institutions` (H001's in `gateway`) on a free port, its tokens
    file and ledger under `workdir`; `tls`: its fhir_tls_* settings."""
    workdir.mkdir(parents=True, exist_ok=True)
    made = {institution: token_line(institution) for institution in institutions}
    tokens = workdir / "tokens"
    tokens.write_text("".join(f"{line}\n" for _token, line in made.values()))
    port = free_port()
    gateway_settings = GatewaySettings(
        host="127.0.0.1",
        fhir_port=port,
        fhir_tokens_file=tokens,
        ledger_path=workdir / "gateway-ledger.sqlite3",
        publish_timeout_seconds=publish_timeout,
        **tls,
    )
    built = build_fhir_gateway(settings.model_copy(update={"gateway": gateway_settings}))
    server = uvicorn.Server(built.server_config("127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the FHIR gateway did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)
        built.close()

    token_of = {institution: token for institution, (token, _line) in made.items()}
    url = f"{built.scheme}://127.0.0.1:{port}"
    return Served(Gateway(url, token_of.get("H001")), stop, port, token_of)


@pytest.fixture()
def gateway(hub: HubEnv, tmp_path: Path) -> Iterator[Gateway]:
    served = serve(hub.settings, tmp_path / "gateway")
    yield served.gateway
    served.stop()


def raw_records(
    hub: HubEnv, kind: str, key: str, value: str, timeout: float = 10.0, institution: str = "H001"
) -> list[dict[str, Any]]:
    """The records on raw.<institution>.<kind> whose `key` is `value` (reads for `timeout` seconds)."""
    decode = hub.decoder()
    messages = hub.consume_all(hub.topics.raw(institution, kind), timeout, lambda m: False)
    return [r for r in (decode(m.value()) for m in messages) if r[key] == value]


def unique_lab(name: str = "observation-lab-comparator") -> tuple[dict[str, Any], str]:
    resource = fixture(name)
    result_id = f"R-{uuid.uuid4().hex[:10]}"
    resource["identifier"][0]["value"] = result_id
    resource.pop("id", None)
    return resource, result_id


def test_lab_observation_reaches_the_store_as_sent_and_a_retry_makes_no_second_event(
    hub: HubEnv, gateway: Gateway
) -> None:
    hub.start_worker()
    resource, result_id = unique_lab()
    query = f"identifier=http://lis.h001.example/result|{result_id}"
    created = gateway.post("/Observation", resource, **{"If-None-Exist": query})
    assert created.status_code == 201, created.text
    assert created.headers["location"].endswith("/_history/1")

    def stored() -> Any:
        with hub.engine.connect() as conn:
            return conn.execute(
                select(Observation).where(
                    Observation.institution_id == "H001", Observation.result_id == result_id
                )
            ).one_or_none()

    wait_for(lambda: stored() is not None, hub, what="the FHIR lab result in the store")
    row = stored()
    assert row.value_comparator == ">"
    assert row.original_value == 600.0 and row.original_unit == "mg/dL"
    assert row.abnormal_flag == "HH" and row.loinc_code == "2345-7"

    again = gateway.post("/Observation", resource, **{"If-None-Exist": query})
    assert again.status_code == 200
    assert again.headers["location"] == created.headers["location"]
    assert len(raw_records(hub, "lab", "result_id", result_id)) == 1


def test_transaction_bundle_publishes_every_entry(hub: HubEnv, gateway: Gateway) -> None:
    bundle = fixture("bundle-transaction")
    suffix = uuid.uuid4().hex[:8]
    ids = {
        "lab": ("result_id", f"R-TX-{suffix}"),
        "diagnosis": ("diagnosis_id", f"D-TX-{suffix}"),
        "medication": ("order_id", f"O-TX-{suffix}"),
    }
    bundle["entry"][1]["resource"]["identifier"][0]["value"] = ids["lab"][1]
    bundle["entry"][1]["request"]["ifNoneExist"] = f"identifier={ids['lab'][1]}"
    bundle["entry"][2]["resource"]["identifier"][0]["value"] = ids["diagnosis"][1]
    bundle["entry"][3]["resource"]["identifier"][0]["value"] = ids["medication"][1]
    response = gateway.post("/", bundle)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == [
        "200 OK",
        "201 Created",
        "201 Created",
        "201 Created",
    ]
    for kind, (key, value) in ids.items():
        records = raw_records(hub, kind, key, value, timeout=5)
        assert len(records) == 1, kind
        assert records[0]["patient_mrn"] in ("MRN0000077", "MRN0000042")


def test_kafka_unreachable_is_503_and_a_retry_on_a_working_broker_publishes_once(
    hub: HubEnv, gateway: Gateway, tmp_path: Path
) -> None:
    closed = free_port()
    down_settings = hub.settings.model_copy(
        update={"kafka": hub.settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{closed}"})}
    )
    broken = serve(down_settings, tmp_path / "broken", publish_timeout=3.0)
    try:
        resource, result_id = unique_lab("observation-lab-string")
        refused = broken.gateway.post("/Observation", resource)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"]
        outcome = refused.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "transient"
        ready = httpx.get(f"{broken.gateway.url}/readyz", timeout=30)
        assert ready.status_code == 503
    finally:
        broken.stop()

    accepted = gateway.post("/Observation", resource)
    assert accepted.status_code == 201, accepted.text
    records = raw_records(hub, "lab", "result_id", result_id)
    assert len(records) == 1  # the refused attempt put nothing on the topic
    assert records[0]["value_text"] == " 6.80 (haemolysed) "
    assert httpx.get(f"{gateway.url}/readyz", timeout=30).status_code == 200


def test_a_transaction_kafka_did_not_commit_is_503_and_its_retry_publishes_each_entry_once(
    hub: HubEnv, gateway: Gateway, tmp_path: Path
) -> None:
    bundle = fixture("bundle-transaction")
    result_id, diagnosis_id = f"R-TX-{uuid.uuid4().hex[:8]}", f"D-TX-{uuid.uuid4().hex[:8]}"
    bundle["entry"][1]["resource"]["identifier"][0]["value"] = result_id
    bundle["entry"][1]["request"].pop("ifNoneExist", None)
    bundle["entry"][2]["resource"]["identifier"][0]["value"] = diagnosis_id
    closed = free_port()
    down_settings = hub.settings.model_copy(
        update={"kafka": hub.settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{closed}"})}
    )
    broken = serve(down_settings, tmp_path / "broken", publish_timeout=3.0)
    try:
        refused = broken.gateway.post("/", bundle)
        assert refused.status_code == 503, refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"
    finally:
        broken.stop()
    assert raw_records(hub, "lab", "result_id", result_id, timeout=3) == []

    accepted = gateway.post("/", bundle)
    assert accepted.status_code == 200, accepted.text
    assert len(raw_records(hub, "lab", "result_id", result_id)) == 1
    assert len(raw_records(hub, "diagnosis", "diagnosis_id", diagnosis_id, timeout=3)) == 1


# --- HTTPS and mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, the gateway's certificate, and client certificates for H001 and a LIS no one mapped."""
    return make_pki(tmp_path_factory.mktemp("fhir-pki"))


def tls_settings(pki: Pki, mutual: bool) -> dict[str, Any]:
    return {
        "fhir_tls_cert_file": pki["server"].cert,
        "fhir_tls_key_file": pki["server"].key,
        "fhir_tls_client_ca_file": pki["ca"].cert if mutual else None,
    }


@pytest.fixture()
def https(hub: HubEnv, tmp_path: Path, pki: Pki) -> Iterator[Served]:
    served = serve(hub.settings, tmp_path / "https", **tls_settings(pki, mutual=False))
    served.gateway.verify = client_tls(pki)
    yield served
    served.stop()


@pytest.fixture()
def mutual(hub: HubEnv, tmp_path: Path, pki: Pki) -> Iterator[Served]:
    served = serve(hub.settings, tmp_path / "mtls", institutions=("H001", "H002"), **tls_settings(pki, True))
    yield served
    served.stop()


def test_https_with_a_token_publishes_and_plain_http_is_refused(hub: HubEnv, https: Served) -> None:
    assert https.gateway.url.startswith("https://")
    resource, result_id = unique_lab("observation-lab-string")
    created = https.gateway.post("/Observation", resource)
    assert created.status_code == 201, created.text
    (record,) = raw_records(hub, "lab", "result_id", result_id)
    assert record["envelope"]["institution_id"] == "H001"

    with pytest.raises(httpx.TransportError):  # the server closes: no HTTP answer on its TLS port
        httpx.post(
            f"http://127.0.0.1:{https.port}/Observation",
            content=json.dumps(resource),
            headers={
                "Authorization": f"Bearer {https.gateway.token}",
                "Content-Type": "application/fhir+json",
            },
            timeout=10,
        )


def test_mutual_tls_certificate_of_h001_publishes_as_h001_without_token(
    hub: HubEnv, mutual: Served, pki: Pki
) -> None:
    gateway = Gateway(mutual.gateway.url, None, client_tls(pki, "h001"))
    resource, result_id = unique_lab()
    created = gateway.post("/Observation", resource)
    assert created.status_code == 201, created.text
    (record,) = raw_records(hub, "lab", "result_id", result_id)
    assert record["envelope"]["institution_id"] == "H001"
    assert (
        httpx.get(f"{gateway.url}/metadata", verify=gateway.verify, timeout=10).json()["rest"][0]["security"][
            "service"
        ][1]["coding"][0]["code"]
        == "Certificates"
    )


def test_mutual_tls_without_a_client_certificate_is_refused_at_the_handshake(
    mutual: Served, pki: Pki
) -> None:
    def exchange(context: ssl.SSLContext) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", mutual.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as connection,
        ):
            connection.sendall(b"GET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return connection.recv(12)

    assert exchange(client_tls(pki, "h001")) == b"HTTP/1.1 200"  # the same exchange, with a certificate
    # TLS 1.2: the client's handshake ends only after the server has its certificate, so it fails there
    tls12 = client_tls(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        exchange(tls12)
    # TLS 1.3: the client's handshake ends first; the server then refuses it and closes, never answering
    try:
        answer = exchange(client_tls(pki))
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b""
    # and with a token it is no different: nothing reaches HTTP without a certificate
    tokened = Gateway(mutual.gateway.url, mutual.tokens["H001"], client_tls(pki))
    with pytest.raises(httpx.TransportError):
        tokened.post("/Observation", unique_lab()[0])


def test_mutual_tls_certificate_of_no_institution_is_403(hub: HubEnv, mutual: Served, pki: Pki) -> None:
    resource, result_id = unique_lab("observation-lab-string")
    for token in (None, mutual.tokens["H001"]):  # a valid token does not make up for it
        refused = Gateway(mutual.gateway.url, token, client_tls(pki, "stranger")).post(
            "/Observation", resource
        )
        assert refused.status_code == 403, refused.text
        issue = refused.json()["issue"][0]
        assert issue["code"] == "forbidden"
        assert "'stranger-lis.example' names no institution" in issue["diagnostics"]
    assert raw_records(hub, "lab", "result_id", result_id, timeout=3) == []


def test_mutual_tls_certificate_of_h001_with_a_token_of_h002_is_403(
    hub: HubEnv, mutual: Served, pki: Pki
) -> None:
    resource, result_id = unique_lab("observation-lab-string")
    gateway = Gateway(mutual.gateway.url, mutual.tokens["H002"], client_tls(pki, "h001"))
    refused = gateway.post("/Observation", resource)
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "H001's" in body["issue"][0]["diagnostics"] and "H002's" in body["issue"][0]["diagnostics"]
    for institution in ("H001", "H002"):
        assert raw_records(hub, "lab", "result_id", result_id, timeout=3, institution=institution) == []
