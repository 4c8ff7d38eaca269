"""Console accounts and sessions in the database: argon2id password hashes (argon2-cffi), session and
API tokens kept only as SHA-256 hashes, so neither a table copy nor a log line signs anyone in."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Engine, Table, delete, insert, select, update

from console.domain.access import ROLES, Principal, parse_wards
from console.exceptions import AuthenticationError, InvalidInputError, NotFoundError
from sinks.models import CLINICIAN, INTEGRATION, ConsoleSession, ConsoleUser

USERS = cast(Table, ConsoleUser.__table__)
SESSIONS = cast(Table, ConsoleSession.__table__)
BROWSER, API = "browser", "api"
MIN_PASSWORD_LENGTH = 12
_HASHER = PasswordHasher()  # argon2id, the library's current recommended parameters
# Verified against when the user does not exist, so a login takes as long either way
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class Account:
    username: str
    display_name: str
    role: str
    institution_id: str | None
    wards: frozenset[str]
    chain_level: int
    disabled: bool

    def principal(self) -> Principal:
        return Principal(
            username=self.username,
            display_name=self.display_name,
            role=self.role,
            institution_id=self.institution_id,
            wards=self.wards,
            chain_level=self.chain_level,
        )


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf_token: str
    kind: str
    expires_time: dt.datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _account(row: object) -> Account:
    return Account(
        username=row.username,  # type: ignore[attr-defined]
        display_name=row.display_name,  # type: ignore[attr-defined]
        role=row.role,  # type: ignore[attr-defined]
        institution_id=row.institution_id,  # type: ignore[attr-defined]
        wards=parse_wards(row.wards),  # type: ignore[attr-defined]
        chain_level=row.chain_level or 0,  # type: ignore[attr-defined]
        disabled=bool(row.disabled),  # type: ignore[attr-defined]
    )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def check_account(
    username: str, role: str, institution_id: str | None, chain_level: int | None, password: str
) -> None:
    """The rules of an account, each failure naming its field."""
    if not username or len(username) > 64 or not username.replace("-", "").replace(".", "").isalnum():
        raise InvalidInputError("username", "1-64 letters, digits, '.' or '-'")
    if role not in ROLES:
        raise InvalidInputError("role", f"one of {', '.join(ROLES)}")
    if role in (CLINICIAN, INTEGRATION) and not institution_id:
        raise InvalidInputError("institution", f"a {role} belongs to an institution")
    if chain_level is not None and chain_level < 0:
        raise InvalidInputError("chain_level", "0 (responsible clinician) or more")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInputError("password", f"at least {MIN_PASSWORD_LENGTH} characters")


class Accounts:
    """Users and their sessions; every method is one short transaction (call off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(
        self,
        username: str,
        password: str,
        role: str,
        *,
        display_name: str | None = None,
        institution_id: str | None = None,
        wards: str | None = None,
        chain_level: int | None = None,
        now: dt.datetime,
    ) -> Account:
        check_account(username, role, institution_id, chain_level, password)
        with self._engine.begin() as connection:
            if connection.execute(select(USERS.c.username).where(USERS.c.username == username)).first():
                raise InvalidInputError("username", f"{username} exists already")
            connection.execute(
                insert(USERS).values(
                    username=username,
                    display_name=display_name or username,
                    role=role,
                    institution_id=institution_id,
                    wards=",".join(sorted(parse_wards(wards))),
                    chain_level=chain_level if role == CLINICIAN else None,
                    password_hash=_HASHER.hash(password),
                    disabled=False,
                    created_time=now,
                    changed_time=now,
                )
            )
        return self.get(username)

    def get(self, username: str) -> Account:
        with self._engine.connect() as connection:
            row = connection.execute(select(USERS).where(USERS.c.username == username)).first()
        if row is None:
            raise NotFoundError("user", username)
        return _account(row)

    def list(self) -> list[Account]:
        with self._engine.connect() as connection:
            rows = connection.execute(select(USERS).order_by(USERS.c.username)).all()
        return [_account(row) for row in rows]

    def set_password(self, username: str, password: str, now: dt.datetime) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise InvalidInputError("password", f"at least {MIN_PASSWORD_LENGTH} characters")
        with self._engine.begin() as connection:
            result = connection.execute(
                update(USERS)
                .where(USERS.c.username == username)
                .values(password_hash=_HASHER.hash(password), changed_time=now)
            )
            if result.rowcount == 0:
                raise NotFoundError("user", username)
            connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))

    def set_disabled(self, username: str, disabled: bool, now: dt.datetime) -> None:
        """Disabling also ends every session and token of the user at once."""
        with self._engine.begin() as connection:
            result = connection.execute(
                update(USERS).where(USERS.c.username == username).values(disabled=disabled, changed_time=now)
            )
            if result.rowcount == 0:
                raise NotFoundError("user", username)
            if disabled:
                connection.execute(delete(SESSIONS).where(SESSIONS.c.username == username))

    def authenticate(self, username: str, password: str) -> Account:
        """The account, if the password is right and the account enabled; one error for every failure."""
        with self._engine.connect() as connection:
            row = connection.execute(select(USERS).where(USERS.c.username == username)).first()
        stored = row.password_hash if row is not None else _DUMMY_HASH
        try:
            _HASHER.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthenticationError("wrong username or password") from None
        if row is None:
            raise AuthenticationError("wrong username or password")
        account = _account(row)
        if account.disabled:
            raise AuthenticationError("wrong username or password")
        if _HASHER.check_needs_rehash(stored):
            with self._engine.begin() as connection:
                connection.execute(
                    update(USERS)
                    .where(USERS.c.username == username)
                    .values(password_hash=_HASHER.hash(password))
                )
        return account

    def open_session(
        self, account: Account, kind: str, lifetime: dt.timedelta, now: dt.datetime, remote_addr: str | None
    ) -> tuple[str, Session]:
        """A new token (returned once, never stored) and its session."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires = now + lifetime
        with self._engine.begin() as connection:
            connection.execute(
                insert(SESSIONS).values(
                    token_hash=token_hash(token),
                    username=account.username,
                    kind=kind,
                    csrf_token=csrf,
                    created_time=now,
                    expires_time=expires,
                    last_seen_time=now,
                    remote_addr=(remote_addr or "")[:64] or None,
                )
            )
        return token, Session(account.principal(), csrf, kind, expires)

    def session(self, token: str, now: dt.datetime) -> Session:
        """The live session of a token; expired, unknown and disabled all fail alike."""
        with self._engine.connect() as connection:
            row = connection.execute(
                select(SESSIONS, USERS)
                .join(USERS, USERS.c.username == SESSIONS.c.username)
                .where(SESSIONS.c.token_hash == token_hash(token))
            ).first()
        if row is None or bool(row.disabled) or _aware(row.expires_time) <= now:
            raise AuthenticationError("session expired or unknown; sign in again")
        return Session(_account(row).principal(), row.csrf_token, row.kind, _aware(row.expires_time))

    def close_session(self, token: str) -> None:
        with self._engine.begin() as connection:
            connection.execute(delete(SESSIONS).where(SESSIONS.c.token_hash == token_hash(token)))
