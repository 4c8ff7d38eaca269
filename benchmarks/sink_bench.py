"""Throughput of the store writer against a plain bulk insert of the same rows, on PostgreSQL and SQLite.

    .venv/bin/python benchmarks/sink_bench.py [--rows 20000] [--batch 500] [--skip-postgres] [--profile DIR]

Starts its own throwaway PostgreSQL (Debian's server, as the integration tests do), migrates a fresh
database per measurement, and reports rows/s for:
  sink    SqlStoreSink.write_records: N normalised lab records in batches, one transaction per batch
          (record conversion, ingest log, versioned upsert, patients: everything a real write does);
  plain   a plain bulk insert of the very same rows through the same driver, one transaction per
          batch, no conflict handling, rows built beforehand: COPY on PostgreSQL, insert(observations)
          executemany on SQLite;
  replay  the sink again over the same records (every record a redelivery: nothing changes).

--profile DIR: afterwards, the sink's pass again on a fresh database under cProfile (not timed), its
stats in DIR/sink-<backend>.prof and the functions taking most of it printed (own time and inclusive).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
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


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


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

    def line(self) -> str:
        sink, plain, replay = (
            self.rows / s for s in (self.sink_seconds, self.plain_seconds, self.replay_seconds)
        )
        return (
            f"{self.backend:10} {self.rows:>7} rows  sink {sink:>9,.0f} rows/s  "
            f"plain ({self.method}) {plain:>9,.0f} rows/s  "
            f"ratio sink/plain {sink / plain:5.2f}  replay {replay:>9,.0f} rows/s"
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


def measure(
    backend: str, new_engine: Callable[[str], Engine], records: list[StoreRecord], batch: int
) -> Figures:
    now = dt.datetime.now(dt.UTC)
    plain_rows = [prepare(i, record, now).rows["observations"][0] for i, record in enumerate(records)]

    sink_engine = new_engine("sink")
    upgrade(sink_engine)
    sink = SqlStoreSink(sink_engine)
    sink.write_records(records[:1])  # warm up: connection, statement compilation caches

    def through_sink() -> None:
        for chunk in batches(records, batch):
            sink.write_records(chunk)

    sink_seconds = timed(through_sink)
    replay_seconds = timed(through_sink)  # every record is now a redelivery
    check(count_rows(sink_engine), len(records), f"{backend} sink")
    sink_engine.dispose()

    plain_engine = new_engine("plain")
    upgrade(plain_engine)

    def plain() -> None:
        for chunk in batches(plain_rows[1:], batch):
            bulk_insert(plain_engine, chunk)

    bulk_insert(plain_engine, plain_rows[:1])  # same warm-up
    plain_seconds = timed(plain)
    check(count_rows(plain_engine), len(records), f"{backend} plain insert")
    method = bulk_method(plain_engine)
    plain_engine.dispose()
    return Figures(backend, len(records), sink_seconds, plain_seconds, replay_seconds, method)


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
    parser.add_argument("--profile", type=Path, help="profile the sink afterwards, stats into this folder")
    args = parser.parse_args(argv)

    records = lab_records(args.rows)
    print(f"{len(records)} lab records in batches of {args.batch}", flush=True)
    results = []
    if not args.skip_postgres:
        with throwaway_postgres() as layout:

            def pg_engine(name: str) -> Engine:
                return engine_for(postgres.create_database(layout, f"bench_{name}_{uuid.uuid4().hex[:8]}"))

            results.append(measure("postgresql", pg_engine, records, args.batch))
            print(results[-1].line(), flush=True)
            if args.profile:
                profile_sink("postgresql", pg_engine, records, args.batch, args.profile)
    with tempfile.TemporaryDirectory(prefix="clinhub-bench-sqlite-") as folder:

        def sqlite_engine(name: str) -> Engine:
            return make_engine(f"sqlite:///{folder}/{name}.sqlite3")

        results.append(measure("sqlite", sqlite_engine, records, args.batch))
        print(results[-1].line(), flush=True)
        if args.profile:
            profile_sink("sqlite", sqlite_engine, records, args.batch, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
