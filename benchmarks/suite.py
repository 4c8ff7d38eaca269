"""The benchmark suite: latency at fixed offered rates, sustained throughput and each process's cost, and
the same run's ceilings, printed and written as JSON, a Markdown table and a PNG plot.

    .venv/bin/python -m benchmarks.suite [--quick] [--parts ceilings,throughput,latency]
        [--backends sqlite,postgresql] [--layouts one,split] [--rates 100,1000,5000,sustained]
        [--seconds 60] [--events 20000] [--warm-up 60] [--out .data/bench]

Starts its own Kafka and schema registry (and PostgreSQL for that backend) on free loopback ports,
secured as the local stack is. Each pipeline (a backend and a layout: one worker process for every stage,
or one per stage) gets topics of its own (a topic prefix) and a fresh store, and is warmed up (its first
events stored, then `--warm-up` seconds of paced load, all stored) before anything is measured, so no
figure includes start-up: in the first half minute of load after the first events, the broker compiling
and the workers' caches filling, a pipeline was several times slower than a minute later. Traffic is lab
results only, 2% of them critical, across many patients, published by each institution as itself.

  throughput  N events published as fast as the SDK sends them; events/s from the first raw message's
              broker timestamp to the last store commit (ingest_log.ingested_time); each worker
              process's CPU per event (utime+stime from /proc over that span) and peak memory (VmHWM);
  latency     for each offered rate, paced by schedule (event i due at start + i/rate), for --seconds:
              event->alert published (the alert's Kafka timestamp minus the raw event's, matched by the
              alert's source event id) and event->store committed (the row's ingested_time minus the raw
              event's timestamp), p50/p95/p99/max; "sustained" is the rate the throughput part measured
              on the same pipeline; latency runs on each layout of the first backend;
  ceilings    a plain consume + decode loop over the first pipeline's raw topics (`pipeline.consume_decode`),
              and a plain bulk insert of the same rows (COPY on PostgreSQL, executemany on SQLite) beside
              the store writer on them (`sink_bench.measure`).

Every broker timestamp and store time is this machine's wall clock, so they compare directly. Figures are
ratios to the ceilings; the machine should be quiet. `--quick` is a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, func, select

from benchmarks import figures, pipeline, sink_bench
from benchmarks.figures import (
    InsertCeiling,
    LatencyRun,
    ProcessCost,
    SuiteResults,
    ThroughputRun,
)
from benchmarks.local_services import services
from benchmarks.sender import LabSender, lab_stream, publish_paced
from clinhub.infra import postgres
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
from schemas.registration import register_standard
from schemas.wire import AvroDecoder, ConfluentRegistry
from sinks.models import IngestLog
from sinks.store import engine_for, make_engine, upgrade

ROOT = Path(__file__).resolve().parents[1]
CRITICAL_SHARE = 0.02
PATIENTS_PER_CHUNK = 200  # of each 500 simulated: some repeat, few critical values are repeats
WARM_UP_EVENTS = 200
WARM_UP_RATE = 500.0  # events/s of the paced warm-up (`--warm-up`): within every layout's reach here


@dataclass(frozen=True)
class Options:
    parts: frozenset[str]
    backends: tuple[str, ...]
    layouts: tuple[str, ...]
    rates: tuple[str, ...]  # numbers, or "sustained"
    seconds: float
    events: int
    batch: int
    drain_timeout: float
    out: Path
    quick: bool
    warm_up: float = 0.0  # seconds of paced load after the first events, measured by nothing


QUICK: dict[str, str | float | int] = {
    "backends": "sqlite",
    "layouts": "one",
    "rates": "100,500",
    "seconds": 10.0,
    "events": 3000,
    "warm_up": 0.0,
}
FULL: dict[str, str | float | int] = {
    "backends": "sqlite,postgresql",
    "layouts": "one,split",
    "rates": "100,1000,5000,sustained",
    "seconds": 60.0,
    "events": 20000,
    "warm_up": 60.0,
}


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    parser.add_argument("--parts", default="ceilings,throughput,latency")
    parser.add_argument("--backends", help=f"default {FULL['backends']} ({QUICK['backends']} with --quick)")
    parser.add_argument("--layouts", help=f"one, split (default {FULL['layouts']}; {QUICK['layouts']} quick)")
    parser.add_argument("--rates", help=f"offered events/s (default {FULL['rates']}; {QUICK['rates']} quick)")
    parser.add_argument("--seconds", type=float, help="each latency run's length (60; 10 quick)")
    parser.add_argument("--events", type=int, help="events of the throughput run (20000; 3000 quick)")
    parser.add_argument(
        "--warm-up",
        type=float,
        help=f"seconds of load at {WARM_UP_RATE:,.0f}/s before a pipeline is measured (60; 0 quick): "
        "the broker's JIT compiles and the workers' caches fill under load; the first half minute after "
        "the first events stored was several times slower",
    )
    parser.add_argument("--batch", type=int, default=500, help="rows per transaction of the insert ceiling")
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the store")
    parser.add_argument("--out", type=Path, default=ROOT / ".data" / "bench", help="where results go")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    parts = frozenset(p for p in args.parts.split(",") if p)
    unknown = parts - {"ceilings", "throughput", "latency"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    def listed(value: str | None, name: str) -> tuple[str, ...]:
        return tuple(v for v in (value or str(defaults[name])).split(",") if v)

    backends, layouts = listed(args.backends, "backends"), listed(args.layouts, "layouts")
    if set(backends) - {"sqlite", "postgresql"} or set(layouts) - {"one", "split"}:
        parser.error("backends: sqlite, postgresql; layouts: one, split")
    return Options(
        parts=parts,
        backends=backends,
        layouts=layouts,
        rates=listed(args.rates, "rates"),
        seconds=args.seconds if args.seconds is not None else float(defaults["seconds"]),
        events=args.events if args.events is not None else int(defaults["events"]),
        warm_up=args.warm_up if args.warm_up is not None else float(defaults["warm_up"]),
        batch=args.batch,
        drain_timeout=args.drain_timeout,
        out=args.out,
        quick=args.quick,
    )


@dataclass
class Pipeline:
    """One running pipeline: its topics, store and worker processes."""

    name: str
    backend: str
    layout: str
    settings: HubSettings
    engine: Engine  # the owner's (SQLite: the file's), to read ingest_log
    workers: list[subprocess.Popen[bytes]]
    stages: tuple[str, ...]
    workdir: Path
    stored: int = 0  # lab events stored so far

    @property
    def topics(self) -> TopicNames:
        return TopicNames(prefix=self.settings.stream.topic_prefix)

    @property
    def raw_topics(self) -> list[str]:
        return [self.topics.raw(i, "lab") for i in self.settings.stream.institutions]

    @property
    def client(self) -> dict[str, str]:
        return self.settings.kafka.client_config()

    def cpu(self) -> list[float]:
        return [pipeline.cpu_seconds(pipeline.worker_pid(w)) for w in self.workers]

    def peak_memory(self) -> list[float]:
        return [pipeline.peak_memory_mb(pipeline.worker_pid(w)) for w in self.workers]

    def wait_stored(self, count: int, timeout: float) -> None:
        """Until `count` more lab events are in ingest_log; a timeout or a dead worker ends the suite."""
        target = self.stored + count
        deadline = time.monotonic() + timeout
        while True:
            pipeline.check_running(self.workers, self.workdir)
            with self.engine.connect() as connection:
                stored = connection.execute(
                    select(func.count()).select_from(IngestLog).where(IngestLog.kind == "lab")
                ).scalar_one()
            if stored >= target:
                self.stored = stored
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: {stored - self.stored} of {count} stored in {timeout:.0f}s")
            time.sleep(0.2)

    def store_times(self, event_ids: set[str]) -> dict[str, float]:
        """Event id -> the store's commit time (ingested_time, epoch ms) of those events."""
        found: dict[str, float] = {}
        with self.engine.connect() as connection:
            for event_id, when in connection.execute(
                select(IngestLog.event_id, IngestLog.ingested_time).where(IngestLog.kind == "lab")
            ):
                if event_id in event_ids:
                    found[event_id] = when.timestamp() * 1000
        return found

    def end_offsets(self, topics: list[str]) -> dict[tuple[str, int], int]:
        return pipeline.end_offsets(self.client, topics)


