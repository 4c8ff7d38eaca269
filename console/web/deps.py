"""FastAPI dependencies shared by the pages, the API and the feed."""

from __future__ import annotations

from fastapi import Request

from console.runtime.service import Console
from console.web.security import Caller, authenticate


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def current_caller(request: Request) -> Caller:
    return await authenticate(console_of(request), request)
