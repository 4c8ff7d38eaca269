"""What the stream benchmarks share: the consume + decode ceiling, Kafka offsets and spans, the workers'
processes (start, CPU, peak memory, stop). Used by `stream_bench.py` and the suite (`suite.py`)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from benchmarks.figures import ConsumeCeiling
from benchmarks.local_services import shared_admin, worker_env
from core.settings import KafkaSettings, RegistrySettings
from schemas.wire import AvroDecoder, ConfluentRegistry

SPLIT_ROLES: tuple[tuple[str, ...], ...] = (
    ("--role", "normaliser"),
    ("--role", "clinical"),
    ("--role", "store"),
)


def end_offsets(client: dict[str, str], topics: list[str]) -> dict[tuple[str, int], int]:
    """Each partition's end (high watermark), asked through the process's one admin client of `client`
    (`shared_admin`): a consumer made and closed for each question, every half second while a benchmark
    waits, was closed mid-handshake, and librdkafka logged a SASL "transport failure" each time."""
    admin = shared_admin(client)
    asked = {
        TopicPartition(topic, partition): OffsetSpec.latest()
        for topic in topics
        for partition in admin.list_topics(topic, timeout=10).topics[topic].partitions
    }
    answers = admin.list_offsets(asked, request_timeout=10)
    return {(tp.topic, tp.partition): answers[tp].result(timeout=10).offset for tp in asked}


def consume_decode(
    client: dict[str, str], registry: RegistrySettings, topics: list[str], count: int
) -> ConsumeCeiling:
    """Events/s of consume + decode, from the first message polled to the last decoded; CPU per event.
    The floor any processor of these topics pays."""
    decode = AvroDecoder(ConfluentRegistry(registry.client_config()))
    consumer = Consumer(
        {
            **client,
            "group.id": f"bench-baseline-{secrets.token_hex(4)}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    seen, started, cpu_started = 0, 0.0, 0.0
    while seen < count:
        for message in consumer.consume(num_messages=1000, timeout=1.0):
            if message.error() is None:
                if not started:
                    started, cpu_started = time.perf_counter(), time.process_time()
                decode(message.value())
                seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return ConsumeCeiling(count, count / elapsed, (time.process_time() - cpu_started) / count * 1e6)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc), for CPU per event beside the rates."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker_pid(process: subprocess.Popen[bytes]) -> int:
    """The worker's pid: the process itself, or the one child of py-spy when profiling."""
    if not Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"py-spy"):
        return process.pid
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    for _ in range(100):
        found = children.read_text().split()
        if found:
            return int(found[0])
        time.sleep(0.1)
    raise SystemExit(f"py-spy (pid {process.pid}) started no worker")


def admin_client(client: dict[str, str]) -> AdminClient:
    return AdminClient(dict[str, str | int | float | bool](client))


def committed_to_end(admin: AdminClient, group: str, ends: dict[tuple[str, int], int]) -> bool:
    """Whether the group has committed every partition to its end offset. Asked through one admin
    client, made by the caller for all its questions: a consumer made and closed for each one was
    closed mid-handshake with the coordinator, and librdkafka logged a SASL "transport failure"."""
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in ends])
    committed = admin.list_consumer_group_offsets([request], request_timeout=10)[group].result(timeout=10)
    return all(
        tp.offset >= ends[(tp.topic, tp.partition)]
        for tp in committed.topic_partitions
        if ends[(tp.topic, tp.partition)]
    )


def topic_stamps(client: dict[str, str], topic: str) -> list[float]:
    """The broker timestamp (s) of every message on the topic."""
    consumer = Consumer({**client, "group.id": f"bench-span-{secrets.token_hex(4)}"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    total = sum(end_offsets(client, [topic]).values())
    stamps: list[float] = []
    while len(stamps) < total:
        for message in consumer.consume(num_messages=1000, timeout=1.0):
            if message.error() is None:
                stamps.append(message.timestamp()[1] / 1000)
    consumer.close()
    return stamps


def norm_span(client: dict[str, str], topic: str) -> tuple[float, float, int]:
    """(first, last) create time in seconds and the count of messages on the topic."""
    stamps = topic_stamps(client, topic)
    return min(stamps), max(stamps), len(stamps)


def worker_environment(
    kafka: KafkaSettings,
    registry: RegistrySettings,
    workdir: Path,
    app_id: str,
    database: dict[str, str],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """A benchmark worker's environment: its own principal on the run's broker and registry, its store
    (`database`: CLINHUB_DATABASE_* values), a fresh pseudonym key, warnings only."""
    return {
        **os.environ,
        **worker_env(kafka, registry),
        **database,
        "CLINHUB_STREAM_APP_ID": app_id,
        "CLINHUB_STREAM_DATA_DIR": str(workdir / "faust"),
        "CLINHUB_SECURITY_PSEUDONYM_KEY": secrets.token_hex(32),
        "CLINHUB_INFRA_METRICS_PORT": "0",
        "CLINHUB_LOG_LEVEL": "WARNING",
        **(extra or {}),
    }


WORKER_ARGV = (sys.executable, "-m", "clinhub.cli", "stream", "worker", "--loglevel", "warning")


def start_workers(
    role_sets: Sequence[Sequence[str]],
    env: dict[str, str],
    workdir: Path,
    profile: Path | None = None,
) -> list[subprocess.Popen[bytes]]:
    """One worker process per role set (an empty set: every stage), output in workdir/worker.log;
    with `profile`, each under py-spy (GIL holder only), its collapsed stacks in profile/<stage>.txt."""
    log = (workdir / "worker.log").open("ab")

    def command(roles: Sequence[str]) -> list[str]:
        if profile is None:
            return [*WORKER_ARGV, *roles]
        profile.mkdir(parents=True, exist_ok=True)
        stage = roles[-1] if roles else "all"
        spy = str(Path(sys.executable).with_name("py-spy"))
        out = str(profile / f"{stage}.txt")
        return [spy, "record", "--gil", "--format", "raw", "-o", out, "--", *WORKER_ARGV, *roles]

    return [
        subprocess.Popen(  # noqa: S603 - the project's own worker
            command(roles), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
        for roles in role_sets
    ]


def check_running(workers: Sequence[subprocess.Popen[bytes]], workdir: Path) -> None:
    if any(worker.poll() is not None for worker in workers):
        raise SystemExit(f"worker exited: {(workdir / 'worker.log').read_text()[-3000:]}")


def stop_workers(workers: Sequence[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:  # under py-spy: it writes its file once the worker has ended
            with suppress(ProcessLookupError):
                os.kill(worker_pid(worker), signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