def read_from(
    client: dict[str, str], starts: Mapping[tuple[str, int], int], handle: Callable[[Any], None]
) -> None:
    """Every message from `starts` to the partitions' current ends, to `handle`."""
    ends = pipeline.end_offsets(client, sorted({topic for topic, _ in starts}))
    remaining = sum(max(0, ends[key] - starts.get(key, 0)) for key in ends)
    consumer = Consumer({**client, "group.id": f"bench-read-{secrets.token_hex(4)}"})
    consumer.assign([TopicPartition(t, p, starts.get((t, p), 0)) for t, p in ends])
    while remaining > 0:
        for message in consumer.consume(num_messages=1000, timeout=1.0):
            if message.error() is None:
                handle(message)
                remaining -= 1
    consumer.close()


def raw_stamps(client: dict[str, str], starts: Mapping[tuple[str, int], int]) -> dict[str, float]:
    """Event id (the raw message's header) -> broker timestamp, ms."""
    stamps: dict[str, float] = {}

    def take(message: Any) -> None:
        event_id = dict(message.headers() or []).get("event_id")
        if event_id is not None:
            stamps[event_id.decode()] = message.timestamp()[1]

    read_from(client, starts, take)
    return stamps


def alert_stamps(
    client: dict[str, str], registry: RegistrySettings, starts: Mapping[tuple[str, int], int]
) -> dict[str, float]:
    """Source event id -> the alert message's broker timestamp, ms (the first alert of each event)."""
    decode = AvroDecoder(ConfluentRegistry(registry.client_config()))
    stamps: dict[str, float] = {}

    def take(message: Any) -> None:
        source = str(decode(message.value())["source_event_id"])
        stamps.setdefault(source, message.timestamp()[1])

    read_from(client, starts, take)
    return stamps


