"""The MLLP gateway on real sockets and the real broker: ACK rules, resends, dead letters, GB 18030, TLS.

Each test runs the gateway in-process (`start_mllp_gateway`) on free ports, over the test's own topic
prefix and database (`hub`). The broker outage uses a second Kafka started and stopped by the test, so
the session broker is never stopped.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from clinhub.gateway_mllp import RunningGateway, start_mllp_gateway
from clinhub.infra import kafka
from clinhub.infra.process import free_port
from clinhub.infra.registry import RegistryLayout
from core.settings import GatewaySettings, HubSettings
from producers.gateways.hl7 import samples
from producers.gateways.hl7.charset import decode_message
from producers.gateways.hl7.mapping import map_message
from producers.gateways.mllp import Frame, MLLPFramer, wrap
from sinks.models import Diagnosis, Encounter, IngestLog, Observation, PatientName
from tests.integration.conftest import HubEnv, broker_layout, running_hub
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

RECEIVED = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


# --- helpers ------------------------------------------------------------------------------------------------


def gateway_settings(settings: HubSettings, workdir: Path, **overrides: Any) -> HubSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "mllp_listeners": {"H001": 0, "H002": 0},
        "mllp_http_port": 0,
        "ledger_path": workdir / "mllp-ledger.sqlite3",
        "publish_timeout_seconds": 5.0,
        "mllp_idle_timeout_seconds": 30.0,
        **overrides,
    }
    return settings.model_copy(update={"gateway": GatewaySettings(**values)})


@contextmanager
def gateway(settings: HubSettings) -> Iterator[RunningGateway]:
    running = start_mllp_gateway(settings)
    try:
        yield running
    finally:
        running.stop()


class Client:
    """An MLLP sender: frames out, ACK frames back (read as bytes)."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None, timeout: float = 60.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self.framer = MLLPFramer(10_000_000)
        self.pending: list[bytes] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def acks(self, count: int) -> list[bytes]:
        while len(self.pending) < count:
            data = self.sock.recv(65_536)
            if not data:
                raise ConnectionError(f"connection closed after {len(self.pending)} of {count} ACKs")
            self.pending += [e.payload for e in self.framer.feed(data) if isinstance(e, Frame)]
        out, self.pending = self.pending[:count], self.pending[count:]
        return out

    def send(self, message: bytes) -> bytes:
        self.send_raw(wrap(message))
        return self.acks(1)[0]

    def close(self) -> None:
        self.sock.close()


def parse_ack(ack: bytes, codec: str = "utf-8") -> dict[str, Any]:
    segments = [s.split("|") for s in ack.decode(codec).split("\r") if s]
    msh = segments[0]
    msa = next(s for s in segments if s[0] == "MSA")
    return {
        "code": msa[1],
        "control_id": msa[2] if len(msa) > 2 else "",
        "charset": msh[17] if len(msh) > 17 else "",
        "errors": [s for s in segments if s[0] == "ERR"],
        "text": ack.decode(codec),
    }


def event_ids(raw: bytes, institution: str) -> dict[str, list[str]]:
    """The events the gateway derives from a message (same mapping, deterministic ids), by kind."""
    out: dict[str, list[str]] = {}
    for kind, record in map_message(decode_message(raw), institution, RECEIVED).events:
        out.setdefault(kind, []).append(record["envelope"]["event_id"])
    return out


def raw_topic_counts(hub: HubEnv, institution: str, kinds: set[str], timeout: float = 15.0) -> dict[str, int]:
    """How many messages on the raw topics carry each event id (read to the end)."""
    counts: dict[str, int] = {}
    for kind in kinds:
        topic = hub.topics.raw(institution, kind)
        messages = hub.consume_all(topic, timeout, lambda m, t=topic: _at_end(hub, t, m))
        for message in messages:
            for key, value in message.headers() or []:
                if key == "event_id":
                    counts[value.decode()] = counts.get(value.decode(), 0) + 1
    return counts


