"""HL7 ORU^R01 messages per second through the MLLP gateway, against a plain frame-decode-map loop.

    .venv/bin/python benchmarks/mllp_bench.py [--messages 2000] [--connections 8] [--json PATH]

Starts its own Kafka (KRaft) and schema registry on free loopback ports, creates the hub's topics, and
runs the gateway in-process (`clinhub.gateway_mllp.start_mllp_gateway`) on free ports. Then measures, on
the same ORU^R01 messages (v2.5.1, UTF-8, 6 lab OBX, 2 vital signs, 1 DG1: 8 events each, distinct MSH-10
and MRN per message so the ledger never short-cuts one):
  baseline     a plain loop that only frames (MLLPFramer), decodes (MSH-18) and maps each message to its
               regional records: the floor any MLLP receiver pays, no network, no Kafka;
  1 conn       one MLLP connection, one message at a time, each answered AA only after every event is
               durably on Kafka (acks=all, idempotent);
  N conns      N connections at once (threads), each one message at a time, AA after durable publish.
Figures are messages/s (and events/s), with ratios to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.local_services import services
from clinhub.gateway_mllp import start_mllp_gateway
from clinhub.provision import provision
from core.settings import (
    DatabaseSettings,
    GatewaySettings,
    HubSettings,
    InfraSettings,
    KafkaSettings,
    RegistrySettings,
    SecuritySettings,
    StreamSettings,
)
from producers.gateways.hl7 import samples
from producers.gateways.hl7.charset import decode_message
from producers.gateways.hl7.mapping import map_message
from producers.gateways.mllp import Frame, MLLPFramer, wrap


def messages(run: str, count: int) -> list[bytes]:
    return [
        samples.oru_r01(
            "H001", mrn=f"B{run}{n:07d}", control_id=f"BENCH-{run}-{n}", potassium=f"{3 + n % 40 / 10:.1f}"
        )
        for n in range(count)
    ]


def baseline(batch: list[bytes]) -> tuple[float, int]:
    """Messages/s of frame + decode + map; the number of events made."""
    stream = b"".join(wrap(m) for m in batch)
    received = dt.datetime.now(dt.UTC)
    events = 0
    started = time.perf_counter()
    framer = MLLPFramer(1_048_576)
    for chunk in range(0, len(stream), 65_536):
        for event in framer.feed(stream[chunk : chunk + 65_536]):
            if isinstance(event, Frame):
                events += len(map_message(decode_message(event.payload), "H001", received).events)
    elapsed = time.perf_counter() - started
    return len(batch) / elapsed, events


class Sender:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.framer = MLLPFramer(1_048_576)

    def send(self, message: bytes) -> bytes:
        self.sock.sendall(wrap(message))
        while True:
            data = self.sock.recv(65_536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            frames = [e.payload for e in self.framer.feed(data) if isinstance(e, Frame)]
            if frames:
                return frames[0]


def through_gateway(port: int, batch: list[bytes], connections: int) -> float:
    """Messages/s through `connections` MLLP connections, each sending one message at a time."""
    shares = [batch[i::connections] for i in range(connections)]
    refused: list[bytes] = []
    senders = [Sender(port) for _ in range(connections)]
    barrier = threading.Barrier(connections + 1)

    def work(sender: Sender, share: list[bytes]) -> None:
        barrier.wait()
        for message in share:
            ack = sender.send(message)
            if b"MSA|AA|" not in ack:
                refused.append(ack)

    threads = [
        threading.Thread(target=work, args=(s, share)) for s, share in zip(senders, shares, strict=True)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for sender in senders:
        sender.sock.close()
    if refused:
        raise SystemExit(f"{len(refused)} messages not accepted; first ACK: {refused[0]!r}")
    return len(batch) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000, help="ORU messages per measurement")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="clinhub-mllp-bench-"))
    try:
        with services(workdir) as (kafka, registry):
            figures = run(workdir, kafka, registry, args.messages, args.connections)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"written {args.json}")


def run(
    workdir: Path, kafka: KafkaSettings, registry: RegistrySettings, count: int, connections: int
) -> dict[str, object]:
    prefix = f"bench{secrets.token_hex(3)}."
    settings = HubSettings(
        kafka=kafka,
        registry=registry,
        database=DatabaseSettings(url=f"sqlite:///{workdir / 'unused.sqlite3'}"),  # type: ignore[arg-type]
        security=SecuritySettings(),
        stream=StreamSettings(topic_prefix=prefix, institutions=("H001",), data_dir=workdir / "faust"),
        infra=InfraSettings(metrics_port=0),
        gateway=GatewaySettings(
            host="127.0.0.1",
            mllp_listeners={"H001": 0},
            mllp_http_port=0,
            ledger_path=workdir / "ledger.sqlite3",
            publish_timeout_seconds=30.0,
        ),
    )
    provision(settings)  # topics and every principal's ACLs

    warm, single, many = messages("W", 50), messages("A", count), messages("B", count)
    base, events = baseline(single)
    per_message = events // count
    print(f"{count} ORU^R01 messages, {per_message} events each; {connections} connections for the last row")
    print(
        f"baseline   frame + decode + map      {base:9.0f} msg/s {base * per_message:10.0f} events/s   1.000x"
    )

    gateway = start_mllp_gateway(settings)
    try:
        port = gateway.ports["H001"]
        through_gateway(port, warm, 1)  # schema lookups, producer connections, first batches
        one = through_gateway(port, single, 1)
        print(
            f"1 conn     MLLP, AA after acks=all   {one:9.0f} msg/s "
            f"{one * per_message:10.0f} events/s   {one / base:.3f}x"
        )
        concurrent = through_gateway(port, many, connections)
        print(
            f"{connections} conns    MLLP, AA after acks=all   {concurrent:9.0f} msg/s "
            f"{concurrent * per_message:10.0f} events/s   {concurrent / base:.3f}x"
            f"   ({concurrent / one:.2f}x one connection)"
        )
    finally:
        gateway.stop()
    return {
        "benchmark": "mllp",
        "messages": count,
        "events_per_message": per_message,
        "connections": connections,
        "baseline_msgs_per_s": round(base, 1),
        "one_connection_msgs_per_s": round(one, 1),
        "concurrent_msgs_per_s": round(concurrent, 1),
        "one_connection_ratio": round(one / base, 4),
        "concurrent_ratio": round(concurrent / base, 4),
        "concurrent_over_one": round(concurrent / one, 3),
    }


if __name__ == "__main__":
    main()