def pipeline_settings(
    kafka: KafkaSettings, registry: RegistrySettings, database: DatabaseSettings, workdir: Path, name: str
) -> HubSettings:
    return HubSettings(
        kafka=kafka,
        registry=registry,
        database=database,
        security=SecuritySettings(),
        stream=StreamSettings(app_id=f"bench-{name}", topic_prefix=f"{name}.", data_dir=workdir / "faust"),
        infra=InfraSettings(metrics_port=0),
    )


@contextmanager
def running_pipeline(
    backend: str,
    layout: str,
    kafka: KafkaSettings,
    registry: RegistrySettings,
    root: Path,
    postgres_layout: postgres.PostgresLayout | None,
) -> Iterator[Pipeline]:
    name = f"{backend[:2]}{layout[:2]}{secrets.token_hex(3)}"
    workdir = root / name
    workdir.mkdir()
    if backend == "postgresql":
        assert postgres_layout is not None  # noqa: S101 - started by the caller for this backend
        database = postgres.create_database(postgres_layout, f"bench_{name}")
        engine = engine_for(database)
        store_env = {
            "CLINHUB_DATABASE_URL": postgres_layout.url(f"bench_{name}"),
            "CLINHUB_DATABASE_SSL_CA_LOCATION": str(postgres_layout.ca_file),
            "CLINHUB_DATABASE_ROLE_SECRETS_DIR": str(postgres_layout.secrets_dir),
        }
    else:
        url = f"sqlite:///{workdir / 'store.sqlite3'}"
        database = DatabaseSettings(url=url)  # type: ignore[arg-type]  # pydantic makes the SecretStr
        engine = make_engine(url)
        store_env = {"CLINHUB_DATABASE_URL": url}
    upgrade(engine)
    settings = pipeline_settings(kafka, registry, database, workdir, name)
    provision(settings)  # its topics and every principal's ACLs
    env = pipeline.worker_environment(
        kafka,
        registry,
        workdir,
        settings.stream.app_id,
        store_env,
        {"CLINHUB_STREAM_TOPIC_PREFIX": settings.stream.topic_prefix},
    )
    role_sets = [list(roles) for roles in pipeline.SPLIT_ROLES] if layout == "split" else [[]]
    stages = tuple(roles[-1] for roles in role_sets) if layout == "split" else ("all",)
    workers = pipeline.start_workers(role_sets, env, workdir)
    running = Pipeline(name, backend, layout, settings, engine, workers, stages, workdir)
    try:
        yield running
    finally:
        pipeline.stop_workers(workers)
        engine.dispose()


