"""The FHIR gateway's errors: each knows its HTTP status, its OperationOutcome issue code and the FHIRPath
expression of what failed (`Observation.valueQuantity.value`), so the handlers only render them.

They derive from the gateways' root `producers.gateways.exceptions.GatewayError`."""

from __future__ import annotations

from producers.gateways.exceptions import GatewayError


class FhirGatewayError(GatewayError):
    """Root of this gateway's errors."""

    status: int = 500
    code: str = "exception"

    def __init__(self, expression: str | None, diagnostics: str) -> None:
        super().__init__(f"{expression}: {diagnostics}" if expression else diagnostics)
        self.expression = expression
        self.diagnostics = diagnostics


class InvalidFhirError(FhirGatewayError):
    """400: not JSON, not a resource this endpoint takes, or a resource that breaks the FHIR R4 rules."""

    status = 400
    code = "structure"


class UnmappableError(FhirGatewayError):
    """422: valid FHIR, but the regional event cannot be made from it without guessing (no MRN, a
    status with no regional meaning, a time without a zone...)."""

    status = 422
    code = "processing"


class PreconditionFailedError(FhirGatewayError):
    """412: an If-None-Exist search matched more than one resource."""

    status = 412
    code = "duplicate"


class UnsupportedMediaError(FhirGatewayError):
    """415: the body is not FHIR JSON."""

    status = 415
    code = "not-supported"


class BodyTooLargeError(FhirGatewayError):
    """413: the body is larger than the gateway accepts."""

    status = 413
    code = "too-costly"


class UnauthorizedError(FhirGatewayError):
    """401: no bearer token, or one that is not in the token table."""

    status = 401
    code = "login"


class ForbiddenError(FhirGatewayError):
    """403: a client certificate that names no institution of this gateway, or credentials of two
    institutions on one request (a certificate of one, a bearer token of another)."""

    status = 403
    code = "forbidden"


class UnavailableError(FhirGatewayError):
    """503: Kafka did not confirm every event in time; nothing is accepted, the client retries (the same
    content yields the same event ids, so a retry never duplicates)."""

    status = 503
    code = "transient"
