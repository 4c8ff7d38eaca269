"""The hub's main job end to end on embedded defaults: real Kafka and registry, Faust, SQLite."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import func, select

from clinhub.infra import kafka as kafka_service
from clinhub.infra import registry as registry_service
from clinhub.infra.process import stop_pid
from clinhub.infra.tls import write_private
from clinhub.provision import provision
from clinhub.services import stack_for
from core import principals
from core.settings import HubSettings

# The publishers' producers log through this logger (their idempotent producer config names it).
PRODUCER_LOGGER = "clinhub.kafka.producer"


class _TransientPidNotice(logging.Filter):
    """Drops librdkafka's notice that a fresh broker cannot hand out producer ids yet.

    On a new KRaft broker the first idempotent producer asks for a producer id (PID) before the
    broker has its first block of ids from the controller; the broker answers "Coordinator load in
    progress" and librdkafka retries by itself: `GETPID ... Failed to acquire idempotence PID from
    broker ...: Broker: Coordinator load in progress: retrying`. Only that notice, at warning level
    or below, is dropped: every other librdkafka line still shows, and a PID that never comes shows
    as undelivered events and a failed run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        transient = message.startswith("GETPID ") and "Coordinator load in progress" in message
        return not (transient and record.levelno <= logging.WARNING)


_TRANSIENT_PID_NOTICE = _TransientPidNotice()

# The demo's own short-lived readers (watermarks, the records it prints) log through this logger.
READER_LOGGER = "clinhub.kafka.demo-reader"


class _ClosedWhileConnecting(logging.Filter):
    """Drops the error a reader closed right after its work logs for its group coordinator connection,
    still in its SASL handshake when the client goes: `GroupCoordinator: SASL authentication error:
    SaslAuthenticateRequest failed: Local: Broker transport failure (after 0ms in state DOWN)`. A refused
    password reads `Authentication failed ... invalid credentials` instead, and still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "SaslAuthenticateRequest failed: Local: Broker transport failure" not in message


def _reader_config(settings: HubSettings, group: str) -> dict[str, Any]:
    logger = logging.getLogger(READER_LOGGER)
    if not logger.filters:
        logger.addFilter(_ClosedWhileConnecting())
    return {**settings.kafka.client_config(), "group.id": group, "logger": logger}


def ensure_key_file(path: Path) -> Path:
    """A local pseudonymisation key, created once in the git-ignored data folder; never committed."""
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode())  # 0600 from its creation
    return path


def _read_topic(
    settings: HubSettings, topic: str, since: dict[int, int], until: dict[int, int]
) -> list[dict[str, Any]]:
    """Every record of `topic` between two sets of offsets, decoded."""
    from confluent_kafka import Consumer, TopicPartition

    from schemas.wire import AvroDecoder, ConfluentRegistry

    decode = AvroDecoder(ConfluentRegistry(settings.registry.client_config()))
    consumer = Consumer(
        {**_reader_config(settings, f"demo-{secrets.token_hex(4)}"), "enable.auto.commit": False}
    )
    wanted = sum(max(0, until[p] - since.get(p, 0)) for p in until)
    consumer.assign([TopicPartition(topic, p, since.get(p, 0)) for p in until if until[p] > since.get(p, 0)])
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(records) < wanted and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        partition, offset = msg.partition(), msg.offset()
        if partition is not None and offset is not None and offset < until[partition]:
            records.append(decode(msg.value()))
    consumer.close()
    return records


def _high_watermarks(settings: HubSettings, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(_reader_config(settings, "demo-watermarks"))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    consumer.close()
    return marks


def _committed_through(settings: HubSettings, group: str, topic: str, ends: dict[int, int]) -> bool:
    """Has the consumer group committed every partition of `topic` up to `ends`?"""
    from streams.runtime.stalls import group_positions

    committed, _ = group_positions(settings.kafka.client_config(), group, [(topic, p) for p in ends])
    return all(committed[(topic, p)] >= end for p, end in ends.items())


def _wait_until(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _lab_row(row: Any) -> str:
    """A stored lab result: code, LOINC, value as sent, = value in the canonical unit (a bound with its
    comparator; text the rules cannot read shown as text)."""
    bound = row.value_comparator or ""
    sent = (
        row.value_text if row.original_value is None else f"{row.original_value:g} {row.original_unit or ''}"
    )
    canonical = f"{bound}{row.value:.4g} {row.unit or ''}" if row.value is not None else "(not judged)"
    loinc = row.loinc_code or "(unmapped)"
    return f"{row.institution_id} {row.local_code:8} -> LOINC {loinc:8} {sent:>14} = {canonical:16}"


def _show_written_results(engine: Any, event_ids: list[str]) -> None:
    """The results sent as real feeds write them, as the store holds them once normalised."""
    from sinks.models import Observation

    if not event_ids:
        return
    with engine.connect() as conn:
        rows = conn.execute(select(Observation).where(Observation.event_id.in_(event_ids))).all()
    typer.echo(
        "\nResults as laboratories write them (HI above the measuring range, MMOL/L, a LOINC as local code):"
    )
    for row in rows:
        text = f" (sent as {row.value_text!r})" if row.value_text else ""
        typer.echo(f"  {_lab_row(row)}{text}".rstrip())


def _show_shared_timeline(engine: Any) -> None:
    """The point of the hub: one patient's events from several institutions on one timeline."""
    from sinks.models import IdentifierLink
    from sinks.queries import patient_timeline

    with engine.connect() as conn:
        links = conn.execute(select(IdentifierLink.regional_patient_id, IdentifierLink.institution_id)).all()
    institutions: dict[str, set[str]] = {}
    for patient, institution in links:
        institutions.setdefault(patient, set()).add(institution)
    if not institutions:
        return
    patient = max(institutions, key=lambda p: (len(institutions[p]), p))
    page = patient_timeline(engine, patient, limit=12, newest_first=True)
    typer.echo(
        f"\nOne regional timeline, patient {patient[:15]} "
        f"(known at {', '.join(sorted(institutions[patient]))}):"
    )
    for entry in page.entries:
        value = f"{entry.value:g} {entry.unit or ''}" if entry.value is not None else ""
        typer.echo(
            f"  {entry.time:%Y-%m-%d %H:%M} {entry.institution_id:5} {entry.kind:10} "
            f"{entry.code or '':10} {entry.display or '':28.28} {value}"
        )


DEMO_CLINICIAN = "demo.clinician"


def _mllp_exchange(port: int, message: bytes, timeout: float = 60.0) -> bytes:
    """Send one framed message and read its ACK frame, as a sending system does."""
    import socket

    from producers.gateways.mllp import read_frames, wrap

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(wrap(message))
        received = b""
        while not read_frames(received):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    frames = read_frames(received)
    return frames[0] if frames else b""


V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ICD10 = "http://hl7.org/fhir/sid/icd-10"


def _coded(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    return {"coding": [coding]}


def _fhir_bundle(mrn: str, at: dt.datetime, stamp: str) -> dict[str, Any]:
    """A C003 transaction: the patient (referenced; its name reaches the store, never the gateway's
    ledger), a potassium, a diagnosis."""
    when = at.isoformat()
    patient = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'demo-patient-' + stamp)}"
    observation = {
        "resourceType": "Observation",
        "identifier": [{"system": "http://lis.c003.example/result", "value": f"FHIR-{stamp}-K"}],
        "status": "final",
        "category": [_coded(OBSERVATION_CATEGORY, "laboratory")],
        "code": _coded("http://lis.c003.example/codes", "K+", "Potassium"),
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "issued": when,
        "valueQuantity": {"value": 6.4, "unit": "meq/L"},
        "interpretation": [_coded(INTERPRETATION, "HH")],
    }
    condition = {
        "resourceType": "Condition",
        "identifier": [{"system": "http://his.c003.example/dx", "value": f"FHIR-{stamp}-DX"}],
        "clinicalStatus": _coded(CONDITION_CLINICAL, "active"),
        "code": _coded(ICD10, "E87.5", "Hyperkalaemia"),
        "subject": {"reference": patient},
        "recordedDate": when,
    }
    person = {
        "resourceType": "Patient",
        "identifier": [{"type": _coded(V2_0203, "MR"), "value": mrn}],
        "name": [{"use": "official", "family": "CHAN", "given": ["Siu", "Ming"]}],
        "gender": "female",
        "birthDate": "1957",
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient, "resource": person, "request": {"method": "POST", "url": "Patient"}},
            {"resource": observation, "request": {"method": "POST", "url": "Observation"}},
            {"resource": condition, "request": {"method": "POST", "url": "Condition"}},
        ],
    }


def _show_gateways(settings: HubSettings, data_dir: Path, seed: int) -> list[str]:
    """HL7 v2 over MLLP from H001 and H002 (one in GB 18030) and a FHIR transaction from C003, through the
    gateways as hospitals would send them; returns the MRNs, whose records the timeline then shows. The
    FHIR gateway serves HTTPS with a certificate of the local CA, which the client verifies."""
    import ssl
    import threading

    import httpx
    import uvicorn

    from clinhub.gateway_fhir import build_fhir_gateway
    from clinhub.gateway_mllp import start_mllp_gateway
    from clinhub.infra.tls import ensure_ca, issue_certificate
    from producers.gateways.fhir.auth import token_line
    from producers.gateways.hl7 import samples

    stamp = f"{seed % 100000:05d}"
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=10)
    token, line = token_line("C003")
    tokens = data_dir / "fhir-tokens.txt"
    tokens.write_text(line + "\n")
    tokens.chmod(0o600)
    tls_dir = stack_for(settings.infra).kafka.tls_dir  # the local CA, beside the broker's certificate
    ca = ensure_ca(tls_dir)
    served = issue_certificate(ca, tls_dir, "fhir-gateway", ["127.0.0.1", "localhost"])
    gateway_settings = settings.gateway.model_copy(
        update={
            "mllp_listeners": {"H001": 0, "H002": 0},
            "mllp_http_port": 0,
            "ledger_path": data_dir / "gateway-ledger.sqlite3",
            "fhir_tokens_file": tokens,
            "fhir_tls_cert_file": served.cert,
            "fhir_tls_key_file": served.key,
        }
    )
    gateway_hub = settings.model_copy(update={"gateway": gateway_settings})
    h001, h002 = f"HL7-{stamp}", f"GB{stamp}"
    messages = [
        ("H001", "ORU^R01 v2.5.1", samples.oru_r01("H001", mrn=h001, control_id=f"D{stamp}1", at=at)),
        (
            "H001",
            "ADT^A01",
            samples.adt("A01", "H001", mrn=h001, control_id=f"D{stamp}2", encounter_id=f"E{stamp}", at=at),
        ),
        ("H002", "ORU^R01 GB 18030", samples.oru_gb18030("H002", mrn=h002, control_id=f"D{stamp}3", at=at)),
    ]
    typer.echo("\nGateways: HL7 v2 over MLLP (H001, H002) and FHIR R4 (C003)")
    with start_mllp_gateway(gateway_hub) as gateway:
        for institution, label, message in messages:
            ack = _mllp_exchange(gateway.ports[institution], message)
            msa = next((seg for seg in ack.split(b"\r") if seg.startswith(b"MSA")), b"MSA|?")
            code = msa.split(b"|")[1].decode("ascii", "replace")
            typer.echo(f"  {institution} {label:17} -> ACK {code} (only once Kafka has every event)")
    fhir = build_fhir_gateway(gateway_hub)
    port = _free_port()
    server = uvicorn.Server(fhir.server_config("127.0.0.1", port))
    thread = threading.Thread(target=server.run, name="fhir-gateway", daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started, 20)
        url = f"{fhir.scheme}://127.0.0.1:{port}/"
        response = httpx.post(
            url,
            json=_fhir_bundle(f"FH{stamp}", at, stamp),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
            timeout=60,
            verify=ssl.create_default_context(cafile=str(ca.cert)),
        )
        statuses = [entry["response"]["status"] for entry in response.json().get("entry", [])]
        typer.echo(
            f"  C003 FHIR transaction Bundle -> HTTP {response.status_code}, entries {', '.join(statuses)}"
            f" (over {url}, verified against the local CA {ca.cert})"
        )
    finally:
        server.should_exit = True
        thread.join(15)
        fhir.close()
    return [f"HL7-{stamp}", f"GB{stamp}", f"FH{stamp}"]


def _show_refused_impersonation(settings: HubSettings, events: list[tuple[str, dict[str, Any]]]) -> None:
    """H001's own credentials on H002's raw topic: the broker's ACLs refuse it, typed and at once."""
    from core.contract import TopicNames
    from producers.exceptions import AccessRefusedError
    from producers.publisher import make_publisher

    lab = next((r for kind, r in events if kind == "lab" and r["envelope"]["institution_id"] == "H002"), None)
    if lab is None:
        return
    publisher = make_publisher(settings.as_principal("H001"), "H002")
    topic = TopicNames(settings.stream.topic_prefix).raw("H002", "lab")
    started = time.monotonic()
    try:
        publisher.publish("lab", lab)
        outcome = "ACCEPTED (the ACLs are missing!)"
    except AccessRefusedError as refused:
        outcome = f"refused in {time.monotonic() - started:.1f}s: {type(refused.refused).__name__}"
    finally:
        publisher.close(timeout=5)
    typer.echo(f"    H001's credentials publishing to {topic}: {outcome}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _show_gateway_records(engine: Any, mrns: list[str], since: dt.datetime, seconds: float = 60) -> bool:
    """What the gateways' messages became in the regional store (Chinese text as sent), and the name each
    institution sent for its patient (H002's in GB 18030), as patient_names keeps it."""
    from sqlalchemy import literal

    from sinks.models import Diagnosis, EncounterEvent, IdentifierLink, Observation, PatientName, UtcDateTime

    def names() -> list[Any]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        PatientName.institution_id,
                        PatientName.patient_mrn,
                        PatientName.family_name,
                        PatientName.given_name,
                    )
                    .where(PatientName.patient_mrn.in_(mrns))
                    .order_by(PatientName.institution_id)
                )
            )

    def patients() -> list[str]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(IdentifierLink.regional_patient_id).where(IdentifierLink.patient_mrn.in_(mrns))
                ).scalars()
            )

    def stored() -> bool:
        ids = patients()
        if len(ids) < len(mrns):
            return False
        with engine.connect() as conn:
            found = [
                conn.execute(select(column).where(patient.in_(ids)).limit(1)).first()
                for column, patient in (
                    (Observation.result_id, Observation.regional_patient_id),
                    (EncounterEvent.event_id, EncounterEvent.regional_patient_id),
                    (Diagnosis.diagnosis_id, Diagnosis.regional_patient_id),
                )
            ]
        return all(found) and len(names()) == len(mrns)

    done = _wait_until(stored, seconds)
    ids = patients()
    # this run's records only: the samples carry one national id, so earlier runs' are the same patient's
    after = literal(since, UtcDateTime)
    with engine.connect() as conn:
        labs = conn.execute(
            select(Observation)
            .where(Observation.regional_patient_id.in_(ids), Observation.ingested_time >= after)
            .order_by(Observation.institution_id)
        ).all()
        wards = conn.execute(
            select(EncounterEvent.institution_id, EncounterEvent.event_type, EncounterEvent.ward).where(
                EncounterEvent.regional_patient_id.in_(ids), EncounterEvent.ingested_time >= after
            )
        ).all()
        diagnoses = conn.execute(
            select(Diagnosis.institution_id, Diagnosis.icd10_code, Diagnosis.display).where(
                Diagnosis.regional_patient_id.in_(ids), Diagnosis.ingested_time >= after
            )
        ).all()
    typer.echo("  in the regional store:")
    for row in labs:
        typer.echo(f"    {_lab_row(row)}  {row.analyte or ''}".rstrip())
    for institution, event_type, ward in wards:
        typer.echo(f"    {institution} encounter {event_type} ward {ward}")
    for institution, code, display in diagnoses:
        typer.echo(f"    {institution} diagnosis {code} {display or ''}".rstrip())
    for institution, mrn, family, given in names():
        typer.echo(f"    {institution} patient {mrn}: family name {family or '—'}, given name {given or '—'}")
    return done


def _demo_password(data_dir: Path) -> tuple[str, bool]:
    """The demo clinician's password, made once and kept (owner-only) beside the demo's store."""
    import secrets

    path = data_dir / "console-demo.password"
    if path.exists():
        return path.read_text().strip(), False
    password = secrets.token_urlsafe(12)
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password, True


def _show_console(settings: HubSettings, data_dir: Path, keep_running: bool) -> None:
    """The clinician console over this run: an H001 alert acknowledged with read-back through its API."""
    import threading

    import httpx
    import uvicorn
    from prometheus_client import CollectorRegistry

    from clinhub.console_service import build_console
    from console.exceptions import InvalidInputError

    parts = build_console(settings, CollectorRegistry())
    password, new = _demo_password(data_dir)
    try:
        parts.console.accounts.add(
            DEMO_CLINICIAN, password, "clinician", display_name="Demo Clinician", institution_id="H001",
            chain_level=0, now=dt.datetime.now(dt.UTC),
        )  # fmt: skip
    except InvalidInputError:
        if new:  # an account from an earlier run whose password file is gone: set it again
            parts.console.accounts.set_password(DEMO_CLINICIAN, password, dt.datetime.now(dt.UTC))
    host, port = settings.console.host, settings.console.port
    server = uvicorn.Server(uvicorn.Config(parts.app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    if not _wait_until(lambda: server.started, 20):
        typer.echo(f"console did not start on {host}:{port}", err=True)
        raise typer.Exit(1)
    url = f"http://{host}:{port}"
    typer.echo(f"\nClinician console: {url}/  (sign in as {DEMO_CLINICIAN} / {password})")
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post("/api/v1/tokens", json={"username": DEMO_CLINICIAN, "password": password})
        token.raise_for_status()
        client.headers["Authorization"] = f"Bearer {token.json()['token']}"
        queue = client.get("/api/v1/alerts").json()
        typer.echo(f"  open H001 alerts in the demo clinician's queue: {len(queue)}")
        if queue:
            alert = queue[0]
            value = f"{alert['value_comparator'] or ''}{alert['value']:g}"
            done = client.post(
                f"/api/v1/alerts/{alert['alert_id']}/acknowledge",
                json={
                    "patient_identifier": alert["patient"]["mrn"] or alert["patient"]["regional_patient_id"],
                    "value": value,
                    "note": "demo: value read back, clinician informed",
                },
            )
            done.raise_for_status()
            typer.echo(
                f"  acknowledged {alert['analyte']} {value} {alert['unit']} with read-back "
                f"({done.json()['minutes_after_result']:.0f} min after the result); escalation stops"
            )

            def stored() -> bool:
                detail = client.get(f"/api/v1/alerts/{alert['alert_id']}").json()
                return any(ack["acknowledged_by"] == DEMO_CLINICIAN for ack in detail["acknowledgements"])

            where = "in the regional store" if _wait_until(stored, 30) else "NOT yet in the store after 30 s"
            typer.echo(f"  the acknowledgement is {where}, by {DEMO_CLINICIAN}")
        typer.echo(f"  OpenAPI description: {url}/openapi.json   metrics: {url}/metrics")
    if keep_running:
        typer.echo("  console running; Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            thread.join()
    server.should_exit = True
    thread.join(15)
    parts.engine.dispose()


def run_demo(settings: HubSettings, count: int, keep_running: bool, seed: int | None = None) -> None:
    from core.contract import TopicNames
    from producers.publisher import make_publisher
    from producers.simulator import results_as_laboratories_write_them, simulate_events
    from schemas.registration import register_standard
    from schemas.wire import ConfluentRegistry
    from sinks.models import Alert, IngestLog, Observation
    from sinks.privileges import OWNER
    from sinks.store import engine_for, upgrade
    from streams.domain.reference import load_reference

    stack = stack_for(settings.infra)
    # The demo's own clients (watermarks, reading topics) are the admin's; each part it starts connects
    # as its own principal: institutions, the worker, the gateways, the console.
    hub = settings
    settings = settings.as_principal(principals.ADMIN)
    logging.getLogger(PRODUCER_LOGGER).addFilter(_TRANSIENT_PID_NOTICE)
    typer.echo("1/6 starting Kafka (KRaft) and the schema registry (first run fetches them with Maven)...")
    kafka_service.start(stack.kafka)
    kafka_service.ensure_principals(
        stack.kafka, [*principals.SERVICE_PRINCIPALS, *settings.stream.institutions]
    )
    registry_service.start(stack.registry, [*principals.SERVICE_PRINCIPALS, *settings.stream.institutions])
    secured = "SASL_SSL, SCRAM, ACLs" if stack.kafka.secure else "plaintext"
    typer.echo(f"    kafka {stack.kafka.bootstrap} ({secured}), registry {stack.registry.url}")

    typer.echo("2/6 migrating the regional store, creating topics and ACLs, registering schemas...")
    engine = engine_for(settings.database.for_role(OWNER))
    upgrade(engine)
    topics = TopicNames(prefix=settings.stream.topic_prefix)
    provision(settings)
    register_standard(ConfluentRegistry(settings.registry.client_config()))
    load_reference()

    typer.echo("3/6 starting the Faust stream processor...")
    data_dir = settings.stream.data_dir.parent  # .data by default: git-ignored
    key_file = ensure_key_file(data_dir / "pseudonym.key")
    log_path = data_dir / "worker.log"
    env = {**os.environ, "CLINHUB_SECURITY_PSEUDONYM_KEY_FILE": str(key_file)}
    with log_path.open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "clinhub.cli", "stream", "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        alert_marks = _high_watermarks(settings, topics.alerts_topic)
        seed = int(time.time()) if seed is None else seed
        # The last three results are written as real feeds write them (HI, MMOL/L, a LOINC as local code).
        written = results_as_laboratories_write_them(seed) if count >= 3 else []
        events = simulate_events(seed, count - len(written), critical_share=0.15)
        events += [("lab", record) for record in written]
        kinds = Counter(kind for kind, _ in events)
        typer.echo(
            f"4/6 publishing {len(events)} events from H001, H002 and C003 (seed {seed}): "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        )
        delivered = 0
        for institution in sorted({r["envelope"]["institution_id"] for _, r in events}):
            publisher = make_publisher(hub, institution)  # as the institution's own principal
            for kind in kinds:
                mine = [r for k, r in events if k == kind and r["envelope"]["institution_id"] == institution]
                for record in mine:  # when it is published, not when it happened
                    record["envelope"]["produced_time"] = dt.datetime.now(dt.UTC)
                delivered += sum(
                    1 for r in publisher.publish_many(kind, mine) if not isinstance(r, Exception)
                )
            publisher.close()
        typer.echo(f"    {delivered} durably accepted by Kafka (acks=all)")
        _show_refused_impersonation(hub, events)

        typer.echo("5/6 waiting for the processor to normalise, judge and store them...")
        ids = [r["envelope"]["event_id"] for _, r in events]
        deadline = time.monotonic() + 180
        stored = 0
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                typer.echo(f"stream worker exited ({worker.returncode}); see {log_path}", err=True)
                raise typer.Exit(1)
            with engine.connect() as conn:
                stored = conn.execute(
                    select(func.count()).select_from(IngestLog).where(IngestLog.event_id.in_(ids))
                ).scalar_one()
            if stored >= len(ids):
                break
            time.sleep(1)
        lab_ids = [r["envelope"]["event_id"] for k, r in events if k == "lab"]
        # The clinical stage reads norm.lab in its own consumer group: the run's alerts are all on
        # alerts.critical once that group has committed past the run's normalised lab results.
        norm_lab_ends = _high_watermarks(settings, topics.norm("lab"))
        judged = _wait_until(
            lambda: _committed_through(settings, settings.stream.app_id, topics.norm("lab"), norm_lab_ends),
            60,
        )
        alerts = _read_topic(
            settings, topics.alerts_topic, alert_marks, _high_watermarks(settings, topics.alerts_topic)
        )
        latest = {str(alert["alert_id"]): alert for alert in alerts}  # each alert once (a replay: again)

        def alerts_stored() -> int:
            if not latest:
                return 0
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        select(func.count()).select_from(Alert).where(Alert.alert_id.in_(list(latest)))
                    ).scalar_one()
                )

        _wait_until(lambda: alerts_stored() >= len(latest), 60)
        stored_alerts = alerts_stored()

        typer.echo(
            f"6/6 results: {stored} of {len(ids)} events stored, {len(latest)} critical alerts on "
            f"{topics.alerts_topic}, {stored_alerts} in the store\n"
        )
        typer.echo("Critical-value alerts (from Kafka):")
        for alert in sorted(latest.values(), key=lambda a: a["result_time"]):
            typer.echo(
                f"  [{alert['severity']}] {alert['institution_id']} "
                f"patient {alert['regional_patient_id'][:15]}"
                f"  {alert['message']}"
            )
        typer.echo("\nLab results in the regional store (latest 8 of this run):")
        with engine.connect() as conn:
            rows = conn.execute(
                select(Observation)
                .where(Observation.event_id.in_(lab_ids))
                .order_by(Observation.effective_time.desc())
                .limit(8)
            ).all()
        for row in rows:
            typer.echo(
                f"  {_lab_row(row)} patient {row.regional_patient_id[:15]} at {row.effective_time:%H:%M:%S}"
            )
        _show_written_results(engine, [r["envelope"]["event_id"] for r in written])
        _show_shared_timeline(engine)
        gateways_started = dt.datetime.now(dt.UTC)
        gateway_mrns = _show_gateways(hub, data_dir, seed)
        gateways_stored = _show_gateway_records(engine, gateway_mrns, gateways_started)
        _show_console(hub, data_dir, keep_running)
        typer.echo(
            f"\nstore: {settings.database.url.get_secret_value()}  worker log: {log_path}  "
            f"at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
        )
        problems = [
            problem
            for problem, failed in (
                (f"{len(ids) - stored} events not stored", stored < len(ids)),
                ("the clinical stage did not finish the run's lab results", not judged),
                (
                    f"{len(latest)} alerts on Kafka, {stored_alerts} in the store",
                    stored_alerts != len(latest),
                ),
                ("the gateways' messages did not all reach the store", not gateways_stored),
            )
            if failed
        ]
        if problems:
            typer.echo(f"the run is incomplete: {'; '.join(problems)}", err=True)
            raise typer.Exit(1)
    finally:
        stop_pid(worker.pid, timeout=30)
        if not keep_running:
            registry_service.stop(stack.registry)
            kafka_service.stop(stack.kafka)
            typer.echo("services stopped (use --keep-running to leave them up)")
