"""Errors of the gateways, under the publisher's root `PublishError`: what a sender's message got wrong,
as data (segment, repetition, field, component, reason, HL7 table 0357 code) for the ACK's ERR segment
and the dead letter."""

from __future__ import annotations

from producers.exceptions import PublishError

# HL7 table 0357 (message error condition codes) used by the gateways
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_VERSION_ID = 203
APPLICATION_INTERNAL_ERROR = 207

ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_VERSION_ID: "Unsupported version id",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class GatewayError(PublishError):
    """Root of the gateways' errors."""


class HL7ContentError(GatewayError):
    """An HL7 v2 message the hub cannot accept as sent: where (segment, its repetition, field, component)
    and why. `code` is from HL7 table 0357; the message reads e.g. "MSH-18: unknown character set 'X'"."""

    def __init__(
        self,
        segment: str,
        field: int | None,
        reason: str,
        *,
        code: int = DATA_TYPE_ERROR,
        sequence: int = 1,
        component: int | None = None,
    ) -> None:
        self.segment = segment
        self.sequence = sequence
        self.field = field
        self.component = component
        self.reason = reason
        self.code = code
        super().__init__(f"{self.location}: {reason}")

    @property
    def location(self) -> str:
        """Human form: `OBX[2]-5.1` (the repetition shown only when it is not the first)."""
        text = self.segment + (f"[{self.sequence}]" if self.sequence != 1 else "")
        if self.field is not None:
            text += f"-{self.field}"
            if self.component is not None:
                text += f".{self.component}"
        return text


class UnsupportedMessageError(HL7ContentError):
    """A message type (200) or trigger event (201) the hub does not take: answered with an AR naming it."""

    def __init__(self, message_type: str, reason: str, *, code: int = UNSUPPORTED_MESSAGE_TYPE) -> None:
        super().__init__("MSH", 9, reason, code=code)
        self.message_type = message_type


class InstitutionMismatchError(HL7ContentError):
    """MSH-4 names another institution than the one the connection is for: refused, never re-routed."""

    def __init__(self, claimed: str, institution: str) -> None:
        super().__init__(
            "MSH",
            4,
            f"sending facility {claimed!r} is not this connection's institution {institution!r}",
            code=TABLE_VALUE_NOT_FOUND,
        )
        self.claimed = claimed
        self.institution = institution
