"""Bytes of an HL7 v2 message to text, by the character set its MSH-18 declares, before any field is split.

Several GBK/GB 18030 characters have `|` (0x7C) or `^` (0x5E) as their second byte, so the raw bytes are
never split on separators: the MSH segment (which ends at the first CR or LF; no candidate encoding uses
those bytes inside a character) is decoded strictly with each candidate codec, and the codec is accepted
whose decoded MSH-18 names it. Then the whole message is decoded strictly with it. An unknown MSH-18, or
bytes that are not valid in the declared character set, are an `HL7ContentError` at MSH-18: never
mojibake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from producers.gateways.exceptions import DATA_TYPE_ERROR, TABLE_VALUE_NOT_FOUND, HL7ContentError

ASCII = "ascii"
UTF8 = "utf-8"
LATIN1 = "latin-1"
GB18030 = "gb18030"

# MSH-18 as senders write it (upper case, without spaces, hyphens, underscores or dots) -> Python codec.
# GBK and GB 2312 are subsets of GB 18030, so one strict gb18030 decoder reads all three faithfully.
_CHARSETS = {
    "ASCII": ASCII,
    "USASCII": ASCII,
    "ISOIR6": ASCII,
    "UNICODEUTF8": UTF8,
    "UTF8": UTF8,
    "8859/1": LATIN1,
    "ISO8859/1": LATIN1,
    "ISO88591": LATIN1,
    "ISOIR100": LATIN1,
    "LATIN1": LATIN1,
    "GB180302000": GB18030,
    "GB180302005": GB18030,
    "GB18030": GB18030,
    "GBK": GB18030,
    "GB2312": GB18030,
    "GB231280": GB18030,
    "CP936": GB18030,
}
# Tried in this order on the MSH segment; ASCII first (an ASCII MSH reads the same under every codec).
_CANDIDATES = (ASCII, UTF8, GB18030, LATIN1)
_SPELLING = re.compile(r"[\s\-_.]")


@dataclass(frozen=True)
class Decoded:
    """A message as text. `charset`: MSH-18 as sent (None when empty); `codec`: the Python codec used."""

    text: str
    charset: str | None
    codec: str


def codec_for(charset: str | None) -> str | None:
    """The codec of an MSH-18 value (None or empty: ASCII); None when the character set is unknown."""
    if charset is None or not charset.strip():
        return ASCII
    return _CHARSETS.get(_SPELLING.sub("", charset.upper()))


def _error(reason: str, code: int = DATA_TYPE_ERROR) -> HL7ContentError:
    return HL7ContentError("MSH", 18, reason, code=code)


def _msh_bytes(raw: bytes) -> bytes:
    body = raw.lstrip(b"\r\n")
    end = min((i for i in (body.find(b"\r"), body.find(b"\n")) if i >= 0), default=len(body))
    if not body.startswith(b"MSH") or end < 8:
        raise HL7ContentError("MSH", None, "the message does not start with an MSH segment", code=100)
    return body[:end]


def _declared(msh: str) -> str | None:
    """MSH-18 (first repetition) of a decoded MSH segment; None when absent or empty."""
    separator = msh[3]
    fields = msh.split(separator)
    # fields[0] = "MSH", fields[1] = encoding characters (MSH-2): MSH-n is fields[n - 1]
    if len(fields) < 18:
        return None
    value = fields[17]
    encoding = fields[1]
    if len(encoding) >= 3:  # the repetition separator is the third encoding character
        value = value.split(encoding[2])[0]
    if len(encoding) >= 1:
        value = value.split(encoding[0])[0]
    value = value.strip()
    return value or None


def decode_message(raw: bytes) -> Decoded:
    """Decode by MSH-18: empty means ASCII (non-ASCII bytes are then an error, whatever they would be in
    UTF-8); `UNICODE UTF-8`, `8859/1`, `GB 18030-2000`, `GBK` and `GB2312` (all three as gb18030)."""
    msh = _msh_bytes(raw)
    for candidate in _CANDIDATES:
        try:
            text = msh.decode(candidate)
        except UnicodeDecodeError:
            continue
        declared = _declared(text)
        if codec_for(declared) == candidate:
            return Decoded(_decode_all(raw, candidate, declared), declared, candidate)
    # No codec decodes MSH into an MSH-18 naming it: say which charset was declared and what is wrong.
    declared = _declared(msh.decode(LATIN1))
    codec = codec_for(declared)
    if codec is None:
        raise _error(f"unknown character set {declared!r}", TABLE_VALUE_NOT_FOUND)
    _decode_all(msh, codec, declared)  # raises, naming the first byte that is not valid
    raise _error(f"the MSH segment does not read as {declared or 'ASCII'}")  # pragma: no cover


def _decode_all(raw: bytes, codec: str, declared: str | None) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4].hex(" ")
        segment_start = max(raw.rfind(b"\r", 0, exc.start), raw.rfind(b"\n", 0, exc.start)) + 1
        segment = raw[segment_start : segment_start + 3].decode(LATIN1, "replace")
        name = f"{declared!r}" if declared else "empty (ASCII)"
        raise _error(
            f"MSH-18 is {name} but byte {exc.start} (in segment {segment}: {bad}) is not valid {codec}; "
            "declare the character set the message is written in"
        ) from None


def encode_text(text: str, charset: str | None) -> bytes:
    """Text (an ACK) in a message's character set; an unknown one gives ASCII. A character the charset
    cannot hold becomes '?' (an ACK's error text must always be sendable)."""
    return text.encode(codec_for(charset) or ASCII, errors="replace")
