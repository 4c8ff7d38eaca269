"""The console's FastAPI application: HTML pages, the JSON API (/api/v1, described at /openapi.json),
the live feed (server-sent events), /metrics and /healthz. Built by `create_app`, never at import."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from console.domain import queue
from console.exceptions import (
    AlertClosedError,
    AuthenticationError,
    ConsoleError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    PublishFailedError,
)
from console.runtime.service import Console
from console.web import api, feed, pages
from console.web.deps import refuse_nul
from console.web.security import SESSION_COOKIE

HERE = Path(__file__).resolve().parent

Lifecycle = Callable[[], Awaitable[None]]


def _status(exc: ConsoleError) -> int:
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, PermissionDeniedError):
        return 403
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, AlertClosedError):
        return 409
    if isinstance(exc, InvalidInputError):
        return 422
    if isinstance(exc, PublishFailedError):
        return 503
    return 400


def error_body(exc: ConsoleError) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for name in (
        "field",
        "reason",
        "what",
        "alert_id",
        "acknowledged_by",
        "acknowledged_time",
        "retry_after",
    ):
        if hasattr(exc, name):
            body[name] = getattr(exc, name)
    return {"error": body}


def create_app(
    console: Console,
    metrics: CollectorRegistry,
    *,
    secure_cookies: bool = True,
    feed_poll_seconds: float = 0.5,
    on_start: Lifecycle | None = None,
    on_stop: Lifecycle | None = None,
    notifications: Callable[[str | None], Any] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if on_start is not None:
            await on_start()
        try:
            yield
        finally:
            if on_stop is not None:
                await on_stop()

    app = FastAPI(
        dependencies=[Depends(refuse_nul)],  # before any route reads the database
        title="clinhub console",
        version="1",
        description=(
            "The regional hub's clinician console API: critical-result alerts, acknowledgement with "
            "read-back, the shared patient timeline and unprocessable results. Authenticate with "
            "`Authorization: Bearer <token>` (POST /api/v1/tokens); every call is authorised and audited."
        ),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the description is at /openapi.json
        redoc_url=None,
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["now"] = lambda: dt.datetime.now(dt.UTC)
    templates.env.globals["q"] = queue  # severity ranks and time helpers, for pages and feed rows alike
    app.state.console = console
    app.state.templates = templates
    app.state.secure_cookies = secure_cookies
    app.state.feed_poll_seconds = feed_poll_seconds
    app.state.notifications = notifications
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> Response:
        status = _status(exc)
        if isinstance(exc, PermissionDeniedError) and not exc.audited:
            token = (
                request.cookies.get(SESSION_COOKIE) or request.headers.get("authorization", "")[7:] or None
            )
            client = request.client.host if request.client else None
            await run_in_threadpool(console.refused, exc, token, client, request.url.path)
        headers = {"Retry-After": str(int(exc.retry_after))} if isinstance(exc, PublishFailedError) else None
        if request.url.path.startswith("/api/"):
            if status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
            return JSONResponse(error_body(exc), status_code=status, headers=headers)
        if status == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return pages.message_page(request, exc, status, headers)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    app.include_router(pages.router)
    app.include_router(feed.router)  # before the API: /api/v1/alerts/events is not an alert id
    app.include_router(api.router)
    return app
