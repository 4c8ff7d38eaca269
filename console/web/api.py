"""The JSON API (/api/v1) for hospitals' own systems: the same views as the pages, under the same rules
and audit. Bearer tokens come from POST /api/v1/tokens; a browser session works too (with X-CSRF-Token
on changes)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from console.exceptions import InvalidInputError
from console.runtime.service import parse_filters
from console.web.deps import console_of, current_caller
from console.web.security import Caller, check_csrf, remote_addr

router = APIRouter(prefix="/api/v1", tags=["console"])
CallerDep = Annotated[Caller, Depends(current_caller)]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    reason: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Not signed in: no, an expired or a revoked token"},
    403: {"model": ErrorOut, "description": "Not allowed for this user (audited)"},
    404: {"model": ErrorOut, "description": "No such alert"},
    422: {"description": "A field the console cannot accept, named with the reason"},
}
# Operations with a JSON body: one that does not parse is refused before validation (found by fuzzing)
BAD_BODY: dict[int | str, dict[str, Any]] = {400: {"description": "The body is not valid JSON"}}
# Operations that publish to Kafka: the broker did not confirm, nothing was done (Retry-After)
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "Not confirmed by the broker; nothing was recorded, try again"}
}


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenOut(BaseModel):
    token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth token type, not a secret
    expires_time: dt.datetime
    username: str
    role: str
    institution_id: str | None


class PatientOut(BaseModel):
    regional_patient_id: str
    birth_year: int | None
    sex: str | None
    mrn: str | None = Field(description="The MRN at the alert's institution; only for its own users")
    family_name: str | None = Field(
        default=None,
        description="The family name the alert's institution sent for that MRN, as written; only for its "
        "own users, exactly where the MRN is",
    )
    given_name: str | None = Field(
        default=None,
        description="The given name(s) the alert's institution sent for that MRN, as written; only for its "
        "own users, exactly where the MRN is",
    )


class ChainStepOut(BaseModel):
    level: int
    recipient: str
    reached: bool
    current: bool
    due_time: str | None


class AlertOut(BaseModel):
    alert_id: str
    status: str
    institution_id: str
    ward: str | None
    severity: str
    patient: PatientOut
    analyte: str
    loinc_code: str
    value: float
    value_comparator: str | None
    unit: str
    sent_value: float | None
    sent_unit: str | None
    sent_text: str | None
    limit_kind: str
    limit_value: float
    rule_source: str
    message: str
    previous_value: float | None
    previous_time: str | None
    result_time: str | None
    raised_time: str | None
    minutes_since_result: float
    escalation_level: int
    current_recipient: str
    next_escalation_time: str | None
    seconds_to_escalation: float | None
    escalation_chain: list[ChainStepOut]
    suppressed_repeats: int
    acknowledged_by: str | None
    acknowledged_time: str | None
    minutes_to_acknowledge: float | None
    no_action_recorded: bool
    in_my_queue: bool
    changed_time: str | None


class AckRecordOut(BaseModel):
    ack_id: str
    acknowledged_by: str
    role: str | None
    channel: str
    read_back: bool
    acknowledged_time: dt.datetime
    note: str | None


class AlertDetailOut(BaseModel):
    alert: AlertOut
    acknowledgements: list[AckRecordOut]


class AcknowledgeIn(BaseModel):
    """The read-back: the patient's MRN (at the alert's institution) or regional id, and the value."""

    model_config = ConfigDict(extra="forbid")
    patient_identifier: str = Field(min_length=1, max_length=128)
    value: str = Field(min_length=1, max_length=64)
    note: str | None = Field(default=None, max_length=2000)


class AcknowledgeOut(BaseModel):
    alert_id: str
    acknowledged_by: str
    acknowledged_time: dt.datetime
    minutes_after_result: float
    note: str | None


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field(min_length=1, max_length=2000)


class TimelineEntryOut(BaseModel):
    time: dt.datetime
    kind: str
    entry_id: str
    institution_id: str
    code: str | None
    display: str | None
    value: float | None
    unit: str | None
    status: str | None


class PatientNameOut(BaseModel):
    mrn: str = Field(description="An MRN of the caller's institution (one of mrns_here)")
    family_name: str | None = Field(default=None, description="As the caller's institution wrote it")
    given_name: str | None = Field(default=None, description="As the caller's institution wrote it")


class TimelineOut(BaseModel):
    regional_patient_id: str
    birth_year: int | None
    sex: str | None
    institutions: list[str]
    mrns_here: list[str]
    names_here: list[PatientNameOut] = Field(
        default_factory=list,
        description="The names the caller's institution sent for its MRNs of the patient (none for an MRN "
        "it sent no name for); never another institution's",
    )
    entries: list[TimelineEntryOut]
    next_cursor: str | None


class UnprocessableOut(BaseModel):
    deadletter_id: str
    kind: str | None
    original_topic: str
    original_partition: int
    original_offset: int
    error_class: str
    field: str | None
    reason: str
    possibly_critical: bool
    loinc_code: str | None
    processor: str
    correlation_id: str | None
    failed_time: dt.datetime


class AckFiguresOut(BaseModel):
    institution_id: str
    acknowledged: int
    open: int
    median_minutes: float | None
    p90_minutes: float | None
    within_target_share: float | None


class AuditOut(BaseModel):
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


@router.post("/tokens", response_model=TokenOut, responses={401: ERRORS[401], **BAD_BODY})
def create_token(request: Request, body: TokenIn) -> TokenOut:
    """Exchange a username and password for a bearer token (an API session, audited)."""
    token, session = console_of(request).api_token(body.username, body.password, remote_addr(request))
    p = session.principal
    return TokenOut(
        token=token,
        expires_time=session.expires_time,
        username=p.username,
        role=p.role,
        institution_id=p.institution_id,
    )


@router.get("/alerts", response_model=list[AlertOut], responses=ERRORS)
def list_alerts(
    request: Request,
    caller: CallerDep,
    institution: Annotated[str | None, Query(max_length=32)] = None,
    ward: Annotated[str | None, Query(max_length=64)] = None,
    severity: Annotated[str | None, Query(max_length=16)] = None,
) -> list[dict[str, Any]]:
    """The caller's open alerts, most severe and oldest first."""
    items = console_of(request).queue(caller.request, parse_filters(institution, ward, severity))
    return [item.to_json() for item in items]


