"""Which institution a FHIR request is from: its bearer token's, its verified client certificate's, or a
refusal (401, 403) saying why."""

from __future__ import annotations

import pytest

from producers.gateways.fhir.auth import authenticate, token_digest
from producers.gateways.fhir.errors import ForbiddenError, UnauthorizedError

TOKENS = {token_digest("token-h001"): "H001", token_digest("token-h002"): "H002"}
MAPPED = {"lis.h002.example": "H002", "old-lis": "H999"}
INSTITUTIONS = {"H001", "H002", "C003"}


def who(authorization: str | None, cn: str | None) -> str:
    return authenticate(authorization, cn, TOKENS, MAPPED, INSTITUTIONS)


def test_a_token_alone_names_its_institution() -> None:
    assert who("Bearer token-h002", None) == "H002"
    assert who("bearer   token-h001 ", None) == "H001"


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong", "Basic dXNlcjpwYXNz"])
def test_no_certificate_and_no_valid_token_is_401(authorization: str | None) -> None:
    with pytest.raises(UnauthorizedError) as refused:
        who(authorization, None)
    assert refused.value.status == 401 and refused.value.code == "login"


def test_a_certificate_alone_names_its_institution_by_cn_or_mapping() -> None:
    assert who(None, "H001") == "H001"
    assert who(None, "C003") == "C003"
    assert who(None, "lis.h002.example") == "H002"


def test_a_certificate_and_a_token_of_the_same_institution() -> None:
    assert who("Bearer token-h001", "H001") == "H001"
    assert who("Bearer token-h002", "lis.h002.example") == "H002"


def test_a_certificate_and_a_token_of_another_institution_is_403_naming_both() -> None:
    with pytest.raises(ForbiddenError) as refused:
        who("Bearer token-h002", "H001")
    assert refused.value.status == 403 and refused.value.code == "forbidden"
    assert "H001's" in refused.value.diagnostics and "H002's" in refused.value.diagnostics


def test_a_certificate_and_an_invalid_token_is_401() -> None:
    with pytest.raises(UnauthorizedError, match="not a valid bearer token"):
        who("Bearer wrong", "H001")


@pytest.mark.parametrize(
    ("cn", "said"),
    [
        ("stranger-lis", "'stranger-lis' names no institution"),
        ("old-lis", "'old-lis' (mapped to 'H999') names no institution"),
        ("", "CN '' names no institution"),
    ],
)
def test_a_certificate_of_no_institution_here_is_403_even_with_a_valid_token(cn: str, said: str) -> None:
    for authorization in (None, "Bearer token-h001"):
        with pytest.raises(ForbiddenError) as refused:
            who(authorization, cn)
        assert said in refused.value.diagnostics
