"""Throughput of the Faust path against a plain consume-and-decode loop over the same topic, same run.

    .venv/bin/python benchmarks/stream_bench.py [--events 20000]

Starts its own Kafka (KRaft) and schema registry on free loopback ports, publishes N simulated lab
results to the raw topics, then measures:
  baseline    a confluent-kafka consumer reading the raw topics and decoding every message with the
              hub's AvroDecoder (fastavro, schema cached by id): the floor any processor pays;
  normalise   the Faust normaliser: raw -> decode -> validate -> LOINC/units/identity -> norm.lab,
              from its first output to its last (Kafka create times of norm.lab);
  +alert      normaliser and clinical agent: until the clinical agent's committed offsets reach the
              end of norm.lab (rules, suppression state, alert publishing included);
  +store      the whole pipeline until every event is in the SQLite store.
Figures are events/s and ratios to the baseline measured in the same run.

`--profile DIR` profiles the steady state only: py-spy (GIL holder only, not pausing the worker) attaches
to each worker once the first event is normalised and is stopped when the last event is stored, before
the workers stop; collapsed stacks in DIR/<stage>.txt (`benchmarks/profile_summary.py` ranks them).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select

from benchmarks.local_services import services
from benchmarks.pipeline import (
    SPLIT_ROLES,
    admin_client,
    check_running,
    committed_to_end,
    consume_decode,
    cpu_seconds,
    end_offsets,
    norm_span,
    start_workers,
    stop_workers,
    worker_environment,
    worker_pid,
)
from clinhub.provision import provision
from core.contract import TopicNames
from core.settings import (
    DatabaseSettings,
    HubSettings,
    InfraSettings,
    KafkaSettings,
    RegistrySettings,
    SecuritySettings,
    StreamSettings,
)
from producers.publisher import make_publisher
from producers.simulator import simulate_labs
from schemas.registration import register_standard
from schemas.wire import ConfluentRegistry
from sinks.models import IngestLog
from sinks.store import make_engine, upgrade


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument(
        "--split", action="store_true", help="one worker process per stage instead of one for all three"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run each worker under py-spy (GIL holder only); collapsed stacks in DIR/<stage>.txt",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="clinhub-stream-bench-"))
    try:
        with services(workdir) as (kafka, registry):
            run(workdir, kafka, registry, args.events, args.split, args.profile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    workdir: Path,
    kafka: KafkaSettings,
    registry: RegistrySettings,
    count: int,
    split: bool,
    profile: Path | None,
) -> None:
    db_url = f"sqlite:///{workdir / 'store.sqlite3'}"
    engine = make_engine(db_url)
    upgrade(engine)
    app_id = f"bench-{secrets.token_hex(4)}"
    settings = HubSettings(
        kafka=kafka,
        registry=registry,
        database=DatabaseSettings(url=db_url),  # type: ignore[arg-type]
        security=SecuritySettings(),
        stream=StreamSettings(app_id=app_id, data_dir=workdir / "faust"),
        infra=InfraSettings(metrics_port=0),
    )
    topics = TopicNames()
    institutions = settings.stream.institutions
    provision(settings)  # topics and every principal's ACLs
    client = settings.kafka.client_config()
    register_standard(ConfluentRegistry(registry.client_config()))

    records = simulate_labs(seed=7, count=count, critical_share=0.05, patients=500)
    started = time.perf_counter()
    for institution in institutions:
        publisher = make_publisher(settings, institution, delivery_timeout=120)
        mine = [r for r in records if r["envelope"]["institution_id"] == institution]
        for chunk in range(0, len(mine), 5000):
            publisher.publish_many_labs(mine[chunk : chunk + 5000])
        publisher.close()
    print(f"published {count} lab results in {time.perf_counter() - started:.1f}s")

    raw_topics = [topics.raw(institution, "lab") for institution in institutions]
    ceiling = consume_decode(client, registry, raw_topics, count)
    base, base_cpu = ceiling.rate, ceiling.cpu_us_per_event / 1e6
    base_figures = f"{base:9.0f} events/s   1.00x   {base_cpu * 1e6:.0f} us CPU/event"
    print(f"baseline   consume + decode         {base_figures}")

    env = worker_environment(kafka, registry, workdir, app_id, {"CLINHUB_DATABASE_URL": db_url})
    role_sets = [list(roles) for roles in SPLIT_ROLES] if split else [[]]
    workers = start_workers(role_sets, env, workdir)
    spies: list[subprocess.Popen[bytes]] = []
    clinical_group = f"{app_id}-clinical" if split else app_id
    admin = admin_client(client)
    print(f"workers    {len(workers)} process(es): {'one per stage' if split else 'all stages in one'}")
    try:
        norm_ends: dict[tuple[str, int], int] = {}
        alert_done = store_done = 0.0
        start_cpu: list[float] = []  # each worker's CPU once the first event is normalised: start-up excluded
        while not store_done:
            check_running(workers, workdir)
            time.sleep(0.5)
            now = time.time()  # wall clock, comparable with Kafka create times
            if not norm_ends:
                ends = end_offsets(client, [topics.norm("lab")])
                if not start_cpu and sum(ends.values()) > 0:
                    start_cpu = [cpu_seconds(worker_pid(worker)) for worker in workers]
                    if profile is not None:
                        spies = attach_profilers(workers, role_sets, profile)
                if sum(ends.values()) >= count:
                    norm_ends = ends
            if norm_ends and not alert_done and committed_to_end(admin, clinical_group, norm_ends):
                alert_done = now
            with engine.connect() as connection:
                stored = connection.execute(select(func.count()).select_from(IngestLog)).scalar_one()
            if stored >= count and alert_done:
                store_done = now
        detach_profilers(spies)
        first, last, normalised = norm_span(client, topics.norm("lab"))
        normalise_rate = normalised / max(last - first, 1e-3)
        # spans start at the first normalised output, so the worker's start-up is not counted
        alert_rate = count / max(alert_done - first, 1e-3)
        store_rate = count / max(store_done - first, 1e-3)
        ratio = normalise_rate / base
        print(f"normalise  Faust raw -> norm.lab    {normalise_rate:9.0f} events/s   {ratio:.2f}x")
        print(f"+alert     normalise + rules        {alert_rate:9.0f} events/s   {alert_rate / base:.2f}x")
        print(f"+store     whole pipeline to SQLite {store_rate:9.0f} events/s   {store_rate / base:.2f}x")
        used = [
            cpu_seconds(worker_pid(worker)) - before
            for worker, before in zip(workers, start_cpu, strict=True)
        ]
        cpu = sum(used)
        print(
            f"workers    {cpu:.1f} s CPU after start-up: {cpu / count * 1e6:.0f} us CPU/event, "
            f"{cpu / count / base_cpu:.1f}x the baseline's"
        )
        if split:
            for roles, stage_cpu in zip(role_sets, used, strict=True):
                print(f"  {roles[-1]:<10} {stage_cpu / count * 1e6:6.0f} us CPU/event")
    finally:
        detach_profilers(spies)
        stop_workers(workers)
    full = (workdir / "worker.log").read_text(errors="replace").count("producer buffer full")
    print(f"worker log: {full} 'producer buffer full' line(s)")


def attach_profilers(
    workers: Sequence[subprocess.Popen[bytes]], role_sets: Sequence[Sequence[str]], profile: Path
) -> list[subprocess.Popen[bytes]]:
    """py-spy attached to each running worker (GIL holder only), its stacks in profile/<stage>.txt."""
    profile.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [
        subprocess.Popen(  # noqa: S603 - py-spy of this venv on the benchmark's own workers
            [
                spy,
                "record",
                "--gil",
                "--nonblocking",  # pausing the worker at each sample (ptrace) multiplied its CPU per event
                "--format",
                "raw",
                "--pid",
                str(worker_pid(worker)),
                "-o",
                str(profile / f"{roles[-1] if roles else 'all'}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for worker, roles in zip(workers, role_sets, strict=True)
    ]


def detach_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    """Stop sampling (py-spy writes its file on SIGINT), before the workers' shutdown is sampled."""
    for spy in spies:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(60)
    spies.clear()


if __name__ == "__main__":
    main()
