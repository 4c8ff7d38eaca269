"""Throughput of the store writer against a plain bulk insert of the same rows, on PostgreSQL and SQLite.

    .venv/bin/python benchmarks/sink_bench.py [--rows 20000] [--batch 500] [--repeat N] [--skip-postgres]
        [--profile DIR]

Starts its own throwaway PostgreSQL (Debian's server, as the integration tests do), migrates a fresh
database per measurement, and reports rows/s for:
  sink    SqlStoreSink.write_records: N normalised lab records in batches, one transaction per batch
          (record conversion, ingest log, versioned upsert, patients: everything a real write does);
  plain   a plain bulk insert of the very same rows through the same driver, one transaction per
          batch, no conflict handling, rows built beforehand: COPY on PostgreSQL, insert(observations)
          executemany on SQLite;
  replay  the sink again over the same records (every record a redelivery: nothing changes).

Each pass runs on a fresh database, the sink's and the plain insert's in turn; --repeat N keeps the
fastest of N of each (other work on a shared machine only ever slows a pass). Beside rows/s, the CPU per
row of this process and of its PostgreSQL backend (from /proc: the server runs here), whose ratio moves
less with the machine's load than wall time does.

--profile DIR: afterwards, the sink's pass again on a fresh database under cProfile (not timed), its
stats in DIR/sink-<backend>.prof and the functions taking most of it printed (own time and inclusive).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select

from clinhub.infra import postgres
from clinhub.infra.process import free_port
from producers.simulator import simulate_labs
from sinks.base import StoreRecord
from sinks.records import prepare
from sinks.sql import OBSERVATIONS, SqlStoreSink
from sinks.store import engine_for, make_engine, upgrade

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the shared record factories live in tests/, which is not installed
    sys.path.insert(0, str(ROOT))

from tests.factories import normalised  # noqa: E402


def lab_records(count: int, seed: int = 2026) -> list[StoreRecord]:
    """Simulated lab results as the real normaliser publishes them (decoded: UUIDs, UTC times)."""
    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    return [
        StoreRecord("lab", normalised("lab", raw, now))
        for raw in simulate_labs(seed, count, patients=max(20, count // 50), now=now)
    ]


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(OBSERVATIONS)).scalar_one())


def check(stored: int, expected: int, what: str) -> None:
    if stored != expected:
        raise RuntimeError(f"{what}: {stored} rows stored, expected {expected}")


def bulk_insert(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Rows into observations in one transaction, the fastest plain way the backend has: COPY on
    PostgreSQL (psycopg's copy, binary-free text rows adapted by the driver), executemany elsewhere."""
    if not rows:
        return
    if engine.dialect.name != "postgresql":
        with engine.begin() as connection:
            connection.execute(insert(OBSERVATIONS), rows)
        return
    columns = list(rows[0])
    statement = f"COPY {OBSERVATIONS.name} ({', '.join(columns)}) FROM STDIN"
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[column] for column in columns])


def bulk_method(engine: Engine) -> str:
    return "COPY" if engine.dialect.name == "postgresql" else "executemany"


@dataclass
class Figures:
    backend: str
    rows: int
    sink_seconds: float
    plain_seconds: float
    replay_seconds: float
    method: str = "executemany"
    sink_spent: Spent | None = None
    plain_spent: Spent | None = None

    def line(self) -> str:
        sink, plain, replay = (
            self.rows / s for s in (self.sink_seconds, self.plain_seconds, self.replay_seconds)
        )
        text = (
            f"{self.backend:10} {self.rows:>7} rows  sink {sink:>9,.0f} rows/s  "
            f"plain ({self.method}) {plain:>9,.0f} rows/s  "
            f"ratio sink/plain {sink / plain:5.2f}  replay {replay:>9,.0f} rows/s"
        )
        if self.sink_spent is None or self.plain_spent is None:
            return text
        return f"{text}\n{'':10} cpu per row: {self.cpu_line()}"

    def cpu_line(self) -> str:
        """CPU per row of each (this process, plus its PostgreSQL backend), and their ratio."""
        assert self.sink_spent is not None and self.plain_spent is not None  # noqa: S101 - by line()

        def per_row(spent: Spent) -> str:
            server = "" if spent.server_cpu is None else f" + server {spent.server_cpu / self.rows * 1e6:.1f}"
            return f"python {spent.cpu / self.rows * 1e6:.1f}{server} us"

        ratio = self.plain_spent.total_cpu / self.sink_spent.total_cpu
        return (
            f"sink {per_row(self.sink_spent)}, plain {per_row(self.plain_spent)}; "
            f"ratio plain/sink cpu {ratio:5.2f}"
        )


def profile_sink(
    backend: str, new_engine: Callable[[str], Engine], records: list[StoreRecord], batch: int, folder: Path
) -> Path:
    """The sink's pass on a fresh database under cProfile; prints where its time went."""
    engine = new_engine("profile")
    upgrade(engine)
    sink = SqlStoreSink(engine)
    sink.write_records(records[:1])
    profiler = cProfile.Profile()
    profiler.enable()
    for chunk in batches(records, batch):
        sink.write_records(chunk)
    profiler.disable()
    engine.dispose()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"sink-{backend}.prof"
    profiler.dump_stats(path)
    for order in ("tottime", "cumulative"):
        print(f"-- {backend} sink under cProfile, by {order} ({path})", flush=True)
        pstats.Stats(str(path)).strip_dirs().sort_stats(order).print_stats(18)
    return path


