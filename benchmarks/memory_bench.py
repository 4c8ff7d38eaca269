"""Worker memory over a long run at a steady offered rate: RSS at the start, every minute and at the end,
and the size of each table (its keys) at the end.

    .venv/bin/python -m benchmarks.memory_bench [--rate 1000] [--seconds 600] [--every 60]
        [--horizon SECONDS] [--patients 500] [--layout one|split]

Starts its own Kafka and schema registry (benchmarks/local_services.py) and one worker running every
stage (`--layout split`: one worker per stage, each one's RSS printed) on a SQLite store (the suite's
pipeline, `suite.running_pipeline`), warms it up, then sends lab
results paced at `--rate` through the SDK's stream (`sender.publish_paced`) for `--seconds`, across
many patients (`--patients` per 500 simulated; each pass over the pool of simulated records makes new
patients), so state that grew with every patient ever seen would show. RSS is the worker's VmRSS from
/proc/<pid>/status, sampled while the load runs; the end sample is taken once the store has every event
and the clinical stage has judged every one.

The shipped reference data expires analyte state 14 days 8 hours after its newest result and last write
(streams/domain/expiry.py), longer than any run: every patient of a run is still active, and the table
sizes show what the run wrote. `--horizon S` runs the worker on a copy of the reference data whose
delta windows, suppression window and alert memory add up to S seconds (`short_horizon_reference`), and
the expiry timer every second, so state older than S leaves the tables during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import pipeline, suite
from benchmarks.local_services import services
from benchmarks.sender import CHUNK, LabSender, lab_stream, publish_paced
from schemas.registration import register_standard
from schemas.wire import ConfluentRegistry
from streams.domain.reference import DATA_DIR
from streams.runtime.app import ROLES, app_id_for

OFFSET_KEY = b"__faust\x00offset__"  # Faust's RocksDB store keeps its changelog offset under this key


def short_horizon_reference(folder: Path, seconds: float) -> Path:
    """A copy of the shipped reference data whose expiry horizon (longest delta window + suppression
    window + alert memory) is `seconds`: each of the three a third of it. Results older than a third of
    it raise no alert, so only traffic stamped as it is sent (as the benchmarks' is) alerts as usual."""
    shutil.copytree(DATA_DIR, folder)
    path = folder / "critical_rules.json"
    rules = json.loads(path.read_text())
    hours = seconds / 3 / 3600
    for check in rules["delta_checks"]:
        check["window_hours"] = hours
    rules["suppression"]["window_hours"] = hours
    rules["late_results"]["alert_within_hours"] = hours
    path.write_text(json.dumps(rules))
    return folder


def rss_mb(pid: int) -> float:
    """The process's resident set now (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def table_sizes(data_dir: Path) -> dict[str, int]:
    """Keys per table in a stopped worker's RocksDB stores (<table>-<partition>.db under its data dir)."""
    from rocksdict import AccessType, Options, Rdict

    sizes: dict[str, int] = {}
    for path in sorted(data_dir.rglob("*-*.db")):
        if not path.is_dir():
            continue
        table = path.name[: -len(".db")].rsplit("-", 1)[0]
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only(False))
        try:
            sizes[table] = sizes.get(table, 0) + sum(1 for key in db.keys() if key != OFFSET_KEY)  # noqa: SIM118 - an Rdict
        finally:
            db.close()
    return sizes


class Counted:
    """The records of a stream, counting distinct (institution, MRN, local code): patient-analytes sent."""

    def __init__(self, records: Iterator[dict[str, Any]]) -> None:
        self.records = records
        self.pairs: set[tuple[str, str, str]] = set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self.records:
            self.pairs.add(
                (record["envelope"]["institution_id"], str(record["patient_mrn"]), str(record["local_code"]))
            )
            yield record


def wait_judged(running: suite.Pipeline, timeout: float) -> None:
    """Until the clinical stage (the worker's Faust group) has committed every normalised result: the
    store may be done before it, and its tables are what is counted."""
    topic = running.topics.norm("lab")
    ends = running.end_offsets([topic])
    deadline = time.monotonic() + timeout
    stream = running.settings.stream
    group = app_id_for(stream, ROLES if running.layout == "one" else ("clinical",))
    admin = pipeline.admin_client(running.client)
    while not pipeline.committed_to_end(admin, group, ends):
        pipeline.check_running(running.workers, running.workdir)
        if time.monotonic() > deadline:
            raise SystemExit(f"the clinical stage did not judge every result of {topic} in {timeout:.0f}s")
        time.sleep(0.5)