def _at_end(hub: HubEnv, topic: str, messages: list[Any]) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**hub.settings.kafka.client_config(), "group.id": "probe"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        )
    finally:
        consumer.close()
    return len(messages) >= total


def stored(hub: HubEnv, ids: list[str]) -> int:
    with hub.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(IngestLog.event_id.in_(ids))).scalar_one())


def dead_letters(hub: HubEnv, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    decode = hub.decoder()
    messages = hub.consume_all(hub.topics.deadletter_topic, timeout, lambda m: len(m) >= count)
    return [decode(m.value()) for m in messages]


def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    for family in gw.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def all_ids(ids: dict[str, list[str]]) -> list[str]:
    return [i for v in ids.values() for i in v]


# --- accepted messages --------------------------------------------------------------------------------------


def test_oru_adt_and_orders_are_acknowledged_after_kafka_and_reach_the_store(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir)
    h001 = [
        samples.oru_r01("H001", control_id="IT-ORU-1"),
        samples.adt("A01", "H001", control_id="IT-ADT-1"),
        samples.adt("A02", "H001", control_id="IT-ADT-2"),
        samples.adt("A08", "H001", control_id="IT-ADT-8", version="2.3.1"),
        samples.rde_o11("H001", control_id="IT-RDE-1"),
    ]
    h002 = [samples.omp_o09("H002", control_id="IT-OMP-1"), samples.oru_gb18030("H002", control_id="IT-GB-0")]
    with gateway(settings) as gw:
        client = Client(gw.ports["H001"])
        answers = [parse_ack(client.send(m)) for m in h001]
        client.close()
        client = Client(gw.ports["H002"])
        answers += [parse_ack(client.send(m), "gb18030") for m in h002]
        client.close()
        assert [a["code"] for a in answers] == ["AA"] * 7, [a["text"] for a in answers]
        assert [a["control_id"] for a in answers] == [
            "IT-ORU-1",
            "IT-ADT-1",
            "IT-ADT-2",
            "IT-ADT-8",
            "IT-RDE-1",
            "IT-OMP-1",
            "IT-GB-0",
        ]
        # AA means on Kafka: every derived event is on its raw topic already, once
        expected = {"H001": {}, "H002": {}}  # type: dict[str, dict[str, list[str]]]
        for institution, messages in (("H001", h001), ("H002", h002)):
            for message in messages:
                for kind, ids in event_ids(message, institution).items():
                    expected[institution].setdefault(kind, []).extend(ids)
        for institution, by_kind in expected.items():
            counts = raw_topic_counts(hub, institution, set(by_kind))
            for ids in by_kind.values():
                assert all(counts.get(i) == 1 for i in ids), (institution, counts)
        assert metric(gw, "clinhub_gateway_messages_accepted_total", institution="H001") == 5
        health = httpx.get(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=10)
        ready = httpx.get(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=10)
        scraped = httpx.get(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10).text
        assert health.status_code == 200 and ready.status_code == 200, ready.text
        assert 'clinhub_gateway_messages_received_total{gateway="mllp",institution="H001"} 5.0' in scraped
        assert "clinhub_gateway_response_seconds_bucket" in scraped
    hub.start_worker()
    ids = [i for by_kind in expected.values() for i in all_ids(by_kind)]
    wait_for(lambda: stored(hub, ids) == len(ids), hub, what="every gateway event in the store")


def test_many_concurrent_connections(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir)
    connections, per_connection = 8, 6
    results: dict[int, list[dict[str, Any]]] = {}
    messages = {
        c: [
            samples.oru_r01("H001", mrn=f"MRN9{c:02d}{n:04d}", control_id=f"CC-{c}-{n}", potassium=f"4.{n}")
            for n in range(per_connection)
        ]
        for c in range(connections)
    }
    with gateway(settings) as gw:

        def sender(c: int) -> None:
            client = Client(gw.ports["H001"])
            # pipelined: all frames sent first, then the ACKs read in order
            for message in messages[c]:
                client.send_raw(wrap(message))
            results[c] = [parse_ack(a) for a in client.acks(per_connection)]
            client.close()

        threads = [threading.Thread(target=sender, args=(c,)) for c in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert metric(gw, "clinhub_mllp_connections_total", institution="H001") == connections
    for c in range(connections):
        assert [a["code"] for a in results[c]] == ["AA"] * per_connection
        assert [a["control_id"] for a in results[c]] == [f"CC-{c}-{n}" for n in range(per_connection)]
    ids = [i for c in messages for m in messages[c] for i in all_ids(event_ids(m, "H001"))]
    assert len(ids) == len(set(ids))
    hub.start_worker()
    wait_for(lambda: stored(hub, ids) == len(ids), hub, what="the events of 8 connections in the store")


# --- rejected messages --------------------------------------------------------------------------------------


def test_malformed_frames_and_messages_get_ae_or_ar_with_err_and_a_dead_letter(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir, mllp_max_frame_bytes=4096)
    good = samples.oru_r01("H001", control_id="MF-GOOD")
    truncated = good[:180]
    no_msh = b"PID|1||MRN1^^^H001^MR||WANG^Li\rOBX|1|NM|K^Potassium^L||5.0|mmol/L|||||F\r"
    wrong_encoding = samples.oru_r01("H001", control_id="MF-ENC").replace(b"MSH|^~\\&|", b"MSH|^^^^|", 1)
    garbage = bytes(range(256)) * 3
    garbage = garbage.replace(b"\x0b", b"").replace(b"\x1c", b"")
    unknown_charset = samples.oru_r01("H001", control_id="MF-CS").replace(b"UNICODE UTF-8", b"KLINGON-8")
    wrong_bytes = samples.oru_gb18030("H001", control_id="MF-GB", charset="UNICODE UTF-8")
    unsupported = samples.unsupported("H001", control_id="MF-SIU")
    other_institution = samples.oru_r01("H002", control_id="MF-H002")
    oversized = samples.oru_r01("H001", control_id="MF-BIG").replace(
        b"OBX|5|ST|COMMENT^Comment^L||", b"OBX|5|ST|COMMENT^Comment^L||" + b"x" * 6000
    )
    with gateway(settings) as gw:
        client = Client(gw.ports["H001"])
        # noise before the first frame, then a frame cut short by the next start block
        client.send_raw(b"\r\nnoise\x00" + b"\x0b" + truncated + wrap(good))
        cut, after = (parse_ack(a) for a in client.acks(2))
        assert cut["code"] == "AR" and cut["errors"], cut["text"]
        assert "truncated" in cut["text"]
        assert after["code"] == "AA" and after["control_id"] == "MF-GOOD"
        answers = {
            "no_msh": parse_ack(client.send(no_msh)),
            "wrong_encoding": parse_ack(client.send(wrong_encoding)),
            "garbage": parse_ack(client.send(garbage)),
            "unknown_charset": parse_ack(client.send(unknown_charset)),
            "wrong_bytes": parse_ack(client.send(wrong_bytes), "latin-1"),
            "unsupported": parse_ack(client.send(unsupported)),
            "other_institution": parse_ack(client.send(other_institution)),
            "oversized": parse_ack(client.send(oversized)),
        }
        # the connection is still usable after all that: frames resynchronise at the next start block
        assert parse_ack(client.send(samples.adt("A04", "H001", control_id="MF-AFTER")))["code"] == "AA"
        client.close()
        for name, answer in answers.items():
            assert answer["code"] in ("AE", "AR"), (name, answer["text"])
            assert answer["errors"], (name, answer["text"])
        assert answers["unsupported"]["code"] == "AR" and "SIU" in answers["unsupported"]["text"]
        assert answers["oversized"]["code"] == "AR" and "4096" in answers["oversized"]["text"]
        assert answers["oversized"]["control_id"] == "MF-BIG"
        for name in (
            "no_msh",
            "wrong_encoding",
            "garbage",
            "unknown_charset",
            "wrong_bytes",
            "other_institution",
        ):
            assert answers[name]["code"] == "AE", (name, answers[name]["text"])
        assert (
            "MSH^1^18" in answers["unknown_charset"]["text"]
            and "KLINGON" in answers["unknown_charset"]["text"]
        )
        assert answers["other_institution"]["control_id"] == "MF-H002"
        assert metric(gw, "clinhub_mllp_garbage_bytes_total", institution="H001") == len(b"\r\nnoise\x00")
        assert metric(gw, "clinhub_mllp_frames_oversized_total", institution="H001") == 1
        assert (
            metric(gw, "clinhub_gateway_messages_rejected_total", institution="H001", reason="unsupported")
            == 1
        )
    sent = {
        truncated: "truncated",
        no_msh: "no_msh",
        wrong_encoding: "wrong_encoding",
        garbage: "garbage",
        unknown_charset: "unknown_charset",
        wrong_bytes: "wrong_bytes",
        unsupported: "unsupported",
        other_institution: "other_institution",
    }
    letters = dead_letters(hub, len(sent) + 1)
    by_value = {bytes(d["original_value"]): d for d in letters}
    for raw, name in sent.items():
        assert raw in by_value, f"no dead letter with the raw bytes of {name}"
        letter = by_value[raw]
        assert letter["processor"] == "gateway-mllp" and letter["institution_id"] == "H001"
        assert letter["original_topic"] == "mllp:H001" and letter["reason"]
    big = [d for d in letters if d["error_class"] == "HL7ContentError" and "4096" in d["reason"]]
    assert big and oversized.startswith(bytes(big[0]["original_value"]))
    assert by_value[unknown_charset]["field"] == "MSH-18"


def test_idle_connection_is_closed(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir, mllp_idle_timeout_seconds=1.0)
    with gateway(settings) as gw:
        client = Client(gw.ports["H001"], timeout=10)
        started = time.monotonic()
        assert client.sock.recv(10) == b""
        assert time.monotonic() - started < 8
        assert metric(gw, "clinhub_mllp_idle_closed_total", institution="H001") == 1


# --- resends ------------------------------------------------------------------------------------------------


def test_resend_gets_the_original_ack_and_publishes_nothing_also_after_a_restart(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir)
    message = samples.oru_r01("H001", mrn="MRN0007777", control_id="RS-1")
    bad = samples.oru_r01("H001", control_id="RS-BAD").replace(b"UNICODE UTF-8", b"EBCDIC-X")
    ids = event_ids(message, "H001")
    with gateway(settings) as gw:
        client = Client(gw.ports["H001"])
        first = client.send(message)
        again = client.send(message)
        first_bad = client.send(bad)
        again_bad = client.send(bad)
        client.close()
        assert parse_ack(first)["code"] == "AA"
        assert again == first
        assert parse_ack(first_bad)["code"] == "AE" and again_bad == first_bad
        assert metric(gw, "clinhub_mllp_resends_total", institution="H001") == 2
    with gateway(settings) as gw:  # a restarted gateway, same ledger file
        client = Client(gw.ports["H001"])
        assert client.send(message) == first
        assert client.send(bad) == first_bad
        client.close()
    counts = raw_topic_counts(hub, "H001", set(ids))
    assert all(counts.get(i) == 1 for i in all_ids(ids)), counts
    hub.start_worker()
    wait_for(lambda: stored(hub, all_ids(ids)) == len(all_ids(ids)), hub, what="the resent message's events")


# --- character sets -----------------------------------------------------------------------------------------


def test_gb18030_message_reaches_the_store_intact_and_its_ack_carries_msh18(hub: HubEnv) -> None:
    """Issue 13: a GB 18030 message whose patient name reaches the store intact (with its ward, test name
    and diagnosis text), though the GBK bytes of 區 and 瑋東 hold `^` and `|`."""
    family, given = samples.TRAP_FAMILY_NAME, samples.TRAP_GIVEN_NAME
    assert any(b in samples.TRAP_WARD.encode("gb18030")[1::2] for b in (b"|"[0], b"^"[0]))
    assert (family + given).encode("gb18030")[1::2] == b"^||"
    settings = gateway_settings(hub.settings, hub.workdir)
    oru = samples.oru_gb18030("H002", mrn="0000000042", control_id="GB-ORU-1")
    assert f"|{family}^{given}^".encode("gb18030") in oru
    adt_text = samples.adt("A01", "H002", mrn="0000000042", control_id="GB-ADT-1").decode("utf-8")
    adt_text = (
        adt_text.replace("UNICODE UTF-8", "GBK")
        .replace("PV1|1|I|ICU^", f"PV1|1|I|{samples.TRAP_WARD}^")
        .replace("|WANG^Li^", f"|{family}^{given}^")
    )
    adt = adt_text.encode("gb18030")
    assert adt.count(b"|") > adt_text.count("|")  # the trap: raw bytes hold more `|` than the text
    with gateway(settings) as gw:
        client = Client(gw.ports["H002"])
        oru_ack, adt_ack = client.send(oru), client.send(adt)
        client.close()
    oru_answer, adt_answer = parse_ack(oru_ack, "gb18030"), parse_ack(adt_ack, "gb18030")
    assert oru_answer["code"] == "AA" and oru_answer["charset"] == "GB 18030-2000", oru_answer["text"]
    assert adt_answer["code"] == "AA" and adt_answer["charset"] == "GBK", adt_answer["text"]
    ids = all_ids(event_ids(oru, "H002")) + all_ids(event_ids(adt, "H002"))
    hub.start_worker()
    wait_for(lambda: stored(hub, ids) == len(ids), hub, what="the GB 18030 events in the store")
    with hub.engine.connect() as conn:
        wards = conn.execute(select(Encounter.ward).where(Encounter.institution_id == "H002")).scalars().all()
        analytes = (
            conn.execute(select(Observation.analyte).where(Observation.institution_id == "H002"))
            .scalars()
            .all()
        )
        displays = (
            conn.execute(select(Diagnosis.display).where(Diagnosis.institution_id == "H002")).scalars().all()
        )
        names = conn.execute(
            select(
                PatientName.institution_id,
                PatientName.patient_mrn,
                PatientName.family_name,
                PatientName.given_name,
            )
        ).all()
    assert samples.TRAP_WARD in wards, wards  # ADT PV1-3 in GBK, second bytes `|`/`^`
    assert samples.TRAP_DISPLAY in analytes, analytes  # ORU OBX-3.2 in GB 18030
    assert "低钾血症(東區)" in displays, displays  # DG1-4
    # PID-5 in GB 18030 (ORU) and GBK (ADT): the name exactly as sent, once, for H002's MRN
    assert [tuple(row) for row in names] == [("H002", "0000000042", family, given)], names


# --- broker outage ------------------------------------------------------------------------------------------


def test_broker_outage_gives_ar_and_the_resend_once_it_is_back_gives_aa_and_one_event(
    schema_registry: RegistryLayout, postgres_cluster: Any, tmp_path: Path
) -> None:
    layout = broker_layout(tmp_path / "kafka2")
    process = kafka.start(layout)
    try:
        with running_hub(layout, schema_registry, postgres_cluster, tmp_path) as hub:
            settings = gateway_settings(hub.settings, hub.workdir, publish_timeout_seconds=3.0)
            message = samples.oru_r01("H001", mrn="MRN0005555", control_id="OUT-1")
            ids = all_ids(event_ids(message, "H001"))
            with gateway(settings) as gw:
                client = Client(gw.ports["H001"])
                assert parse_ack(client.send(samples.adt("A04", "H001", control_id="OUT-0")))["code"] == "AA"
                process.stop()
                started = time.monotonic()
                refused = parse_ack(client.send(message))
                assert refused["code"] == "AR", refused["text"]
                assert refused["control_id"] == "OUT-1" and refused["errors"]
                assert time.monotonic() - started < 30
                assert httpx.get(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=20).status_code == 503
                process = kafka.start(layout)
                deadline = time.monotonic() + 120
                while True:  # the sender resends until it gets an AA
                    answer = parse_ack(client.send(message))
                    if answer["code"] == "AA" or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                assert answer["code"] == "AA", answer["text"]
                client.close()
                assert metric(gw, "clinhub_gateway_messages_rejected_total", reason="unavailable") >= 1
            hub.start_worker()
            wait_for(lambda: stored(hub, ids) == len(ids), hub, what="the events once the broker was back")
            counts = raw_topic_counts(hub, "H001", set(event_ids(message, "H001")))
            assert all(counts.get(i, 0) >= 1 for i in ids)
    finally:
        process.stop()


# --- TLS and mutual TLS -------------------------------------------------------------------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA; the server's certificate; clients H001, h2-lis (mapped to H002), and a stranger."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(
        cn: str, issuer_key: Any, issuer: x509.Name | None, ca: bool, server: bool = False
    ) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer or name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    def write(stem: str, key: Any, cert: Any) -> None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = issue("clinhub test CA", None, None, ca=True)
    write("ca", ca_key, ca_cert)
    for stem, cn, server in (("server", "localhost", True), ("h001", "H001", False), ("h2", "h2-lis", False)):
        key, cert = issue(cn, ca_key, ca_cert.subject, ca=False, server=server)
        write(stem, key, cert)
    rogue_key, rogue_cert = issue("rogue CA", None, None, ca=True)
    key, cert = issue("H001", rogue_key, rogue_cert.subject, ca=False)
    write("rogue", key, cert)
    return {stem: directory / f"{stem}.crt" for stem in ("ca", "server", "h001", "h2", "rogue")}


def _client_context(certs: Path, stem: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if stem is not None:
        context.load_cert_chain(str(certs / f"{stem}.crt"), str(certs / f"{stem}.key"))
    return context


def _refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the gateway serves no ACK on this connection (handshake refused or closed after it)."""
    try:
        client = Client(port, context, timeout=15)
        ack = client.send(samples.adt("A04", "H001", control_id="TLS-NO"))
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return not ack


def test_mutual_tls_serves_the_right_certificate_and_refuses_the_others(hub: HubEnv) -> None:
    pytest.importorskip("cryptography")
    certs_dir = hub.workdir / "certs"
    _certificates(certs_dir)
    settings = gateway_settings(
        hub.settings,
        hub.workdir,
        mllp_tls_cert_file=certs_dir / "server.crt",
        mllp_tls_key_file=certs_dir / "server.key",
        mllp_tls_client_ca_file=certs_dir / "ca.crt",
        mllp_tls_client_institutions={"h2-lis": "H002"},
    )
    with gateway(settings) as gw:
        client = Client(gw.ports["H001"], _client_context(certs_dir, "h001"))
        assert parse_ack(client.send(samples.adt("A04", "H001", control_id="TLS-1")))["code"] == "AA"
        client.close()
        client = Client(gw.ports["H002"], _client_context(certs_dir, "h2"))
        assert parse_ack(client.send(samples.omp_o09("H002", control_id="TLS-2")))["code"] == "AA"
        client.close()
        assert _refused(gw.ports["H001"], _client_context(certs_dir, None))  # no certificate
        assert _refused(gw.ports["H002"], _client_context(certs_dir, "h001"))  # another institution's CN
        assert _refused(gw.ports["H001"], _client_context(certs_dir, "rogue"))  # CN H001, untrusted CA
        plain = Client(gw.ports["H001"], timeout=15)  # no TLS at all
        with pytest.raises((ConnectionError, OSError)):
            plain.send(samples.adt("A04", "H001", control_id="TLS-PLAIN"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            metric(
                gw, "clinhub_mllp_connections_refused_total", institution="H002", reason="client_certificate"
            )
            < 1
            or metric(gw, "clinhub_mllp_connections_refused_total", institution="H001", reason="tls") < 3
        ):
            time.sleep(0.2)
        assert (
            metric(
                gw, "clinhub_mllp_connections_refused_total", institution="H002", reason="client_certificate"
            )
            == 1
        )
        assert metric(gw, "clinhub_mllp_connections_refused_total", institution="H001", reason="tls") == 3


# --- the process --------------------------------------------------------------------------------------------


def test_clinhub_gateway_mllp_serves_and_stops_cleanly_on_sigterm(hub: HubEnv) -> None:
    import json
    import subprocess
    import sys

    port, http_port = free_port(), free_port()
    env = {
        **hub.env(),
        "CLINHUB_GATEWAY_MLLP_LISTENERS": json.dumps({"H001": port}),
        "CLINHUB_GATEWAY_MLLP_HTTP_PORT": str(http_port),
        "CLINHUB_GATEWAY_LEDGER_PATH": str(hub.workdir / "cli-ledger.sqlite3"),
    }
    log_path = hub.workdir / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clinhub.cli", "gateway", "mllp"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=hub.workdir,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "MLLP gateway listening" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.2)
        client = Client(port)
        assert parse_ack(client.send(samples.adt("A04", "H001", control_id="CLI-1")))["code"] == "AA"
        assert httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10).status_code == 200
        proc.terminate()
        assert proc.wait(60) == 0, log_path.read_text(errors="replace")
        client.close()
        text = log_path.read_text(errors="replace")
        assert f"H001 :{port}" in text and "MLLP gateway stopped" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_connections_over_the_maximum_are_refused(hub: HubEnv) -> None:
    settings = gateway_settings(hub.settings, hub.workdir, mllp_max_connections=2)
    with gateway(settings) as gw:
        first, second = Client(gw.ports["H001"]), Client(gw.ports["H002"])
        assert parse_ack(first.send(samples.adt("A04", "H001", control_id="MAX-1")))["code"] == "AA"
        third = Client(gw.ports["H001"], timeout=10)
        assert third.sock.recv(10) == b""  # closed at once
        assert metric(gw, "clinhub_mllp_connections_refused_total", reason="max_connections") == 1
        assert parse_ack(second.send(samples.omp_o09("H002", control_id="MAX-2")))["code"] == "AA"
        for client in (first, second, third):
            client.close()


def test_stop_lets_the_message_in_flight_be_answered(hub: HubEnv) -> None:
    """SIGTERM's path: no new connections, but the message being published still gets its AA."""
    from producers.publisher import Receipt

    publishing = threading.Event()

    class SlowPublisher:
        def validate(self, kind: str, record: Any) -> None:
            return None

        def publish_many(self, kind: str, records: Any) -> list[Any]:
            return self.publish_events([(kind, r) for r in records])

        def publish_events(self, events: Any) -> list[Any]:
            publishing.set()
            time.sleep(2)
            return [Receipt(r["envelope"]["event_id"], kind, 0, 0) for kind, r in events]

        def close(self, timeout: float | None = None) -> None:
            return None

    class NoDeadLetters:
        def publish(self, record: Any, key: bytes | None) -> None:
            raise AssertionError("nothing is rejected here")

    settings = gateway_settings(hub.settings, hub.workdir)
    gw = start_mllp_gateway(
        settings, publishers={"H001": SlowPublisher(), "H002": SlowPublisher()}, dead_letters=NoDeadLetters()
    )
    client = Client(gw.ports["H001"])
    client.send_raw(wrap(samples.adt("A04", "H001", control_id="STOP-1")))
    assert publishing.wait(10)
    stopper = threading.Thread(target=gw.stop)
    stopper.start()
    assert parse_ack(client.acks(1)[0])["code"] == "AA"
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        Client(gw.ports["H001"], timeout=5).send(samples.adt("A04", "H001", control_id="STOP-2"))