@dataclass
class Spent:
    """One pass: wall seconds, and the CPU seconds of this process and of its PostgreSQL backend."""

    wall: float
    cpu: float
    server_cpu: float | None = None

    @property
    def total_cpu(self) -> float:
        return self.cpu + (self.server_cpu or 0.0)


def backend_cpu(engine: Engine) -> Callable[[], float | None]:
    """CPU seconds so far of the server process behind the engine's (single, pooled) connection: from
    /proc, as the throwaway server runs on this machine. None on SQLite, or when it cannot be read."""
    if engine.dialect.name != "postgresql":
        return lambda: None
    with engine.connect() as connection:
        pid = connection.execute(select(func.pg_backend_pid())).scalar_one()
    stat = Path(f"/proc/{pid}/stat")
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float | None:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / tick

    return read


def spent(action: Callable[[], None], server: Callable[[], float | None]) -> Spent:
    wall, cpu, before = time.perf_counter(), time.process_time(), server()
    action()
    after = server()
    return Spent(
        time.perf_counter() - wall,
        time.process_time() - cpu,
        None if before is None or after is None else after - before,
    )


def fastest(passes: list[Spent]) -> Spent:
    """Of repeated passes, the least disturbed: the shortest wall, the least CPU (on a shared machine
    other work only ever adds to either)."""
    servers = [p.server_cpu for p in passes if p.server_cpu is not None]
    return Spent(min(p.wall for p in passes), min(p.cpu for p in passes), min(servers) if servers else None)


def measure(
    backend: str,
    new_engine: Callable[[str], Engine],
    records: list[StoreRecord],
    batch: int,
    repeat: int = 1,
) -> Figures:
    """Each pass on a fresh database, the sink's and the plain insert's alternately; the fastest of
    `repeat` passes of each."""
    now = dt.datetime.now(dt.UTC)
    plain_rows = [prepare(i, record, now).rows["observations"][0] for i, record in enumerate(records)]
    sink_passes, replay_passes, plain_passes = [], [], []
    for _ in range(max(1, repeat)):
        sink_engine = new_engine("sink")
        upgrade(sink_engine)
        sink = SqlStoreSink(sink_engine)
        sink.write_records(records[:1])  # warm up: connection, statement compilation caches

        def through_sink(sink: SqlStoreSink = sink) -> None:
            for chunk in batches(records, batch):
                sink.write_records(chunk)

        server = backend_cpu(sink_engine)
        sink_passes.append(spent(through_sink, server))
        replay_passes.append(spent(through_sink, server))  # every record is now a redelivery
        check(count_rows(sink_engine), len(records), f"{backend} sink")
        sink_engine.dispose()

        plain_engine = new_engine("plain")
        upgrade(plain_engine)

        def plain(plain_engine: Engine = plain_engine) -> None:
            for chunk in batches(plain_rows[1:], batch):
                bulk_insert(plain_engine, chunk)

        bulk_insert(plain_engine, plain_rows[:1])  # same warm-up
        plain_passes.append(spent(plain, backend_cpu(plain_engine)))
        check(count_rows(plain_engine), len(records), f"{backend} plain insert")
        method = bulk_method(plain_engine)
        plain_engine.dispose()
    sink_spent, plain_spent = fastest(sink_passes), fastest(plain_passes)
    return Figures(
        backend,
        len(records),
        sink_spent.wall,
        plain_spent.wall,
        fastest(replay_passes).wall,
        method,
        sink_spent,
        plain_spent,
    )


@contextmanager
def throwaway_postgres() -> Iterator[postgres.PostgresLayout]:
    root = Path(tempfile.mkdtemp(prefix="clinhub-bench-pg-"))
    root.chmod(0o755)  # the server runs as the postgres user; its CA and roles' secrets go beside it
    layout = postgres.PostgresLayout(home=root / "postgres", port=free_port())
    process = postgres.start(layout)
    try:
        yield layout
    finally:
        process.stop()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20000, help="lab records to write (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="records per transaction (default 500)")
    parser.add_argument("--skip-postgres", action="store_true", help="only SQLite")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="passes of each, the fastest kept (default 1; 3 on a busy machine)",
    )
    parser.add_argument("--profile", type=Path, help="profile the sink afterwards, stats into this folder")
    args = parser.parse_args(argv)

    records = lab_records(args.rows)
    print(f"{len(records)} lab records in batches of {args.batch}", flush=True)
    results = []
    if not args.skip_postgres:
        with throwaway_postgres() as layout:

            def pg_engine(name: str) -> Engine:
                return engine_for(postgres.create_database(layout, f"bench_{name}_{uuid.uuid4().hex[:8]}"))

            results.append(measure("postgresql", pg_engine, records, args.batch, args.repeat))
            print(results[-1].line(), flush=True)
            if args.profile:
                profile_sink("postgresql", pg_engine, records, args.batch, args.profile)
    with tempfile.TemporaryDirectory(prefix="clinhub-bench-sqlite-") as folder:

        def sqlite_engine(name: str) -> Engine:
            return make_engine(f"sqlite:///{folder}/{name}-{uuid.uuid4().hex[:8]}.sqlite3")

        results.append(measure("sqlite", sqlite_engine, records, args.batch, args.repeat))
        print(results[-1].line(), flush=True)
        if args.profile:
            profile_sink("sqlite", sqlite_engine, records, args.batch, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
