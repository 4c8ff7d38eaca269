"""Does `clinhub simulate --rate R` reach R? The command itself, paced, against a real broker, no workers.

    .venv/bin/python -m benchmarks.simulate_bench [--rates 1000,5000] [--seconds 10]

Starts its own Kafka and schema registry (benchmarks/local_services.py), makes the topics and each
institution's principal and ACLs (`clinhub.provision`), and runs `clinhub simulate --labs-only --count
rate*seconds --rate R` as a subprocess for each rate, as a user would. Prints the rate the command
reports (first to last send, `producers/pacing.py`), its ratio to the offered rate, and that every event
was confirmed. The command simulates every event before its schedule starts, so that time is not counted.
Also the broker's CPU per event over each run (`--warm-up S` first, paced at the first rate and not
counted: the broker's JIT compiles under load), and the command's own, its simulating included.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import suite
from benchmarks.local_services import broker_pid, services, worker_env
from benchmarks.pipeline import cpu_seconds
from clinhub.provision import provision
from core.settings import DatabaseSettings
from schemas.registration import register_standard
from schemas.wire import ConfluentRegistry

REPORTED = re.compile(r"published (\d+) events at ([\d.]+) events/s .*confirmed (\d+) of (\d+)")


def achieved(output: str) -> tuple[int, float, int]:
    """(sent, events/s, confirmed) from the command's summary line."""
    found = REPORTED.search(output)
    if found is None:
        raise SystemExit(f"clinhub simulate printed no summary:\n{output[-2000:]}")
    return int(found.group(1)), float(found.group(2)), int(found.group(3))


def run_simulate(
    env: dict[str, str], rate: float, seconds: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`clinhub simulate` paced at `rate` for about `seconds`; its output and its CPU seconds."""
    count = max(2, round(rate * seconds))
    command = [sys.executable, "-m", "clinhub.cli", "simulate", "--labs-only"]
    command += ["--count", str(count), "--rate", f"{rate:g}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"clinhub simulate failed ({done.returncode}):\n{done.stderr[-2000:]}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, used


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="1000,5000", help="offered events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each paced run")
    parser.add_argument("--warm-up", type=float, default=0.0, help="seconds at the first rate, not counted")
    options = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="clinhub-bench-simulate-"))
    try:
        with services(root) as (kafka, registry):
            register_standard(ConfluentRegistry(registry.client_config()))
            database = DatabaseSettings(url=f"sqlite:///{root / 'unused.sqlite3'}")  # type: ignore[arg-type]
            settings = suite.pipeline_settings(kafka, registry, database, root, "sim")
            provision(settings)
            env = {
                **os.environ,
                **worker_env(kafka, registry),
                "CLINHUB_STREAM_TOPIC_PREFIX": settings.stream.topic_prefix,
                "CLINHUB_LOG_LEVEL": "WARNING",
            }
            rates = [float(text) for text in options.rates.split(",")]
            broker = broker_pid(root)
            if options.warm_up > 0:
                run_simulate(env, rates[0], options.warm_up)
            for rate in rates:
                broker_before = cpu_seconds(broker)
                done, own_cpu = run_simulate(env, rate, options.seconds)
                broker_cpu = cpu_seconds(broker) - broker_before
                sent, reached, confirmed = achieved(done.stdout)
                print(
                    f"simulate --rate {rate:,.0f}: {reached:,.1f} events/s reached "
                    f"({reached / rate:.3f}x of offered), "
                    f"{confirmed:,} of {sent:,} confirmed; CPU per event: "
                    f"broker {broker_cpu / sent * 1e6:,.0f} us, command {own_cpu / sent * 1e6:,.0f} us",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