def warm_up(running: Pipeline, seed: int, timeout: float, seconds: float = 0.0) -> None:
    """A few events through every stage (partitions assigned, caches and connections made), then
    `seconds` of paced load at WARM_UP_RATE, all stored before anything is measured."""
    with LabSender(running.settings) as sender:
        publish_paced(sender, lab_stream(seed, WARM_UP_EVENTS, CRITICAL_SHARE, PATIENTS_PER_CHUNK), 0)
    running.wait_stored(WARM_UP_EVENTS, timeout)
    loaded = round(WARM_UP_RATE * seconds)
    if loaded:
        with LabSender(running.settings) as sender:
            stream = lab_stream(seed + 50_000, loaded, CRITICAL_SHARE, PATIENTS_PER_CHUNK)
            publish_paced(sender, stream, WARM_UP_RATE)
        running.wait_stored(loaded, timeout)


def measure_throughput(running: Pipeline, events: int, seed: int, timeout: float) -> ThroughputRun:
    """`events` published unpaced; events/s from the first raw timestamp to the last store commit; each
    process's CPU over that span per event, and its peak memory."""
    starts = running.end_offsets(running.raw_topics)
    cpu_before = running.cpu()
    with LabSender(running.settings) as sender:
        ids = publish_paced(sender, lab_stream(seed, events, CRITICAL_SHARE, PATIENTS_PER_CHUNK), 0).event_ids
    running.wait_stored(events, timeout)
    cpu_used = [after - before for after, before in zip(running.cpu(), cpu_before, strict=True)]
    first = min(raw_stamps(running.client, starts).values())
    last = max(running.store_times(set(ids)).values())
    costs = tuple(
        ProcessCost(stage, used / events * 1e6, peak)
        for stage, used, peak in zip(running.stages, cpu_used, running.peak_memory(), strict=True)
    )
    rate = events / max((last - first) / 1000, 1e-3)
    return ThroughputRun(running.backend, layout_name(running.layout), events, rate, costs)


def layout_name(layout: str) -> str:
    return "one process" if layout == "one" else "one per stage"


def measure_latency(
    running: Pipeline,
    registry: RegistrySettings,
    rate: float,
    seconds: float,
    seed: int,
    timeout: float,
    label: str = "",
) -> LatencyRun:
    """Paced at `rate` for `seconds`: event->alert and event->store, both from the raw broker timestamp."""
    count = max(1, round(rate * seconds))
    raw_starts = running.end_offsets(running.raw_topics)
    alert_starts = running.end_offsets([running.topics.alerts_topic])
    with LabSender(running.settings) as sender:
        ids = set(
            publish_paced(sender, lab_stream(seed, count, CRITICAL_SHARE, PATIENTS_PER_CHUNK), rate).event_ids
        )
    running.wait_stored(count, timeout)
    raw = {k: v for k, v in raw_stamps(running.client, raw_starts).items() if k in ids}
    alerts = alert_stamps(running.client, registry, alert_starts)
    stored = running.store_times(ids)
    span = (max(raw.values()) - min(raw.values())) / 1000 if len(raw) > 1 else 0.0
    return LatencyRun(
        offered_rate=rate,
        achieved_rate=(len(raw) - 1) / span if span else 0.0,
        events=len(raw),
        alerts=len(figures.latencies(raw, alerts)),
        event_to_alert=figures.percentiles(figures.latencies(raw, alerts)),
        event_to_store=figures.percentiles(figures.latencies(raw, stored)),
        label=label,
    )


