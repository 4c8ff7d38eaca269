"""The ACK ledger of the MLLP gateway: the answers already given, kept across restarts.

A sender that lost our ACK sends the same message again (same sending facility, same MSH-10). The ledger
returns the ACK it was given the first time, byte for byte, and nothing is published again. Only final
answers are kept: AA (every event durably on Kafka) and AE (a content error, dead-lettered). An AR means
"not processed, send it again", so it is never kept.

SQLite in WAL mode, one short transaction per call. Calls block: the gateway runs them in a thread (one
connection, serialised by a lock), never on its event loop. Entries older than `keep_days` are pruned at
open and by `prune()`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mllp_acks (
    institution  TEXT NOT NULL,
    facility     TEXT NOT NULL,
    control_id   TEXT NOT NULL,
    code         TEXT NOT NULL,
    ack          BLOB NOT NULL,
    message_sha256 TEXT NOT NULL,
    created      REAL NOT NULL,
    PRIMARY KEY (institution, facility, control_id)
);
CREATE INDEX IF NOT EXISTS mllp_acks_created ON mllp_acks (created);
"""


@dataclass(frozen=True)
class LedgerKey:
    """Who sent it (the listener's institution, MSH-4 as sent) and its control id (MSH-10)."""

    institution: str
    facility: str
    control_id: str


@dataclass(frozen=True)
class LedgerEntry:
    code: str
    ack: bytes
    message_sha256: str
    created: float


def message_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class AckLedger:
    """The ACKs given, by (institution, sending facility, MSH-10). Thread-safe; blocking."""

    def __init__(self, path: Path, keep_days: float) -> None:
        self.path = Path(path)
        self.keep_seconds = keep_days * 86_400.0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self.prune()

    def get(self, key: LedgerKey) -> LedgerEntry | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT code, ack, message_sha256, created FROM mllp_acks"
                " WHERE institution = ? AND facility = ? AND control_id = ? AND created >= ?",
                (key.institution, key.facility, key.control_id, time.time() - self.keep_seconds),
            ).fetchone()
        if row is None:
            return None
        return LedgerEntry(
            code=str(row[0]), ack=bytes(row[1]), message_sha256=str(row[2]), created=float(row[3])
        )

    def put(self, key: LedgerKey, code: str, ack: bytes, raw: bytes) -> None:
        """Keep a final answer (AA or AE). The first answer wins: a concurrent duplicate keeps the first."""
        if code not in ("AA", "AE"):
            raise ValueError(f"only AA and AE answers are kept, not {code!r}")
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO mllp_acks"
                " (institution, facility, control_id, code, ack, message_sha256, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.institution, key.facility, key.control_id, code, ack, message_digest(raw), time.time()),
            )

    def prune(self) -> int:
        """Forget answers older than the retention; returns how many were removed."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM mllp_acks WHERE created < ?", (time.time() - self.keep_seconds,)
            )
            return int(cursor.rowcount)

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM mllp_acks").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
