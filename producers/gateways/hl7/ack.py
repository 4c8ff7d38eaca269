"""HL7 v2 acknowledgements (original mode) with v2.5 ERR segments, in the message's own character set.

MSH with sending and receiving swapped, MSH-9 `ACK^<trigger>^ACK`, a new MSH-10, MSH-12 and MSH-18 of
the message; MSA-1 the code and MSA-2 the message's MSH-10; one ERR per error: ERR-2 the location
`SEG^sequence^field^component`, ERR-3 `code^text^HL70357`, ERR-4 severity `E`, ERR-8 the reason. Encode
the text with `charset.encode_text(ack, header.charset)`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from producers.gateways.exceptions import ERROR_TEXT, HL7ContentError
from producers.gateways.hl7.mapping import Header

CODES = ("AA", "AE", "AR")
_SPECIAL = str.maketrans(
    {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\", "\r": " ", "\n": " "}
)


def escape(text: str) -> str:
    """Text for a field of an ACK (which always uses the standard separators |^~\\&)."""
    return text.translate(_SPECIAL)


def build_ack(
    header: Header | None,
    code: str,
    errors: Sequence[HL7ContentError] = (),
    text: str | None = None,
    *,
    now: dt.datetime | None = None,
    control_id: str | None = None,
) -> str:
    """The ACK text, segments ended by CR. With no readable header (no MSH, binary garbage) a minimal
    ASCII ACK with an empty MSA-2. `now` (default: the current UTC time) is MSH-7."""
    if code not in CODES:
        raise ValueError(f"ACK code {code!r} is not one of {', '.join(CODES)}")
    now = now if now is not None else dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%d%H%M%S") + (now.strftime("%z") if now.tzinfo is not None else "")
    ack_id = control_id or f"ACK{uuid.uuid4().hex[:16].upper()}"
    if header is not None:
        fields = [
            "MSH",
            "^~\\&",
            escape(header.receiving_application or "CLINHUB"),
            escape(header.receiving_facility),
            escape(header.sending_application),
            escape(header.sending_facility),
            stamp,
            "",
            f"ACK^{escape(header.trigger)}^ACK" if header.trigger else "ACK",
            ack_id,
            escape(header.processing_id or "P"),
            escape(header.version or "2.5"),
        ]
        if header.charset:
            fields += ["", "", "", "", "", escape(header.charset)]
        referenced = header.control_id
    else:
        fields = ["MSH", "^~\\&", "CLINHUB", "", "", "", stamp, "", "ACK", ack_id, "P", "2.5"]
        referenced = ""
    segments = ["|".join(fields)]
    msa = ["MSA", code, escape(referenced)]
    if text:
        msa.append(escape(text))
    segments.append("|".join(msa))
    for error in errors:
        location = "^".join(
            [
                escape(error.segment),
                str(error.sequence),
                "" if error.field is None else str(error.field),
                "" if error.component is None else str(error.component),
            ]
        ).rstrip("^")
        condition = f"{error.code}^{escape(ERROR_TEXT.get(error.code, 'Application error'))}^HL70357"
        segments.append("|".join(["ERR", "", location, condition, "E", "", "", "", escape(error.reason)]))
    return "\r".join(segments) + "\r"
