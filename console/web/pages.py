"""The server-rendered pages. Each handler: who is asking, one Console call, one template."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from console.domain import queue as q
from console.domain.access import ADMIN, CLINICIAN, INTEGRATION, OPERATOR
from console.domain.trend import plot
from console.exceptions import AlertClosedError, AuthenticationError, ConsoleError, InvalidInputError
from console.runtime.service import parse_filters
from console.web.deps import console_of, current_caller
from console.web.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Caller,
    check_csrf,
    check_login_token,
    new_login_token,
    remote_addr,
)

router = APIRouter(include_in_schema=False)
CallerDep = Annotated[Caller, Depends(current_caller)]
HOME = {CLINICIAN: "/queue", INTEGRATION: "/unprocessable", OPERATOR: "/operator", ADMIN: "/admin/audit"}


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    templates = request.app.state.templates
    response: HTMLResponse = templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    return response


def message_page(
    request: Request, exc: ConsoleError, status: int, headers: dict[str, str] | None = None
) -> HTMLResponse:
    response = render(request, "message.html", status_code=status, error=exc, status=status)
    if headers:
        response.headers.update(headers)
    return response


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None, error: str | None = None) -> HTMLResponse:
    token = new_login_token()
    response = render(request, "login.html", login_token=token, next=_safe_next(next), error=error)
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.app.state.secure_cookies,
        max_age=3600,
    )
    return response


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    login_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    check_login_token(request, login_token)
    console = console_of(request)
    try:
        token, session = console.login(username, password, remote_addr(request))
    except AuthenticationError as exc:
        return login_page(request, next=next, error=exc.reason)
    target = _safe_next(next)
    if target == "/":
        target = HOME.get(session.principal.role, "/")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.app.state.secure_cookies,
        max_age=int((session.expires_time - dt.datetime.now(dt.UTC)).total_seconds()),
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, caller: CallerDep, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(caller, csrf_token)
    console_of(request).logout(caller.token, caller.request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
def home(caller: CallerDep) -> Response:
    return RedirectResponse(HOME.get(caller.principal.role, "/login"), status_code=303)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(
    request: Request,
    caller: CallerDep,
    institution: str | None = None,
    ward: str | None = None,
    severity: str | None = None,
) -> HTMLResponse:
    console = console_of(request)
    filters = parse_filters(institution, ward, severity)
    items = console.queue(caller.request, filters)
    owned = console.owned(caller.request)
    latest = console.latest_change()
    return render(
        request,
        "queue.html",
        caller=caller,
        items=items,
        owned=owned,
        filters=filters,
        last_event_id=str(int(latest.timestamp() * 1000)) if latest else "",
        wards=sorted(caller.principal.wards),
        severities=q.SEVERITIES,
    )


@router.get("/alerts/{alert_id}", response_class=HTMLResponse)
def alert_page(request: Request, alert_id: str, caller: CallerDep, done: str | None = None) -> HTMLResponse:
    detail = console_of(request).open_alert(caller.request, alert_id)
    return render(request, "alert.html", caller=caller, detail=detail, item=detail.item, done=done)


def _alert_again(
    request: Request, caller: Caller, alert_id: str, status: int, **context: Any
) -> HTMLResponse:
    """The alert's page once more, with why the form was not taken."""
    detail = console_of(request).open_alert(caller.request, alert_id)
    return render(
        request, "alert.html", status_code=status, caller=caller, detail=detail, item=detail.item, **context
    )


@router.post("/alerts/{alert_id}/acknowledge")
def acknowledge_form(
    request: Request,
    alert_id: str,
    caller: CallerDep,
    csrf_token: Annotated[str, Form()] = "",
    patient_identifier: Annotated[str, Form(max_length=128)] = "",
    value: Annotated[str, Form(max_length=64)] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    check_csrf(caller, csrf_token)
    try:
        console_of(request).acknowledge(caller.request, alert_id, patient_identifier, value, note or None)
    except AlertClosedError as exc:
        return _alert_again(request, caller, alert_id, 409, closed=exc)
    except InvalidInputError as exc:
        form = {"patient_identifier": patient_identifier, "value": value, "note": note}
        return _alert_again(request, caller, alert_id, 422, form_error=exc, form=form)
    return RedirectResponse(f"/alerts/{quote(alert_id)}?done=acknowledged", status_code=303)


@router.post("/alerts/{alert_id}/action")
def action_form(
    request: Request,
    alert_id: str,
    caller: CallerDep,
    csrf_token: Annotated[str, Form()] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    check_csrf(caller, csrf_token)
    try:
        console_of(request).record_action(caller.request, alert_id, note)
    except InvalidInputError as exc:
        return _alert_again(request, caller, alert_id, 422, action_error=exc)
    return RedirectResponse(f"/alerts/{quote(alert_id)}?done=action", status_code=303)


@router.get("/patients")
def patient_search(request: Request, caller: CallerDep, q: str = "") -> Response:
    if not q.strip():
        return render(request, "patient_search.html", caller=caller)
    regional_id = console_of(request).find_patient(caller.request, q)
    return RedirectResponse(f"/patients/{quote(regional_id, safe='')}", status_code=303)


@router.get("/patients/{regional_patient_id}", response_class=HTMLResponse)
def patient_page(
    request: Request,
    regional_patient_id: str,
    caller: CallerDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    console = console_of(request)
    view = console.patient(caller.request, regional_patient_id, cursor=cursor)
    plots = [
        (series, plot([(t, v) for t, v, _ in series.points]), console.terms.limits.get(series.loinc_code))
        for series in view.labs
    ]
    return render(
        request, "patient.html", caller=caller, view=view, plots=plots, cursor=cursor, terms=console.terms
    )


@router.get("/unprocessable", response_class=HTMLResponse)
def unprocessable_page(request: Request, caller: CallerDep) -> HTMLResponse:
    rows = console_of(request).unprocessable(caller.request)
    notifications = request.app.state.notifications
    return render(
        request,
        "unprocessable.html",
        caller=caller,
        rows=rows,
        notifications=notifications(caller.principal.institution_id) if notifications else None,
    )


@router.get("/operator", response_class=HTMLResponse)
def operator_page(request: Request, caller: CallerDep) -> HTMLResponse:
    console = console_of(request)
    figures = console.ack_figures(caller.request)
    ages = console.open_by_age(caller.request)
    notifications = request.app.state.notifications
    return render(
        request,
        "operator.html",
        caller=caller,
        figures=figures,
        ages=ages,
        age_buckets=q.AGE_BUCKETS,
        notifications=notifications(None) if notifications else None,
    )


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    caller: CallerDep,
    username: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    before_id: int | None = None,
) -> HTMLResponse:
    entries = console_of(request).audit_entries(
        caller.request, before_id=before_id, username=username, action=action, outcome=outcome
    )
    users = console_of(request).accounts.list()
    return render(
        request,
        "audit.html",
        caller=caller,
        entries=entries,
        users=users,
        filters={"username": username or "", "action": action or "", "outcome": outcome or ""},
    )
