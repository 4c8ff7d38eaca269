"""Errors of decoding, encoding and validating records of the regional standard."""

from __future__ import annotations

from core.exceptions import HubError, ServiceUnavailableError


class SchemaError(HubError):
    """Root of this package's errors; `field` names the offending field when there is one."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


class UnknownSchemaNameError(SchemaError):
    """No `.avsc` of that full name is part of the standard."""


class WireFormatError(SchemaError):
    """The bytes are not a Confluent-framed Avro message we can read."""


class ShortHeaderError(WireFormatError):
    """Fewer than the 5 header bytes (magic byte + schema id)."""


class MagicByteError(WireFormatError):
    """The first byte is not the Confluent magic byte 0."""


class UnknownSchemaIdError(WireFormatError):
    """The registry has no schema under the id in the header."""


class PayloadDecodeError(WireFormatError):
    """The Avro body is truncated or does not match its writer schema."""


class IncompatibleSchemaError(WireFormatError):
    """The writer schema cannot be resolved to the schema this reader expects."""


class RecordValidationError(SchemaError):
    """A record does not conform to its schema; nothing was encoded or sent."""


class RegistryUnavailableError(SchemaError, ServiceUnavailableError):
    """The schema registry could not be reached; transient, retry later."""

    def __init__(self, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RegistryAccessError(SchemaError):
    """The registry refused this principal: no or wrong credentials (401), or an action that is the
    admin's (403: registering a schema, changing compatibility). Retrying changes nothing."""
