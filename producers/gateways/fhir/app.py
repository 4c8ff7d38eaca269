"""The FHIR R4 gateway's HTTP wiring (FastAPI), thin: authenticate, read the body within its limit, run
the use case (`service.py`) in a worker thread, answer as a FHIR server does.

The institution is the bearer token's or, with mutual TLS, the client certificate's (`auth.authenticate`;
the certificate from the scope's ASGI TLS extension, which `server.py` adds on uvicorn).

- `GET /metadata`: the CapabilityStatement (FHIR 4.0.1), no token needed;
- `POST /Observation|Encounter|MedicationRequest|Condition`: create → 201 with Location
  `<type>/<id>/_history/1` and the resource; `If-None-Exist: identifier=[system|]value` → 200 with the
  existing one (no new events), 412 if several match;
- `POST /`: a `transaction` or `batch` Bundle → its `-response` Bundle, entries in request order;
- errors are OperationOutcomes with the failing FHIRPath: 400 invalid, 401 no or wrong token, 403 a
  client certificate of no institution here or credentials of two institutions, 413 too large, 415 not
  FHIR JSON, 422 not mappable, 503 (with Retry-After) when Kafka did not confirm in time;
- `/metrics` (Prometheus), `/healthz`, `/readyz` (ready = Kafka and the registry answer).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from producers.gateways.common import GatewayMetrics, make_gateway_metrics
from producers.gateways.fhir.auth import authenticate
from producers.gateways.fhir.errors import (
    BodyTooLargeError,
    FhirGatewayError,
    InvalidFhirError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaError,
)
from producers.gateways.fhir.ledger import ResourceLedger
from producers.gateways.fhir.mapping import GATEWAY, MAPPED_TYPES, MappedEvent
from producers.gateways.fhir.service import Created, FhirService, PublisherProvider, operation_outcome
from producers.gateways.tls import asgi_client_certificate, common_name

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
RETRY_AFTER_SECONDS = 5
UNAUTHENTICATED = "-"  # the institution label of a request refused its credentials (bounded)
SECURITY_SERVICES = "http://terminology.hl7.org/CodeSystem/restful-security-service"


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON


def capability_statement(mutual_tls: bool = False) -> dict[str, Any]:
    services = [{"coding": [{"system": SECURITY_SERVICES, "code": "Bearer"}]}]
    description = "Authorization: Bearer <token>; the institution is the token's"
    if mutual_tls:
        services.append({"coding": [{"system": SECURITY_SERVICES, "code": "Certificates"}]})
        description = (
            "Mutual TLS: the client certificate's institution, no token needed; or Authorization: Bearer "
            "<token>, the token's institution (both on one request must be the same institution's)"
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-01",
        "publisher": "Regional Clinical Event Hub",
        "kind": "instance",
        "software": {"name": "clinhub FHIR gateway"},
        "implementation": {"description": "Creates regional clinical events from FHIR R4 resources"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": {"service": services, "description": description},
                "resource": [
                    {
                        "type": resource_type,
                        "interaction": [{"code": "create"}],
                        "versioning": "no-version",
                        "conditionalCreate": True,
                        "searchParam": [{"name": "identifier", "type": "token"}],
                    }
                    for resource_type in MAPPED_TYPES
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


def _reason(error: FhirGatewayError) -> str:
    return type(error).__name__.removesuffix("Error").lower()


def create_fhir_app(
    publishers: PublisherProvider,
    tokens: Mapping[str, str],
    metrics_registry: CollectorRegistry,
    readiness: Callable[[], str | None],
    ledger: ResourceLedger,
    *,
    max_body_bytes: int = 10_485_760,
    publish_timeout_seconds: float = 10.0,
    metrics: GatewayMetrics | None = None,
    mutual_tls: bool = False,
    certificate_institutions: Mapping[str, str] | None = None,
    institutions: Collection[str] | None = None,
) -> FastAPI:
    """The app; `publishers(institution)` gives that institution's publisher, `tokens` maps the SHA-256
    hex of each token to its institution. With `mutual_tls` (the server requires client certificates) a
    certificate's CN names its institution, or `certificate_institutions` maps it to one; `institutions`
    are those it may be (default: the tokens' and the mapped ones)."""
    service = FhirService(publishers, ledger)
    gauges = metrics or make_gateway_metrics(metrics_registry)
    table = dict(tokens)
    by_certificate = dict(certificate_institutions or {})
    if institutions is None:
        institutions = [*table.values(), *by_certificate.values()]
    known = frozenset(institutions)
    app = FastAPI(title="clinhub FHIR R4 gateway", docs_url=None, redoc_url=None, openapi_url=None)

    def outcome_response(error: FhirGatewayError) -> FhirResponse:
        headers: dict[str, str] = {}
        if isinstance(error, UnauthorizedError):
            headers["WWW-Authenticate"] = 'Bearer realm="clinhub-fhir"'
        if isinstance(error, UnavailableError):
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return FhirResponse(operation_outcome(error), status_code=error.status, headers=headers)

    @app.exception_handler(FhirGatewayError)
    async def _fhir_error(_request: Request, exc: FhirGatewayError) -> Response:
        return outcome_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        error = FhirGatewayError(None, str(exc.detail))
        error.status = exc.status_code
        error.code = "not-found" if exc.status_code == 404 else "not-supported"
        return outcome_response(error)

    async def read_json(request: Request) -> Any:
        content_type = request.headers.get("content-type", FHIR_JSON).split(";")[0].strip().lower()
        if content_type not in JSON_TYPES:
            raise UnsupportedMediaError(None, f"{content_type!r}: send {FHIR_JSON}")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise BodyTooLargeError(None, f"the body is larger than {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise BodyTooLargeError(None, f"the body is larger than {max_body_bytes} bytes")
        try:
            return json.loads(bytes(body).decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidFhirError(None, f"the body is not JSON: {exc}") from None

    def institution_of(request: Request) -> str:
        certificate = asgi_client_certificate(request.scope) if mutual_tls else None
        cn = common_name(certificate) if certificate is not None else None
        return authenticate(request.headers.get("authorization"), cn, table, by_certificate, known)

    async def handle(
        request: Request, work: Callable[[str, Any], Any], render: Callable[[Any], Response]
    ) -> Response:
        started = time.monotonic()
        refusal: FhirGatewayError | None = None
        try:
            institution = label = institution_of(request)
        except FhirGatewayError as exc:
            institution, label, refusal = "", UNAUTHENTICATED, exc
        gauges.received.labels(GATEWAY, label).inc()
        try:
            if refusal is not None:
                raise refusal
            raw = await read_json(request)
            try:
                result = await asyncio.wait_for(
                    asyncio.to_thread(work, institution, raw), timeout=publish_timeout_seconds + 15
                )
            except TimeoutError:
                raise UnavailableError(
                    None, "Kafka did not confirm in time; retry the same request"
                ) from None
            gauges.accepted.labels(GATEWAY, label).inc()
            return render(result)
        except FhirGatewayError as exc:
            gauges.rejected.labels(GATEWAY, label, _reason(exc)).inc()
            return outcome_response(exc)
        finally:
            gauges.response_seconds.labels(GATEWAY).observe(time.monotonic() - started)

    def count_events(institution: str, events: Sequence[MappedEvent]) -> None:
        for event in events:
            gauges.events.labels(GATEWAY, institution, event.kind).inc()

    @app.get("/metadata")
    async def metadata() -> Response:
        return FhirResponse(capability_statement(mutual_tls))

    @app.post("/{resource_type}")
    async def create(resource_type: str, request: Request) -> Response:
        if resource_type not in MAPPED_TYPES:
            raise StarletteHTTPException(
                404, f"{resource_type!r}: this server creates {', '.join(MAPPED_TYPES)}"
            )
        correlation = request.headers.get("x-request-id") or str(uuid.uuid4())
        if_none_exist = request.headers.get("if-none-exist")
        prefer = request.headers.get("prefer", "")

        def work(institution: str, raw: Any) -> Created:
            created = service.create(institution, resource_type, raw, if_none_exist, correlation)
            count_events(institution, created.events)
            return created

        def render(created: Created) -> Response:
            headers = {"Location": created.location, "ETag": 'W/"1"', "Last-Modified": created.last_modified}
            if "return=minimal" in prefer:
                return Response(status_code=created.status, headers=headers)
            return FhirResponse(created.body, status_code=created.status, headers=headers)

        return await handle(request, work, render)

    @app.post("/")
    async def bundle(request: Request) -> Response:
        correlation = request.headers.get("x-request-id") or str(uuid.uuid4())

        def work(institution: str, raw: Any) -> dict[str, Any]:
            body, events = service.bundle(institution, raw, correlation)
            count_events(institution, events)
            return body

        return await handle(request, work, lambda body: FhirResponse(body))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        problem = await asyncio.to_thread(readiness)
        if problem is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)

    return app


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