@router.get("/acknowledged", response_model=list[AlertOut], responses=ERRORS)
def acknowledged_without_action(request: Request, caller: CallerDep) -> list[dict[str, Any]]:
    """Alerts the caller acknowledged in the last 24 hours with no action recorded yet."""
    return [item.to_json() for item in console_of(request).owned(caller.request)]


@router.get("/alerts/{alert_id}", response_model=AlertDetailOut, responses=ERRORS)
def get_alert(request: Request, alert_id: str, caller: CallerDep) -> dict[str, Any]:
    detail = console_of(request).open_alert(caller.request, alert_id)
    return {"alert": detail.item.to_json(), "acknowledgements": [vars(a) for a in detail.acknowledgements]}


@router.post(
    "/alerts/{alert_id}/acknowledge",
    response_model=AcknowledgeOut,
    responses={
        **ERRORS,
        **BAD_BODY,
        **UNAVAILABLE,
        409: {"model": ErrorOut, "description": "Already acknowledged: by whom and when"},
    },
)
def acknowledge(
    request: Request,
    alert_id: str,
    body: AcknowledgeIn,
    caller: CallerDep,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> AcknowledgeOut:
    """Acknowledge with read-back; published to the acknowledgements topic and confirmed before 200."""
    check_csrf(caller, x_csrf_token)
    outcome = console_of(request).acknowledge(
        caller.request, alert_id, body.patient_identifier, body.value, body.note
    )
    return AcknowledgeOut(**vars(outcome))


@router.post("/alerts/{alert_id}/action", status_code=204, responses={**ERRORS, **BAD_BODY, **UNAVAILABLE})
def record_action(
    request: Request,
    alert_id: str,
    body: ActionIn,
    caller: CallerDep,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> None:
    """Record the action taken on an acknowledged alert."""
    check_csrf(caller, x_csrf_token)
    console_of(request).record_action(caller.request, alert_id, body.note)


@router.get("/patients/{regional_patient_id}/timeline", response_model=TimelineOut, responses=ERRORS)
def timeline(
    request: Request,
    regional_patient_id: str,
    caller: CallerDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TimelineOut:
    """One page of the patient's timeline across institutions, newest first."""
    view = console_of(request).patient(caller.request, regional_patient_id, cursor=cursor, limit=limit)
    s = view.summary
    return TimelineOut(
        regional_patient_id=s.regional_patient_id,
        birth_year=s.birth_year,
        sex=s.sex,
        institutions=s.institutions,
        mrns_here=s.mrns_here,
        names_here=[PatientNameOut.model_validate(vars(name)) for name in s.names_here],
        entries=[TimelineEntryOut.model_validate(vars(entry)) for entry in view.page.entries],
        next_cursor=view.page.next_cursor,
    )


@router.get("/patients", response_model=dict[str, str], responses=ERRORS)
def find_patient(
    request: Request, caller: CallerDep, mrn: Annotated[str, Query(min_length=1, max_length=64)]
) -> dict[str, str]:
    """The regional id of an MRN of the caller's institution."""
    console = console_of(request)
    regional = console.find_patient(caller.request, mrn)
    if (
        regional == mrn.strip()
        and console.reads.find_by_mrn(caller.principal.institution_id or "", mrn.strip()) is None
    ):
        raise InvalidInputError("mrn", "no patient with this MRN at your institution")
    return {"regional_patient_id": regional}


@router.get("/unprocessable", response_model=list[UnprocessableOut], responses=ERRORS)
def unprocessable(
    request: Request,
    caller: CallerDep,
    before: dt.datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[UnprocessableOut]:
    """The caller's institution's rejected messages, newest first (integration staff)."""
    rows = console_of(request).unprocessable(caller.request, before=before, limit=limit)
    return [UnprocessableOut.model_validate(vars(row)) for row in rows]


@router.get("/figures/acknowledgement", response_model=list[AckFiguresOut], responses=ERRORS)
def ack_figures(
    request: Request, caller: CallerDep, days: Annotated[int, Query(ge=1, le=366)] = 7
) -> list[AckFiguresOut]:
    """Time from result to acknowledgement per institution over the last days (operators, admins)."""
    figures = console_of(request).ack_figures(caller.request, days=days)
    return [
        AckFiguresOut(
            institution_id=f.institution_id,
            acknowledged=f.acknowledged,
            open=f.open,
            median_minutes=f.median_minutes,
            p90_minutes=f.p90_minutes,
            within_target_share=f.within_target_share,
        )
        for f in figures
    ]


@router.get("/audit", response_model=list[AuditOut], responses=ERRORS)
def audit(
    request: Request,
    caller: CallerDep,
    username: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
    outcome: Annotated[str | None, Query(max_length=16)] = None,
    before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AuditOut]:
    """The audit log, newest first (admins)."""
    entries = console_of(request).audit_entries(
        caller.request, before_id=before_id, username=username, action=action, outcome=outcome, limit=limit
    )
    return [AuditOut.model_validate(vars(entry)) for entry in entries]