def parse_options(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="offered events/s (default 1000)")
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the paced run (default 600)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between RSS samples (default 60)")
    parser.add_argument(
        "--horizon", type=float, default=None, help="expiry horizon in seconds (default: shipped)"
    )
    parser.add_argument("--patients", type=int, default=CHUNK, help=f"patients per {CHUNK} simulated")
    parser.add_argument("--seed", type=int, default=300)
    parser.add_argument(
        "--layout", choices=("one", "split"), default="one", help="one worker, or one per stage"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=900.0, help="for the store to take every event"
    )
    return parser.parse_args(argv)


def run(options: argparse.Namespace, root: Path, report: Any) -> Mapping[str, Any]:
    if options.horizon is not None:
        # the worker's environment starts from this process's (pipeline.worker_environment)
        os.environ["CLINHUB_STREAM_REFERENCE_DIR"] = str(
            short_horizon_reference(root / "ref", options.horizon)
        )
        os.environ["CLINHUB_STREAM_STATE_EXPIRY_CHECK_SECONDS"] = "1"
    count = max(1, round(options.rate * options.seconds))
    samples: list[tuple[float, list[float]]] = []
    with services(root) as (kafka, registry):
        register_standard(ConfluentRegistry(registry.client_config()))
        with suite.running_pipeline("sqlite", options.layout, kafka, registry, root, None) as running:
            suite.warm_up(running, options.seed, options.drain_timeout)
            pids = [pipeline.worker_pid(worker) for worker in running.workers]
            records = Counted(lab_stream(options.seed + 1, count, suite.CRITICAL_SHARE, options.patients))
            failure: list[BaseException] = []

            def send() -> None:
                try:
                    with LabSender(running.settings) as sender:
                        publish_paced(sender, records, options.rate)
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    failure.append(exc)

            def sample(at: float, note: str = "") -> None:
                samples.append((at, [rss_mb(pid) for pid in pids]))
                each = "  ".join(
                    f"{stage} {mb:7.1f} MB" for stage, mb in zip(running.stages, samples[-1][1], strict=True)
                )
                report(f"t={at:>6.0f}s  RSS {each}{note}")

            sender = threading.Thread(target=send, name="paced-sender")
            started = time.monotonic()
            sample(0.0, f"  (warmed up; {count:,} events to send)")
            sender.start()
            next_sample = started + options.every
            while sender.is_alive():
                sender.join(timeout=max(0.0, min(1.0, next_sample - time.monotonic())))
                pipeline.check_running(running.workers, running.workdir)
                if time.monotonic() >= next_sample:
                    sample(time.monotonic() - started)
                    next_sample += options.every
            if failure:
                raise failure[0]
            sent_seconds = time.monotonic() - started
            running.wait_stored(count, options.drain_timeout)
            wait_judged(running, options.drain_timeout)
            peaks = [pipeline.peak_memory_mb(pid) for pid in pids]
            sample(
                time.monotonic() - started,
                f"  (end: {count:,} stored, judged; sent in {sent_seconds:.0f}s, "
                f"{count / sent_seconds:,.0f}/s; "
                f"peak VmHWM {', '.join(f'{peak:.1f}' for peak in peaks)} MB)",
            )
        sizes = table_sizes(running.workdir / "faust")
    for table, keys in sizes.items():
        report(f"table {table:<18} {keys:>9,} keys")
    report(f"distinct patient-analytes sent: {len(records.pairs):,}")
    for index, stage in enumerate(running.stages):
        start_rss, end_rss = samples[0][1][index], samples[-1][1][index]
        report(f"RSS end / start, {stage}: {end_rss / start_rss:.2f} ({start_rss:.1f} -> {end_rss:.1f} MB)")
    return {"samples": samples, "tables": sizes, "pairs": len(records.pairs), "peak_mb": peaks}


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    root = Path(tempfile.mkdtemp(prefix="clinhub-bench-memory-"))
    horizon = "shipped" if options.horizon is None else f"{options.horizon:g} s"
    print(
        f"memory bench: {options.rate:g}/s for {options.seconds:g}s, expiry horizon {horizon}, "
        f"layout {options.layout}",
        flush=True,
    )
    try:
        run(options, root, lambda line: print(line, flush=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
