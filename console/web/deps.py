"""FastAPI dependencies shared by the pages, the API and the feed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import Request

from console.exceptions import InvalidInputError
from console.runtime.service import Console
from console.web.security import Caller, authenticate


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


async def current_caller(request: Request) -> Caller:
    return await authenticate(console_of(request), request)


NUL = "\x00"
NUL_REASON = "contains a NUL character (U+0000), which the console cannot store or look up"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


async def refuse_nul(request: Request) -> None:
    """Every route's first dependency: PostgreSQL text holds no NUL, so a path, query, form or JSON value
    carrying one is refused (422 naming where) before a database call fails on it (a 500, found by
    fuzzing the API)."""
    if NUL in request.url.path:
        raise InvalidInputError("path", NUL_REASON)
    for name, value in request.query_params.multi_items():
        if NUL in name or NUL in value:
            raise InvalidInputError(name.replace(NUL, ""), NUL_REASON)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        for name, field in (await request.form()).multi_items():
            if NUL in name or (isinstance(field, str) and NUL in field):
                raise InvalidInputError(name.replace(NUL, ""), NUL_REASON)
    elif content_type.startswith("application/json"):
        body = await request.body()
        if b"\\u0000" in body.lower():  # JSON's only way to carry a NUL; parsed to be sure
            try:
                parsed = json.loads(body)
            except ValueError:
                return  # not JSON: FastAPI answers 400 itself
            if any(NUL in text for text in _strings(parsed)):
                raise InvalidInputError("body", NUL_REASON)
