"""The console's use cases, each a plain method over the store, the audit log and the ack publisher:
authorise, do, audit. The web handlers only translate HTTP to these calls and back.

Every method blocks on the database; the web layer runs them in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from console.domain import queue as q
from console.domain.access import AlertScope, Principal, can_see_alert, in_queue_of, sees_local_identity
from console.domain.readback import ReadBackTarget, check_read_back
from console.exceptions import (
    AlertClosedError,
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from console.runtime import audit as actions
from console.runtime.accounts import API, BROWSER, Accounts, Session
from console.runtime.acks import acknowledgement_record
from console.runtime.audit import DENIED, FAILED, OK, AuditLog, AuditRecord
from console.runtime.store import AckView, AlertView, ConsoleReads, HistoryView, LabSeries, PatientSummary
from console.runtime.store import Unprocessable as UnprocessableRow
from sinks.queries import InvalidCursorError, TimelinePage, patient_timeline
from streams.domain.reference import EscalationPolicy, ReferenceData

MAX_NOTE = 2000
PENDING_ACK_MEMORY = dt.timedelta(minutes=10)


class AckSink(Protocol):
    def publish(self, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ConsoleOptions:
    session_lifetime: dt.timedelta
    api_token_lifetime: dt.timedelta
    no_action_after: dt.timedelta


@dataclass(frozen=True)
class Terms:
    """From the reference data: analyte names by LOINC, and each analyte's unbanded critical limits (in
    its canonical unit), for labels and trend plots."""

    names: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def name(self, code: str | None, given: str | None = None) -> str | None:
        """A stored name unless it is only the code again; else the reference's name; else the code."""
        if given and given != code:
            return given
        return self.names.get(code or "", code)

    @classmethod
    def from_reference(cls, reference: ReferenceData) -> Terms:
        limits = {
            loinc: (rule.low, rule.high)
            for loinc, rules in reference.rulebook.thresholds.items()
            for rule in rules
            if not rule.has_age_band and rule.sex is None
        }
        return cls({loinc: analyte.name for loinc, analyte in reference.analytes.items()}, limits)


@dataclass(frozen=True)
class Request:
    """Who asks, and from where (for the audit log)."""

    principal: Principal
    remote_addr: str | None


@dataclass(frozen=True)
class QueueItem:
    """One alert as this user may see it. `show_mrn`: the patient's MRN at the alert's institution and the
    name it sent are shown (to that institution's clinicians only)."""

    alert: AlertView
    show_mrn: bool
    chain: list[q.ChainStep]
    current_recipient: str
    minutes_since_result: float
    seconds_to_escalation: float | None
    acknowledged_by: str | None
    acknowledged_time: dt.datetime | None
    no_action_recorded: bool
    in_my_queue: bool

    @property
    def status(self) -> str:
        return "acknowledged" if self.acknowledged_time is not None else "open"

    def to_json(self) -> dict[str, Any]:
        a = self.alert
        return {
            "alert_id": a.alert_id,
            "status": self.status,
            "institution_id": a.institution_id,
            "ward": a.ward,
            "severity": a.severity,
            "patient": {
                "regional_patient_id": a.regional_patient_id,
                "birth_year": a.birth_year,
                "sex": a.sex,
                "mrn": a.mrn if self.show_mrn else None,
                "family_name": a.family_name if self.show_mrn else None,
                "given_name": a.given_name if self.show_mrn else None,
            },
            "analyte": a.analyte,
            "loinc_code": a.loinc_code,
            "value": a.value,
            "value_comparator": a.value_comparator,
            "unit": a.unit,
            "sent_value": a.sent_value,
            "sent_unit": a.sent_unit,
            "sent_text": a.sent_text,
            "limit_kind": a.limit_kind,
            "limit_value": a.limit_value,
            "rule_source": a.rule_source,
            "message": a.message,
            "previous_value": a.previous_value,
            "previous_time": _iso(a.previous_time),
            "result_time": _iso(a.result_time),
            "raised_time": _iso(a.raised_time),
            "minutes_since_result": round(self.minutes_since_result, 1),
            "escalation_level": a.escalation_level,
            "current_recipient": self.current_recipient,
            "next_escalation_time": _iso(a.pending_deadline),
            "seconds_to_escalation": None
            if self.seconds_to_escalation is None
            else round(self.seconds_to_escalation),
            "escalation_chain": [
                {
                    "level": step.level,
                    "recipient": step.recipient,
                    "reached": step.reached,
                    "current": step.current,
                    "due_time": _iso(step.due_time),
                }
                for step in self.chain
            ],
            "suppressed_repeats": a.suppressed_repeats,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_time": _iso(self.acknowledged_time),
            "minutes_to_acknowledge": None
            if self.acknowledged_time is None
            else round(q.minutes_between(a.result_time, self.acknowledged_time), 1),
            "no_action_recorded": self.no_action_recorded,
            "in_my_queue": self.in_my_queue,
            "changed_time": _iso(a.changed_time),
        }


