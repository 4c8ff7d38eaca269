"""The live queue as server-sent events.

Each event is one alert's current state as the user may see it (`in_queue` says whether it belongs in
their filtered queue now), with its id the alert's store change time in epoch milliseconds. A client
reconnecting with Last-Event-ID gets every change since then again (from a little before, as the store
may commit an older change time late); applying an event twice changes nothing. A first connection
without it gets the open queue as a snapshot first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from console.domain import queue as q
from console.domain.access import AlertScope, in_queue_of
from console.exceptions import AuthenticationError, InvalidInputError, PermissionDeniedError
from console.runtime.service import Console, QueueFilters, QueueItem, parse_filters
from console.web.deps import console_of, current_caller
from console.web.security import Caller

router = APIRouter(include_in_schema=False)
OVERLAP = dt.timedelta(seconds=10)
HEARTBEAT_SECONDS = 15.0
RECHECK_SESSION_SECONDS = 30.0


def _ms(value: dt.datetime | None) -> int:
    return 0 if value is None else int(value.timestamp() * 1000)


def _matches(item: QueueItem, filters: QueueFilters) -> bool:
    a = item.alert
    return (
        (not filters.severity or a.severity == filters.severity)
        and (not filters.ward or a.ward == filters.ward or a.ward is None)
        and (not filters.institution or a.institution_id == filters.institution)
    )


def _in_queue(caller: Caller, item: QueueItem, filters: QueueFilters) -> bool:
    a = item.alert
    return (
        item.acknowledged_time is None
        and in_queue_of(caller.principal, AlertScope(a.institution_id, a.ward, a.escalation_level))
        and _matches(item, filters)
    )


def _event(kind: str, data: Any, event_id: int | None = None) -> str:
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


def _parse_last_id(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        ms = int(value)
    except ValueError:
        raise InvalidInputError("Last-Event-ID", "an event id this feed sent (epoch milliseconds)") from None
    if not 0 <= ms < 2**53:
        raise InvalidInputError("Last-Event-ID", "out of range")
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


async def _stream(
    request: Request, console: Console, caller: Caller, filters: QueueFilters, since: dt.datetime | None
) -> AsyncIterator[str]:
    templates = request.app.state.templates
    row = templates.get_template("_alert_row.html")
    poll = request.app.state.feed_poll_seconds

    def payload(item: QueueItem) -> dict[str, Any]:
        in_queue = _in_queue(caller, item, filters)
        html = row.render(item=item, caller=caller, q=q) if in_queue else ""  # as pages.render gives it
        return {"in_queue": in_queue, "alert": item.to_json(), "html": html}

    sent: dict[str, tuple[Any, ...]] = {}
    cursor = since
    if cursor is None:
        latest = await run_in_threadpool(console.latest_change)
        items = await run_in_threadpool(console.queue, caller.request, filters)
        cursor = latest or dt.datetime.now(dt.UTC)
        yield _event("snapshot", [payload(item) for item in items], _ms(cursor))
        for item in items:
            sent[item.alert.alert_id] = _fingerprint(item)
    yield "retry: 2000\n\n"
    last_beat = last_check = time.monotonic()
    while not await request.is_disconnected():
        changes = await run_in_threadpool(console.changes, caller.request, cursor - OVERLAP)
        for item in changes:
            fingerprint = _fingerprint(item)
            if sent.get(item.alert.alert_id) == fingerprint:
                continue
            sent[item.alert.alert_id] = fingerprint
            changed = item.alert.changed_time or cursor
            cursor = max(cursor, changed)
            yield _event("alert", payload(item), _ms(changed))
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_SECONDS:
            last_beat = now
            yield ": keep-alive\n\n"
        if now - last_check >= RECHECK_SESSION_SECONDS:
            last_check = now
            try:
                await run_in_threadpool(console.session, caller.token)
            except AuthenticationError:
                yield _event("signed_out", {"reason": "session ended; sign in again"})
                return
        await asyncio.sleep(poll)


def _fingerprint(item: QueueItem) -> tuple[Any, ...]:
    a = item.alert
    return (
        a.changed_time,
        item.acknowledged_time,
        a.escalation_level,
        a.suppressed_repeats,
        item.no_action_recorded,
    )


async def _response(
    request: Request, caller: Caller, filters: QueueFilters, last_event_id: str | None
) -> StreamingResponse:
    console = console_of(request)
    if not caller.principal.clinical:
        raise await run_in_threadpool(
            console.deny, caller.request, "view_queue", "alerts", "only clinicians have an alert queue"
        )
    if filters.institution and filters.institution != caller.principal.institution_id:
        raise PermissionDeniedError("alerts", "alerts of another institution")
    since = _parse_last_id(last_event_id)
    return StreamingResponse(
        _stream(request, console, caller, filters, since),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/events")
async def page_events(
    request: Request,
    caller: Annotated[Caller, Depends(current_caller)],
    ward: str | None = None,
    severity: str | None = None,
    institution: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
    since: Annotated[str | None, Query(max_length=20)] = None,
) -> StreamingResponse:
    """For the queue page (the session cookie)."""
    return await _response(
        request, caller, parse_filters(institution, ward, severity), last_event_id or since
    )


@router.get("/api/v1/alerts/events")
async def api_events(
    request: Request,
    caller: Annotated[Caller, Depends(current_caller)],
    ward: str | None = None,
    severity: str | None = None,
    institution: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The same feed for hospital systems (bearer token)."""
    return await _response(request, caller, parse_filters(institution, ward, severity), last_event_id)
