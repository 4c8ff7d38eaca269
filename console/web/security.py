"""Sessions and CSRF for the web layer: the session cookie (HttpOnly, SameSite=Strict, Secure), bearer
tokens for hospital systems, and the CSRF token every state-changing request must carry."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request as HttpRequest
from starlette.concurrency import run_in_threadpool

from console.domain.access import Principal
from console.exceptions import AuthenticationError, PermissionDeniedError
from console.runtime.accounts import Session
from console.runtime.service import Console, Request

SESSION_COOKIE = "clinhub_session"
LOGIN_COOKIE = "clinhub_login"  # double-submit token of the login form (there is no session yet)
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Caller:
    """An authenticated request: the session, and whether it came with a cookie (CSRF applies)."""

    session: Session
    token: str
    by_cookie: bool
    remote_addr: str | None

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def request(self) -> Request:
        return Request(self.session.principal, self.remote_addr)


def remote_addr(request: HttpRequest) -> str | None:
    return request.client.host if request.client else None


def _token(request: HttpRequest) -> tuple[str, bool] | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else None


async def authenticate(console: Console, request: HttpRequest) -> Caller:
    found = _token(request)
    if found is None or not found[0]:
        raise AuthenticationError("not signed in")
    token, by_cookie = found
    session = await run_in_threadpool(console.session, token)
    return Caller(session, token, by_cookie, remote_addr(request))


def check_csrf(caller: Caller, submitted: str | None) -> None:
    """A cookie-authenticated change must echo the session's CSRF token (form field or header)."""
    if not caller.by_cookie:
        return  # a bearer token is not sent by browsers on their own
    if not submitted or not hmac.compare_digest(submitted, caller.session.csrf_token):
        raise PermissionDeniedError("request", "missing or wrong CSRF token; reload the page and try again")


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def check_login_token(request: HttpRequest, submitted: str | None) -> None:
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not submitted or not hmac.compare_digest(expected, submitted):
        raise PermissionDeniedError("login", "the sign-in form expired; reload it and try again")