@dataclass(frozen=True)
class AlertDetail:
    item: QueueItem
    acknowledgements: list[AckView]
    history: list[HistoryView]


@dataclass(frozen=True)
class AckOutcome:
    alert_id: str
    acknowledged_by: str
    acknowledged_time: dt.datetime
    minutes_after_result: float
    note: str | None


@dataclass(frozen=True)
class PatientView:
    summary: PatientSummary
    page: TimelinePage
    labs: list[LabSeries]
    alerts: list[tuple[QueueItem, list[AckView]]]


@dataclass(frozen=True)
class QueueFilters:
    institution: str | None = None
    ward: str | None = None
    severity: str | None = None


@dataclass
class _Pending:
    """Acknowledgements this process published that the store may not show yet."""

    by_alert: dict[str, tuple[str, dt.datetime]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, alert_id: str, username: str, when: dt.datetime) -> None:
        with self.lock:
            self.by_alert[alert_id] = (username, when)

    def get(self, alert_id: str, now: dt.datetime) -> tuple[str, dt.datetime] | None:
        with self.lock:
            for key, (_, when) in list(self.by_alert.items()):
                if now - when > PENDING_ACK_MEMORY:
                    del self.by_alert[key]
            return self.by_alert.get(alert_id)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _scope(alert: AlertView) -> AlertScope:
    return AlertScope(alert.institution_id, alert.ward, alert.escalation_level)