def measure_inserts(
    backend: str, rows: int, batch: int, postgres_layout: postgres.PostgresLayout | None, root: Path
) -> InsertCeiling:
    """The bulk insert ceiling and the store writer on the same records (`sink_bench.measure`)."""
    records = sink_bench.lab_records(rows)
    if backend == "postgresql":
        assert postgres_layout is not None  # noqa: S101 - started by the caller for this backend
        layout = postgres_layout

        def new_engine(name: str) -> Engine:
            return engine_for(postgres.create_database(layout, f"bench_{name}_{uuid.uuid4().hex[:8]}"))
    else:

        def new_engine(name: str) -> Engine:
            return make_engine(f"sqlite:///{root / f'{name}-{uuid.uuid4().hex[:8]}.sqlite3'}")

    found = sink_bench.measure(backend, new_engine, records, batch)
    return InsertCeiling(backend, rows, found.method, rows / found.plain_seconds, rows / found.sink_seconds)


def rate_of(text: str, sustained: float | None) -> tuple[float, str] | None:
    if text == "sustained":
        return (float(int(sustained // 100 * 100) or sustained), "highest sustained") if sustained else None
    return float(text), ""


def run_suite(options: Options, results: SuiteResults, report: Callable[[str], None]) -> None:
    root = Path(tempfile.mkdtemp(prefix="clinhub-bench-suite-"))
    seed = 100
    try:
        with ExitStack() as stack:
            pg_layout = None
            if "postgresql" in options.backends:
                pg_layout = stack.enter_context(sink_bench.throwaway_postgres())
                report(f"PostgreSQL on port {pg_layout.port}")
            if "ceilings" in options.parts:
                for backend in options.backends:
                    results.inserts.append(
                        measure_inserts(backend, options.events, options.batch, pg_layout, root)
                    )
                    report(f"ceiling    {backend} bulk insert done")
            if not options.parts & {"throughput", "latency"}:
                return
            kafka, registry = stack.enter_context(services(root))
            register_standard(ConfluentRegistry(registry.client_config()))
            first = True
            for backend in options.backends:
                for layout in options.layouts:
                    with running_pipeline(backend, layout, kafka, registry, root, pg_layout) as running:
                        seed += 1
                        warm_up(running, seed, options.drain_timeout, options.warm_up)
                        report(f"pipeline   {backend}, {layout}: warmed up ({options.warm_up:.0f} s of load)")
                        sustained = None
                        if "throughput" in options.parts or (first and "ceilings" in options.parts):
                            seed += 1
                            tp = measure_throughput(running, options.events, seed, options.drain_timeout)
                            results.throughput.append(tp)
                            sustained = tp.rate
                            report(f"throughput {backend}, {tp.layout}: {tp.rate:,.0f} events/s")
                        if first and "ceilings" in options.parts:
                            results.consume = pipeline.consume_decode(
                                running.client, registry, running.raw_topics, running.stored
                            )
                            report(f"ceiling    consume + decode: {results.consume.rate:,.0f} events/s")
                        if backend == options.backends[0] and "latency" in options.parts:
                            for text in options.rates:
                                chosen = rate_of(text, sustained)
                                if chosen is None:
                                    results.notes.append(
                                        "no 'sustained' rate: the throughput part did not run"
                                    )
                                    continue
                                seed += 1
                                run = measure_latency(
                                    running, registry, chosen[0], options.seconds, seed,
                                    options.drain_timeout, chosen[1],
                                )  # fmt: skip
                                run = dataclasses.replace(run, layout=layout_name(layout))
                                results.latency.append(run)
                                offered, achieved = run.offered_rate, run.achieved_rate
                                report(f"latency    {layout}, {offered:,.0f}/s: {achieved:,.0f}/s achieved")
                    first = False
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_outputs(results: SuiteResults, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = figures.rows(results)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(results.to_json())
    written[1].write_text(figures.render_markdown(results, table))
    if results.latency:
        from benchmarks.plot import plot_latency

        written.append(plot_latency(results.latency, out / "latency.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = SuiteResults(started=started, quick=options.quick)
    results.notes.append(
        f"lab results only, {CRITICAL_SHARE:.0%} critical; latency runs of {options.seconds:.0f} s each on "
        f"each layout of the first backend; throughput runs of {options.events} events"
    )

    def report(line: str) -> None:
        print(line, flush=True)

    try:
        run_suite(options, results, report)
    finally:  # what was measured before a failure is still written
        table = figures.rows(results)
        print(figures.render_text(table))
        for path in write_outputs(results, options.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
