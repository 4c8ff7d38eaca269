"""The append-only audit log: every patient view, alert opened, acknowledgement, login, failed login and
permission denied. There is no update or delete here, and the database refuses both (migration 0005)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Engine, Table, insert, select

from console.domain.access import Principal
from sinks.models import AuditEntry

AUDIT = cast(Table, AuditEntry.__table__)
OK, DENIED, FAILED = "ok", "denied", "failed"

# Actions, one word each, as the admin's audit view filters them
LOGIN, LOGOUT, TOKEN = "login", "logout", "api_token"
VIEW_QUEUE, VIEW_ALERT, ACKNOWLEDGE, RECORD_ACTION = (
    "view_queue",
    "view_alert",
    "acknowledge",
    "record_action",
)
VIEW_PATIENT, VIEW_UNPROCESSABLE, VIEW_STATS, VIEW_AUDIT = (
    "view_patient",
    "view_unprocessable",
    "view_stats",
    "view_audit",
)
VIEW_NOTIFICATIONS, ACCESS = "view_notifications", "access"


@dataclass(frozen=True)
class AuditRecord:
    audit_id: int
    time: dt.datetime
    username: str | None
    role: str | None
    action: str
    outcome: str
    regional_patient_id: str | None
    alert_id: str | None
    institution_id: str | None
    remote_addr: str | None
    detail: str | None


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def write(
        self,
        *,
        action: str,
        outcome: str,
        now: dt.datetime,
        principal: Principal | None = None,
        username: str | None = None,
        regional_patient_id: str | None = None,
        alert_id: str | None = None,
        institution_id: str | None = None,
        remote_addr: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                insert(AUDIT).values(
                    time=now,
                    username=(principal.username if principal else username or None),
                    role=principal.role if principal else None,
                    action=action,
                    outcome=outcome,
                    regional_patient_id=regional_patient_id,
                    alert_id=alert_id,
                    institution_id=institution_id or (principal.institution_id if principal else None),
                    remote_addr=(remote_addr or "")[:64] or None,
                    detail=(detail or "")[:2000] or None,
                )
            )

    def query(
        self,
        *,
        username: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        regional_patient_id: str | None = None,
        alert_id: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Newest first; page with `before_id` (the last audit_id of the previous page)."""
        conditions = []
        for column, value in (
            (AUDIT.c.username, username),
            (AUDIT.c.action, action),
            (AUDIT.c.outcome, outcome),
            (AUDIT.c.regional_patient_id, regional_patient_id),
            (AUDIT.c.alert_id, alert_id),
        ):
            if value:
                conditions.append(column == value)
        if before_id is not None:
            conditions.append(AUDIT.c.audit_id < before_id)
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(AUDIT)
                .where(*conditions)
                .order_by(AUDIT.c.audit_id.desc())
                .limit(max(1, min(limit, 500)))
            ).all()
        return [
            AuditRecord(
                audit_id=row.audit_id,
                time=row.time if row.time.tzinfo else row.time.replace(tzinfo=dt.UTC),
                username=row.username,
                role=row.role,
                action=row.action,
                outcome=row.outcome,
                regional_patient_id=row.regional_patient_id,
                alert_id=row.alert_id,
                institution_id=row.institution_id,
                remote_addr=row.remote_addr,
                detail=row.detail,
            )
            for row in rows
        ]