class Console:
    def __init__(
        self,
        reads: ConsoleReads,
        accounts: Accounts,
        audit: AuditLog,
        acks: AckSink,
        policy: EscalationPolicy,
        options: ConsoleOptions,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        terms: Terms | None = None,
    ) -> None:
        self.terms = terms or Terms()
        self.reads = reads
        self.accounts = accounts
        self.audit_log = audit
        self._acks = acks
        self.policy = policy
        self.options = options
        self.clock = clock
        self._pending = _Pending()

    # sign-in

    def login(
        self, username: str, password: str, remote_addr: str | None, kind: str = BROWSER
    ) -> tuple[str, Session]:
        now = self.clock()
        try:
            account = self.accounts.authenticate(username, password)
        except AuthenticationError:
            self.audit_log.write(
                action=actions.LOGIN if kind == BROWSER else actions.TOKEN,
                outcome=FAILED,
                now=now,
                username=username[:64] or None,
                remote_addr=remote_addr,
                detail="wrong username or password, or account disabled",
            )
            raise
        lifetime = self.options.session_lifetime if kind == BROWSER else self.options.api_token_lifetime
        token, session = self.accounts.open_session(account, kind, lifetime, now, remote_addr)
        self.audit_log.write(
            action=actions.LOGIN if kind == BROWSER else actions.TOKEN,
            outcome=OK,
            now=now,
            principal=session.principal,
            remote_addr=remote_addr,
        )
        return token, session

    def api_token(self, username: str, password: str, remote_addr: str | None) -> tuple[str, Session]:
        return self.login(username, password, remote_addr, kind=API)

    def logout(self, token: str, request: Request) -> None:
        self.accounts.close_session(token)
        self.audit_log.write(
            action=actions.LOGOUT,
            outcome=OK,
            now=self.clock(),
            principal=request.principal,
            remote_addr=request.remote_addr,
        )

    def session(self, token: str) -> Session:
        return self.accounts.session(token, self.clock())

    def refused(
        self, error: PermissionDeniedError, token: str | None, remote_addr: str | None, path: str
    ) -> None:
        """Audit a refusal raised before any use case ran (a missing CSRF token, an expired login form)."""
        principal = None
        if token:
            try:
                principal = self.session(token).principal
            except AuthenticationError:
                principal = None
        self.audit_log.write(
            action=actions.ACCESS,
            outcome=DENIED,
            now=self.clock(),
            principal=principal,
            remote_addr=remote_addr,
            detail=f"{path}: {error}"[:2000],
        )

    def deny(
        self, request: Request, action: str, what: str, reason: str, **subject: str | None
    ) -> PermissionDeniedError:
        """Audit a refusal and return the error to raise."""
        self.audit_log.write(
            action=action,
            outcome=DENIED,
            now=self.clock(),
            principal=request.principal,
            remote_addr=request.remote_addr,
            detail=f"{what}: {reason}",
            **subject,
        )
        return PermissionDeniedError(what, reason, audited=True)

    # the queue

    def _item(self, principal: Principal, alert: AlertView, now: dt.datetime) -> QueueItem:
        pending = None if alert.acknowledged else self._pending.get(alert.alert_id, now)
        acknowledged_by = alert.acknowledged_by or (pending[0] if pending else None)
        acknowledged_time = alert.acknowledged_time or (pending[1] if pending else None)
        deadline = None if acknowledged_time else alert.pending_deadline
        return QueueItem(
            alert=alert,
            show_mrn=sees_local_identity(principal, alert.institution_id),
            chain=q.escalation_chain(
                self.policy, alert.severity, alert.escalation_level, alert.raised_time, deadline
            ),
            current_recipient=alert.escalation_recipient or self.policy.recipient_for(alert.escalation_level),
            minutes_since_result=q.minutes_between(alert.result_time, now),
            seconds_to_escalation=q.seconds_left(deadline, now),
            acknowledged_by=acknowledged_by,
            acknowledged_time=acknowledged_time,
            no_action_recorded=q.no_action_recorded(
                acknowledged_time, alert.action_noted, now, self.options.no_action_after
            ),
            in_my_queue=in_queue_of(principal, _scope(alert)),
        )

    def _check_filters(self, filters: QueueFilters) -> None:
        if filters.severity and filters.severity not in q.SEVERITIES:
            raise InvalidInputError("severity", f"one of {', '.join(q.SEVERITIES)}")

    def queue(self, request: Request, filters: QueueFilters = QueueFilters()) -> list[QueueItem]:
        """The user's open alerts, most severe and oldest first; escalated ones reach the users of the
        next level of the chain."""
        principal = request.principal
        if not principal.clinical:
            raise self.deny(request, actions.VIEW_QUEUE, "alerts", "only clinicians have an alert queue")
        self._check_filters(filters)
        if filters.institution and filters.institution != principal.institution_id:
            raise self.deny(
                request,
                actions.VIEW_QUEUE,
                "alerts",
                "alerts of another institution",
                institution_id=filters.institution,
            )
        now = self.clock()
        rows = self.reads.alerts(
            institutions=[principal.institution_id or ""],
            severities=[filters.severity] if filters.severity else None,
            wards=[filters.ward] if filters.ward else None,
        )
        items = [self._item(principal, row, now) for row in rows]
        mine = [item for item in items if item.in_my_queue and item.acknowledged_time is None]
        return sorted(
            mine,
            key=lambda item: q.sort_key(item.alert.severity, item.alert.result_time, item.alert.alert_id),
        )

    def owned(self, request: Request, within: dt.timedelta = dt.timedelta(hours=24)) -> list[QueueItem]:
        """Alerts the user acknowledged lately with no action recorded yet: acknowledgement is ownership."""
        principal = request.principal
        if not principal.clinical:
            return []
        now = self.clock()
        rows = self.reads.alerts(
            institutions=[principal.institution_id or ""],
            open_only=False,
            acknowledged_by=principal.username,
            acknowledged_since=now - within,
        )
        items = [self._item(principal, row, now) for row in rows if not row.action_noted]
        return sorted(items, key=lambda item: item.acknowledged_time or now)

    def changes(self, request: Request, since: dt.datetime) -> list[QueueItem]:
        """Alerts of the user's that changed since a moment (the live feed), acknowledged ones included."""
        principal = request.principal
        if not principal.clinical:
            return []
        now = self.clock()
        rows = self.reads.alerts(institutions=[principal.institution_id or ""], open_only=False, since=since)
        return [
            item
            for item in (self._item(principal, row, now) for row in rows)
            if can_see_alert(principal, _scope(item.alert))
        ]

    def latest_change(self) -> dt.datetime | None:
        return self.reads.latest_change()

    def _visible_alert(self, request: Request, alert_id: str, action: str) -> AlertView:
        alert = self.reads.alert(alert_id)
        if alert is None:
            raise NotFoundError("alert", alert_id)
        if not can_see_alert(request.principal, _scope(alert)):
            raise self.deny(
                request,
                action,
                "alert",
                "not an alert of your institution and wards",
                alert_id=alert_id,
                institution_id=alert.institution_id,
            )
        return alert

    def open_alert(self, request: Request, alert_id: str) -> AlertDetail:
        alert = self._visible_alert(request, alert_id, actions.VIEW_ALERT)
        self.audit_log.write(
            action=actions.VIEW_ALERT,
            outcome=OK,
            now=self.clock(),
            principal=request.principal,
            remote_addr=request.remote_addr,
            alert_id=alert_id,
            regional_patient_id=alert.regional_patient_id,
            institution_id=alert.institution_id,
        )
        return AlertDetail(
            self._item(request.principal, alert, self.clock()),
            self.reads.acknowledgements(alert_id),
            self.reads.history(alert_id),
        )

    def acknowledge(
        self, request: Request, alert_id: str, patient_identifier: str, value: str, note: str | None
    ) -> AckOutcome:
        """Read-back checked, then published and confirmed by Kafka; a closed alert says by whom."""
        alert = self._visible_alert(request, alert_id, actions.ACKNOWLEDGE)
        now = self.clock()
        item = self._item(request.principal, alert, now)
        subject = {
            "alert_id": alert_id,
            "regional_patient_id": alert.regional_patient_id,
            "remote_addr": request.remote_addr,
        }
        if item.acknowledged_time is not None:
            self.audit_log.write(
                action=actions.ACKNOWLEDGE,
                outcome=FAILED,
                now=now,
                principal=request.principal,
                detail=f"already acknowledged by {item.acknowledged_by}",
                **subject,
            )
            raise AlertClosedError(alert_id, item.acknowledged_by, _iso(item.acknowledged_time))
        if note is not None and len(note) > MAX_NOTE:
            raise InvalidInputError("note", f"at most {MAX_NOTE} characters")
        target = ReadBackTarget(
            regional_patient_id=alert.regional_patient_id,
            mrn=alert.mrn if item.show_mrn else None,
            values=tuple(v for v in (alert.value, alert.sent_value) if v is not None),
            comparator=alert.value_comparator,
        )
        try:
            check_read_back(target, patient_identifier, value)
        except InvalidInputError as exc:
            self.audit_log.write(
                action=actions.ACKNOWLEDGE,
                outcome=FAILED,
                now=now,
                principal=request.principal,
                detail=f"read-back: {exc.field} {exc.reason}",
                **subject,
            )
            raise
        record = acknowledgement_record(
            alert_id=alert_id,
            regional_patient_id=alert.regional_patient_id,
            username=request.principal.username,
            role=item.current_recipient if request.principal.chain_level == alert.escalation_level else None,
            read_back=True,
            note=note,
            now=now,
        )
        self._acks.publish(record)
        self._pending.add(alert_id, request.principal.username, now)
        self.audit_log.write(
            action=actions.ACKNOWLEDGE,
            outcome=OK,
            now=now,
            principal=request.principal,
            detail="with action note" if record["note"] else "no action note",
            **subject,
        )
        return AckOutcome(
            alert_id=alert_id,
            acknowledged_by=request.principal.username,
            acknowledged_time=now,
            minutes_after_result=q.minutes_between(alert.result_time, now),
            note=record["note"],
        )

    def record_action(self, request: Request, alert_id: str, note: str) -> None:
        """The action taken on an acknowledged alert: another acknowledgement record, carrying the note."""
        alert = self._visible_alert(request, alert_id, actions.RECORD_ACTION)
        text = (note or "").strip()
        if not text:
            raise InvalidInputError("note", "describe the action taken")
        if len(text) > MAX_NOTE:
            raise InvalidInputError("note", f"at most {MAX_NOTE} characters")
        now = self.clock()
        if self._item(request.principal, alert, now).acknowledged_time is None:
            raise InvalidInputError("alert", "acknowledge the alert (with read-back) first")
        self._acks.publish(
            acknowledgement_record(
                alert_id=alert_id,
                regional_patient_id=alert.regional_patient_id,
                username=request.principal.username,
                role=None,
                read_back=False,
                note=text,
                now=now,
            )
        )
        self.audit_log.write(
            action=actions.RECORD_ACTION,
            outcome=OK,
            now=now,
            principal=request.principal,
            alert_id=alert_id,
            regional_patient_id=alert.regional_patient_id,
            remote_addr=request.remote_addr,
        )

    # the patient view

    def find_patient(self, request: Request, identifier: str) -> str:
        """A regional id from what the user typed: their institution's MRN, or a regional id."""
        principal = request.principal
        if not principal.clinical:
            raise self.deny(request, actions.VIEW_PATIENT, "patient", "only clinicians see patients")
        text = identifier.strip()
        if not text:
            raise InvalidInputError("q", "enter an MRN of your institution or a regional id")
        found = self.reads.find_by_mrn(principal.institution_id or "", text)
        return found or text

    def patient(
        self, request: Request, regional_patient_id: str, cursor: str | None = None, limit: int = 50
    ) -> PatientView:
        principal = request.principal
        subject = {"regional_patient_id": regional_patient_id[:40]}
        if not principal.clinical:
            raise self.deny(
                request, actions.VIEW_PATIENT, "patient", "only clinicians see patients", **subject
            )
        if not 1 <= limit <= 200:
            raise InvalidInputError("limit", "between 1 and 200")
        if not self.reads.known_at(regional_patient_id, principal.institution_id or ""):
            raise self.deny(
                request, actions.VIEW_PATIENT, "patient", "not a patient known at your institution", **subject
            )
        try:
            page = patient_timeline(
                self.reads.engine, regional_patient_id, limit=limit, cursor=cursor, newest_first=True
            )
        except InvalidCursorError as exc:
            raise InvalidInputError("cursor", str(exc)) from None
        now = self.clock()
        canonical, ids = self.reads.patient_ids(regional_patient_id)
        alerts = self.reads.alerts(open_only=False, regional_patient_ids=ids, limit=200)
        self.audit_log.write(
            action=actions.VIEW_PATIENT,
            outcome=OK,
            now=now,
            principal=principal,
            regional_patient_id=canonical,
            remote_addr=request.remote_addr,
        )
        return PatientView(
            summary=self.reads.patient_summary(regional_patient_id, principal.institution_id),
            page=page,
            labs=self.reads.lab_series(regional_patient_id),
            alerts=[
                (self._item(principal, alert, now), self.reads.acknowledgements(alert.alert_id))
                for alert in sorted(alerts, key=lambda a: a.raised_time, reverse=True)
            ],
        )

    # unprocessable results, figures, audit

    def unprocessable(
        self, request: Request, before: dt.datetime | None = None, limit: int = 100
    ) -> list[UnprocessableRow]:
        principal = request.principal
        if not principal.sees_unprocessable:
            raise self.deny(
                request,
                actions.VIEW_UNPROCESSABLE,
                "unprocessable results",
                "for integration staff of the institution",
            )
        if not 1 <= limit <= 500:
            raise InvalidInputError("limit", "between 1 and 500")
        rows = self.reads.unprocessable(principal.institution_id or "", before=before, limit=limit)
        self.audit_log.write(
            action=actions.VIEW_UNPROCESSABLE,
            outcome=OK,
            now=self.clock(),
            principal=principal,
            remote_addr=request.remote_addr,
        )
        return rows

    def ack_figures(self, request: Request, days: int = 7) -> list[q.AckStats]:
        """Median and 90th percentile time to acknowledge per institution, and the share within target."""
        if not request.principal.sees_aggregates:
            raise self.deny(request, actions.VIEW_STATS, "figures", "for regional operators and admins")
        now = self.clock()
        acknowledged = self.reads.acknowledged_since(now - dt.timedelta(days=days))
        open_alerts = self.reads.open_alerts()
        institutions = sorted({i for i, _, _ in acknowledged} | {i for i, _, _ in open_alerts})
        figures = []
        for institution in institutions:
            pairs = [
                (minutes, self.policy.deadline_for(severity).total_seconds() / 60.0)
                for i, severity, minutes in acknowledged
                if i == institution
            ]
            figures.append(
                q.ack_stats(institution, pairs, sum(1 for i, _, _ in open_alerts if i == institution))
            )
        return figures

    def open_by_age(self, request: Request) -> dict[str, dict[str, int]]:
        if not request.principal.sees_aggregates:
            raise self.deny(request, actions.VIEW_STATS, "figures", "for regional operators and admins")
        now = self.clock()
        table: dict[str, dict[str, int]] = {}
        for institution, _, result_time in self.reads.open_alerts():
            row = table.setdefault(institution, dict.fromkeys(q.AGE_BUCKETS, 0))
            row[q.age_bucket(q.minutes_between(result_time, now))] += 1
        return dict(sorted(table.items()))

    def audit_entries(
        self, request: Request, before_id: int | None = None, limit: int = 100, **filters: str | None
    ) -> list[AuditRecord]:
        if not request.principal.is_admin:
            raise self.deny(request, actions.VIEW_AUDIT, "audit log", "for admins")
        entries = self.audit_log.query(before_id=before_id, limit=limit, **filters)
        self.audit_log.write(
            action=actions.VIEW_AUDIT,
            outcome=OK,
            now=self.clock(),
            principal=request.principal,
            remote_addr=request.remote_addr,
        )
        return entries


def parse_filters(institution: str | None, ward: str | None, severity: str | None) -> QueueFilters:
    return QueueFilters(institution or None, ward or None, (severity or "").upper() or None)


def institutions_of(items: Collection[QueueItem]) -> list[str]:
    return sorted({item.alert.institution_id for item in items})
