"""`clinhub import csv FILE --institution ID --mapping MAPPING [--rejects PATH]`: the CSV gateway, wired.

A one-shot command, so it exposes no /metrics (nothing would scrape it before it ends): what a
gateway's counters would say is in the summary it prints (rows read, published, already imported,
rejected, not published) and in its exit status (0 when every valid row is in Kafka, 1 when some
were not published).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from core import principals
from core.exceptions import HubError
from core.settings import HubSettings
from producers.exceptions import PublishError
from producers.gateways.csv_import import (
    CsvImportError,
    ImportSummary,
    Ledger,
    check_export,
    load_mapping,
    run_import,
)
from producers.publisher import make_publisher

LEDGER_NAME = "csv-ledger.sqlite3"


def ledger_path(settings: HubSettings) -> Path:
    """Beside the gateways' ACK ledger."""
    return settings.gateway.ledger_path.with_name(LEDGER_NAME)


def default_rejects(file: Path) -> Path:
    return file.with_name(f"{file.name}.rejects.csv")


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None] | None]:
    if total < 200 or not sys.stdout.isatty():
        yield None
        return
    with typer.progressbar(length=total, label="importing", file=sys.stdout) as bar:
        yield bar.update


def run_csv_import(
    settings: HubSettings, file: Path, institution: str, mapping: Path, rejects: Path | None
) -> None:
    settings = settings.as_principal(principals.GATEWAYS)
    loaded = load_mapping(mapping)
    rejects_path = rejects if rejects is not None else default_rejects(file)
    total = len(check_export(file, loaded, institution)[1])  # fails before any connection
    try:
        publisher = make_publisher(
            settings,
            institution,
            delivery_timeout=settings.gateway.publish_timeout_seconds,
            kinds=(loaded.kind,),
        )
    except HubError as exc:
        raise CsvImportError(f"cannot publish ({exc}); nothing was imported, run the command again") from exc
    ledger = Ledger(ledger_path(settings))
    try:
        with _progress(total) as progress:
            summary = run_import(
                file, loaded, institution, publisher, ledger, rejects_path, progress=progress
            )
    finally:
        ledger.close()
        with contextlib.suppress(PublishError):  # anything still queued was counted as not published
            publisher.close()
    _report(summary)


def _report(summary: ImportSummary) -> None:
    for line in summary.lines():
        typer.echo(line)
    if summary.not_published:
        typer.echo(
            f"error: {summary.not_published} row(s) were not published ({summary.failure}); "
            "run the same command again to send them (rows already in Kafka are not sent again)",
            err=True,
        )
        raise typer.Exit(code=1)
