"""The resources this gateway created, kept in a small SQLite file so `If-None-Exist` finds them again
after a restart: a retried create returns the existing resource's Location and publishes nothing.

Only resources whose every event Kafka confirmed are recorded. One table of resources (institution,
type, logical id, content hash, the body as answered), one of their identifiers (system, value)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_FILE = "fhir-ledger.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fhir_resources (
    institution TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    body TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (institution, resource_type, logical_id)
);
CREATE TABLE IF NOT EXISTS fhir_identifiers (
    institution TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    PRIMARY KEY (institution, resource_type, system, value, logical_id)
);
CREATE INDEX IF NOT EXISTS fhir_identifiers_value ON fhir_identifiers (institution, resource_type, value);
"""


@dataclass(frozen=True)
class LedgerEntry:
    resource_type: str
    logical_id: str
    body: dict[str, Any]

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.logical_id}/_history/1"


class ResourceLedger:
    """Thread-safe (one connection, one lock): the handlers call it from worker threads."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def find(self, institution: str, resource_type: str, system: str | None, value: str) -> list[LedgerEntry]:
        """The resources of this institution and type with that identifier (any system when None)."""
        query = (
            "SELECT DISTINCT r.resource_type, r.logical_id, r.body FROM fhir_identifiers i"
            " JOIN fhir_resources r ON r.institution = i.institution"
            " AND r.resource_type = i.resource_type AND r.logical_id = i.logical_id"
            " WHERE i.institution = ? AND i.resource_type = ? AND i.value = ?"
        )
        params: list[str] = [institution, resource_type, value]
        if system is not None:
            query += " AND i.system = ?"
            params.append(system)
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [LedgerEntry(row[0], row[1], json.loads(row[2])) for row in rows]

    def record(
        self,
        institution: str,
        resource_type: str,
        logical_id: str,
        content_hash: str,
        body: dict[str, Any],
        identifiers: tuple[tuple[str | None, str], ...],
    ) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO fhir_resources VALUES (?, ?, ?, ?, ?, ?)",
                    (institution, resource_type, logical_id, content_hash, json.dumps(body), now),
                )
                self._conn.executemany(
                    "INSERT OR IGNORE INTO fhir_identifiers VALUES (?, ?, ?, ?, ?)",
                    [
                        (institution, resource_type, system or "", value, logical_id)
                        for system, value in identifiers
                    ],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
