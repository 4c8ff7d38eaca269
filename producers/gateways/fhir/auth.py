"""Bearer tokens of the institutions. The tokens file holds one line per token,
`<institution> <sha256 hex of the token>` (blank lines and `#` comments ignored); the gateway keeps only
the hashes, so the file reveals no token. The institution of every request is the one its token names.

An operator makes a token and its line with `token_line`:

    .venv/bin/python -m clinhub.gateway_fhir H001

(or `token, line = token_line("H001")`) gives the token (hand it to the institution once, over a safe
channel) and the line to append to `CLINHUB_GATEWAY_FHIR_TOKENS_FILE`; restart the gateway to load it.

With mutual TLS the connection's verified client certificate is a credential too: `authenticate` decides
a request's institution from both.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Collection, Mapping
from pathlib import Path

from core.exceptions import ConfigurationError
from producers.gateways.fhir.errors import ForbiddenError, UnauthorizedError
from producers.gateways.tls import certificate_institution

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


def institution_for(authorization: str | None, table: Mapping[str, str]) -> str | None:
    """The institution of `Authorization: Bearer <token>`, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return table.get(token_digest(token.strip()))


def authenticate(
    authorization: str | None,
    certificate_cn: str | None,
    tokens: Mapping[str, str],
    certificate_institutions: Mapping[str, str],
    institutions: Collection[str],
) -> str:
    """The institution a request comes from, or the refusal to raise.

    `certificate_cn` is the subject CN of the connection's verified client certificate (mutual TLS; "" for
    a certificate without a CN), None without one. `tokens` maps token hashes to institutions,
    `certificate_institutions` CNs to institutions (a CN it does not map names its institution itself),
    `institutions` are those this gateway publishes for.

    - A certificate is enough: its institution, which must be one of `institutions` (403). A bearer token
      sent besides must be valid (401) and be the same institution's (403: two institutions' credentials).
    - Without a certificate, the bearer token's institution (401 without a valid one).
    """
    token_institution = institution_for(authorization, tokens)
    if authorization and token_institution is None:
        raise UnauthorizedError(None, "the Authorization header is not a valid bearer token")
    if certificate_cn is None:
        if token_institution is None:
            raise UnauthorizedError(None, "a valid 'Authorization: Bearer <token>' is required")
        return token_institution
    institution = certificate_institution(certificate_cn, certificate_institutions)
    if institution not in institutions:
        mapped = f" (mapped to {institution!r})" if institution != certificate_cn else ""
        raise ForbiddenError(
            None,
            f"the client certificate's subject CN {certificate_cn!r}{mapped} names no institution of this "
            "gateway",
        )
    if token_institution is not None and token_institution != institution:
        raise ForbiddenError(
            None,
            f"the client certificate is {institution}'s but the bearer token is {token_institution}'s: "
            "a request carries one institution's credentials",
        )
    return institution
