"""The FHIR R4 gateway on a real socket (uvicorn) against the real broker, registry and store."""

from __future__ import annotations

import json
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
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[2] / "unit" / "producers" / "gateways" / "fhir" / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@dataclass
class Gateway:
    url: str
    token: str

    def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}",
            content=json.dumps(body),
            headers={
                "Content-Type": "application/fhir+json",
                "Authorization": f"Bearer {self.token}",
                **headers,
            },
            timeout=60,
        )


@dataclass
class Served:
    gateway: Gateway
    stop: Any


def serve(settings: HubSettings, workdir: Path, publish_timeout: float = 10.0) -> Served:
    """A gateway for H001 on a free port, its tokens file and ledger under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    token, line = token_line("H001")
    tokens = workdir / "tokens"
    tokens.write_text(f"{line}\n")
    port = free_port()
    gateway_settings = GatewaySettings(
        host="127.0.0.1",
        fhir_port=port,
        fhir_tokens_file=tokens,
        ledger_path=workdir / "gateway-ledger.sqlite3",
        publish_timeout_seconds=publish_timeout,
    )
    built = build_fhir_gateway(settings.model_copy(update={"gateway": gateway_settings}))
    server = uvicorn.Server(uvicorn.Config(built.app, host="127.0.0.1", port=port, log_level="warning"))
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

    return Served(Gateway(f"http://127.0.0.1:{port}", token), stop)


@pytest.fixture()
def gateway(hub: HubEnv, tmp_path: Path) -> Iterator[Gateway]:
    served = serve(hub.settings, tmp_path / "gateway")
    yield served.gateway
    served.stop()


def raw_records(hub: HubEnv, kind: str, key: str, value: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The records on raw.H001.<kind> whose `key` is `value` (reads for `timeout` seconds)."""
    decode = hub.decoder()
    messages = hub.consume_all(hub.topics.raw("H001", kind), timeout, lambda m: False)
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
