"""The gateway's use cases, blocking (the HTTP handlers run them in a worker thread): create one resource,
process a transaction or batch Bundle. Validate, map, publish through the institution's publisher, then
remember what was created (the ledger) so If-None-Exist finds it again.

Transactions: every entry is validated and mapped (and every record checked against the standard)
before any is published; then all the events go in one Kafka transaction (`publish_atomically`), which
the hub's normaliser reads committed: it sees all of them or none. Not committed, the answer is 503 and
nothing is recorded; the client retries the whole transaction, which makes the same events (their ids
are deterministic; the hub stores each once)."""

from __future__ import annotations

import datetime as dt
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaException

from producers.exceptions import DeliveryFailedError, TransactionFailedError
from producers.gateways.fhir.errors import (
    FhirGatewayError,
    InvalidFhirError,
    PreconditionFailedError,
    UnavailableError,
    UnmappableError,
)
from producers.gateways.fhir.ledger import LedgerEntry, ResourceLedger
from producers.gateways.fhir.mapping import (
    MAPPED_TYPES,
    JsonObject,
    MappedEvent,
    MappedResource,
    map_resource,
    parse_resource,
)
from schemas.exceptions import RecordValidationError


class EventPublisher(Protocol):
    """What the gateway needs of `producers.publisher.Publisher`."""

    def validate(self, kind: str, record: Mapping[str, Any]) -> None: ...

    def publish_events(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> Sequence[object]: ...

    def publish_atomically(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> Sequence[object]: ...


PublisherProvider = Callable[[str], EventPublisher]
IDENTITY_ONLY = ("Patient",)  # may travel in a Bundle for the identity of the others; never published
PRIVATE_PATIENT_FIELDS = ("resourceType", "id", "identifier", "birthDate", "gender")


@dataclass(frozen=True)
class Created:
    """The answer to one create: 201 (new) or 200 (If-None-Exist matched), Location, the body."""

    status: int
    location: str
    body: dict[str, Any]
    last_modified: str
    events: tuple[MappedEvent, ...] = field(default_factory=tuple)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def stored_body(resource: JsonObject, logical_id: str, last_updated: dt.datetime) -> dict[str, Any]:
    """The resource as this server keeps and returns it: its own id and version, no narrative, contained
    Patients reduced to identity (identifier, birth date, gender): names are never stored."""
    body = {k: v for k, v in resource.items() if k != "text"}
    body["id"] = logical_id
    meta = dict(body.get("meta") or {})
    meta.update({"versionId": "1", "lastUpdated": last_updated.isoformat().replace("+00:00", "Z")})
    body["meta"] = meta
    if isinstance(body.get("contained"), list):
        body["contained"] = [
            {k: v for k, v in c.items() if k in PRIVATE_PATIENT_FIELDS}
            if isinstance(c, Mapping) and c.get("resourceType") == "Patient"
            else c
            for c in body["contained"]
        ]
    return body


def parse_if_none_exist(query: str, expression: str) -> tuple[str | None, str]:
    """`identifier=[system|]value` (the only search parameter supported) → (system or None, value)."""
    params = urllib.parse.parse_qsl(query.lstrip("?"), keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "identifier" or not params[0][1]:
        raise InvalidFhirError(expression, f"{query!r}: only 'identifier=[system|]value' is supported")
    value = params[0][1]
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def _prefixed(error: FhirGatewayError, index: int) -> FhirGatewayError:
    """An entry's error with its path inside the Bundle: Bundle.entry[2].resource.valueQuantity.value."""
    base = f"Bundle.entry[{index}].resource"
    expression = error.expression or ""
    head, _, rest = expression.partition(".")
    if head and head[0].isupper() and rest:
        expression = rest
    elif head and head[0].isupper():
        expression = ""
    return type(error)(f"{base}.{expression}" if expression else base, error.diagnostics)


class FhirService:
    def __init__(
        self,
        publishers: PublisherProvider,
        ledger: ResourceLedger,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self._publishers = publishers
        self._ledger = ledger
        self._clock = clock

    # --- one resource ---

    def _existing(
        self, institution: str, resource_type: str, if_none_exist: str | None, expression: str
    ) -> LedgerEntry | None:
        if not if_none_exist:
            return None
        system, value = parse_if_none_exist(if_none_exist, expression)
        found = self._ledger.find(institution, resource_type, system, value)
        if len(found) > 1:
            raise PreconditionFailedError(
                expression, f"{if_none_exist!r} matches {len(found)} {resource_type} resources"
            )
        return found[0] if found else None

    def _validate(self, institution: str, mapped: MappedResource) -> None:
        publisher = self._publishers(institution)
        for event in mapped.events:
            try:
                publisher.validate(event.kind, event.record)
            except RecordValidationError as exc:
                raise UnmappableError(
                    mapped.resource_type, f"the regional record is refused: {exc}"
                ) from None

    def _publish(self, institution: str, events: Sequence[MappedEvent]) -> None:
        """Publish every event (one wait for all); raise UnavailableError unless Kafka confirmed them all."""
        try:
            results = self._publishers(institution).publish_events([(e.kind, e.record) for e in events])
        except RecordValidationError as exc:
            raise UnmappableError(None, f"the regional record is refused: {exc}") from None
        except (BufferError, KafkaException) as exc:
            raise UnavailableError(None, f"Kafka is not available: {exc}") from None
        failures = [r.reason for r in results if isinstance(r, DeliveryFailedError)]
        if failures:
            raise UnavailableError(
                None,
                f"Kafka did not confirm {len(failures)} event(s) in time ({failures[0]}); nothing was "
                "accepted, retry the same request",
            )

    def _publish_atomically(self, institution: str, events: Sequence[MappedEvent]) -> None:
        """All the events in one Kafka transaction; UnavailableError (and none of them) otherwise."""
        if not events:
            return
        try:
            self._publishers(institution).publish_atomically([(e.kind, e.record) for e in events])
        except RecordValidationError as exc:
            raise UnmappableError(None, f"the regional record is refused: {exc}") from None
        except (BufferError, TransactionFailedError) as exc:
            raise UnavailableError(
                None, f"Kafka did not commit the transaction ({exc}); nothing was accepted, retry it"
            ) from None

    def _map(
        self,
        resource: JsonObject,
        institution: str,
        correlation_id: str,
        resolve: Callable[[str], JsonObject | None] | None = None,
    ) -> MappedResource:
        mapped = map_resource(
            resource, institution, now=self._clock(), correlation_id=correlation_id, resolve=resolve
        )
        self._validate(institution, mapped)
        return mapped

    def _record(self, institution: str, resource: JsonObject, mapped: MappedResource) -> Created:
        now = self._clock()
        body = stored_body(resource, mapped.logical_id, now)
        self._ledger.record(
            institution,
            mapped.resource_type,
            mapped.logical_id,
            mapped.content_hash,
            body,
            mapped.identifiers,
        )
        return Created(
            201,
            f"{mapped.resource_type}/{mapped.logical_id}/_history/1",
            body,
            body["meta"]["lastUpdated"],
            mapped.events,
        )

    @staticmethod
    def _found(entry: LedgerEntry) -> Created:
        return Created(
            200, entry.location, entry.body, str(entry.body.get("meta", {}).get("lastUpdated", ""))
        )

    def create(
        self,
        institution: str,
        resource_type: str,
        raw: Any,
        if_none_exist: str | None = None,
        correlation_id: str | None = None,
    ) -> Created:
        resource = parse_resource(raw, allowed=(resource_type,))
        existing = self._existing(institution, resource_type, if_none_exist, "If-None-Exist")
        if existing is not None:
            return self._found(existing)
        mapped = self._map(resource, institution, correlation_id or str(uuid.uuid4()))
        self._publish(institution, mapped.events)
        return self._record(institution, resource, mapped)

    # --- Bundles ---

    def bundle(
        self, institution: str, raw: Any, correlation_id: str | None = None
    ) -> tuple[dict[str, Any], list[MappedEvent]]:
        """A transaction-response or batch-response Bundle, its entries in request order, and the events
        published for it."""
        if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
            raise InvalidFhirError("resourceType", "POST / takes a Bundle of type transaction or batch")
        kind = raw.get("type")
        if kind not in ("transaction", "batch"):
            raise InvalidFhirError("Bundle.type", f"{kind!r}: only transaction and batch are processed")
        entries = raw.get("entry", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InvalidFhirError("Bundle.entry", "must be a list of entries")
        correlation = correlation_id or str(uuid.uuid4())
        resolve = _bundle_resolver(entries)
        published: list[MappedEvent] = []
        if kind == "transaction":
            responses = self._transaction(institution, entries, correlation, resolve, published)
        else:
            responses = [
                self._batch_entry(institution, e, i, correlation, resolve, published)
                for i, e in enumerate(entries)
            ]
        body = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": f"{kind}-response",
            "entry": responses,
        }
        return body, published

    @staticmethod
    def _entry_resource(entry: Mapping[str, Any], index: int) -> dict[str, Any]:
        """The entry's resource, FHIR-valid and of a type this gateway takes, posted to its type."""
        where = f"Bundle.entry[{index}]"
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            raise InvalidFhirError(f"{where}.resource", "each entry needs its resource")
        request = entry.get("request")
        if not isinstance(request, dict):
            raise InvalidFhirError(f"{where}.request", "each entry of a transaction or batch needs a request")
        try:
            parsed = parse_resource(resource, allowed=(*MAPPED_TYPES, *IDENTITY_ONLY))
        except FhirGatewayError as exc:
            raise _prefixed(exc, index) from None
        if parsed["resourceType"] in IDENTITY_ONLY:
            return parsed
        if request.get("method") != "POST":
            raise InvalidFhirError(
                f"{where}.request.method", f"{request.get('method')!r}: only POST (create)"
            )
        url = str(request.get("url", "")).split("?")[0].strip("/")
        if url != parsed["resourceType"]:
            raise InvalidFhirError(
                f"{where}.request.url", f"{url!r} is not the entry's type {parsed['resourceType']}"
            )
        return parsed

    def _prepare(
        self,
        institution: str,
        entry: Mapping[str, Any],
        index: int,
        correlation_id: str,
        resolve: Callable[[str], JsonObject | None],
    ) -> tuple[dict[str, Any], MappedResource | Created | None]:
        """The entry's resource and what to do with it: events to publish, an existing resource, or
        nothing (a Patient, only there for identity)."""
        resource = self._entry_resource(entry, index)
        if resource["resourceType"] in IDENTITY_ONLY:
            return resource, None
        request = entry["request"]
        existing = self._existing(
            institution,
            resource["resourceType"],
            request.get("ifNoneExist"),
            f"Bundle.entry[{index}].request.ifNoneExist",
        )
        if existing is not None:
            return resource, self._found(existing)
        try:
            return resource, self._map(resource, institution, correlation_id, resolve)
        except FhirGatewayError as exc:
            raise _prefixed(exc, index) from None

    def _transaction(
        self,
        institution: str,
        entries: list[dict[str, Any]],
        correlation_id: str,
        resolve: Callable[[str], JsonObject | None],
        published: list[MappedEvent],
    ) -> list[dict[str, Any]]:
        prepared = [self._prepare(institution, e, i, correlation_id, resolve) for i, e in enumerate(entries)]
        events = [event for _r, m in prepared if isinstance(m, MappedResource) for event in m.events]
        self._publish_atomically(institution, events)  # all, or 503 and nothing recorded
        published += events
        responses = []
        for resource, outcome in prepared:
            if isinstance(outcome, MappedResource):
                responses.append(_entry_response(self._record(institution, resource, outcome)))
            elif isinstance(outcome, Created):
                responses.append(_entry_response(outcome))
            else:
                responses.append(_identity_only_response())
        return responses

    def _batch_entry(
        self,
        institution: str,
        entry: dict[str, Any],
        index: int,
        correlation_id: str,
        resolve: Callable[[str], JsonObject | None],
        published: list[MappedEvent],
    ) -> dict[str, Any]:
        try:
            resource, outcome = self._prepare(institution, entry, index, correlation_id, resolve)
            if isinstance(outcome, MappedResource):
                self._publish(institution, outcome.events)
                published += outcome.events
                return _entry_response(self._record(institution, resource, outcome))
            if isinstance(outcome, Created):
                return _entry_response(outcome)
            return _identity_only_response()
        except FhirGatewayError as exc:
            return {
                "response": {
                    "status": f"{exc.status} {_REASONS.get(exc.status, '')}".strip(),
                    "outcome": operation_outcome(exc),
                }
            }


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    412: "Precondition Failed",
    422: "Unprocessable Entity",
    503: "Service Unavailable",
}


def _entry_response(created: Created) -> dict[str, Any]:
    return {
        "response": {
            "status": f"{created.status} {_REASONS[created.status]}",
            "location": created.location,
            "etag": 'W/"1"',
            "lastModified": created.last_modified,
        }
    }


def _identity_only_response() -> dict[str, Any]:
    return {
        "response": {
            "status": "200 OK",
            "outcome": information_outcome(
                "Patient used for the identity of the entries that reference it; not stored"
            ),
        }
    }


def _bundle_resolver(entries: list[dict[str, Any]]) -> Callable[[str], JsonObject | None]:
    """References between entries: by fullUrl (urn:uuid:...) or by `<type>/<id>`."""
    table: dict[str, JsonObject] = {}
    for entry in entries:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if isinstance(entry.get("fullUrl"), str):
            table[entry["fullUrl"]] = resource
        if isinstance(resource.get("id"), str):
            table[f"{resource.get('resourceType')}/{resource['id']}"] = resource
    return table.get


def operation_outcome(error: FhirGatewayError) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": error.code, "diagnostics": error.diagnostics}
    if error.expression:
        issue["expression"] = [error.expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def information_outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }
