"""Bearer tokens of the institutions. The tokens file holds one line per token,
`<institution> <sha256 hex of the token>` (blank lines and `#` comments ignored); the gateway keeps only
the hashes, so the file reveals no token. The institution of every request is the one its token names.

An operator makes a token and its line with `token_line`:

    .venv/bin/python -m clinhub.gateway_fhir H001

(or `token, line = token_line("H001")`) gives the token (hand it to the institution once, over a safe
channel) and the line to append to `CLINHUB_GATEWAY_FHIR_TOKENS_FILE`; restart the gateway to load it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

from core.exceptions import ConfigurationError

_LINE = re.compile(r"^(?P<institution>[A-Za-z0-9_.-]{1,32})\s+(?P<digest>[0-9a-fA-F]{64})$")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_line(institution: str) -> tuple[str, str]:
    """A fresh token (43 URL-safe characters, 256 bits) and its tokens-file line."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", institution):
        raise ValueError(f"{institution!r} is not an institution code")
    token = secrets.token_urlsafe(32)
    return token, f"{institution} {token_digest(token)}"


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, str]:
    """{sha256 hex: institution}; a malformed line is a configuration error naming its number."""
    table: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigurationError(
                "CLINHUB_GATEWAY_FHIR_TOKENS_FILE",
                f"{source} line {number}: expected '<institution> <sha256 hex>'",
            )
        table[match["digest"].lower()] = match["institution"]
    return table


def load_tokens(path: Path) -> dict[str, str]:
    return parse_tokens(path.read_text(encoding="utf-8"), str(path))


def institution_for(authorization: str | None, table: dict[str, str]) -> str | None:
    """The institution of `Authorization: Bearer <token>`, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return table.get(token_digest(token.strip()))
