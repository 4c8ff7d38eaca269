"""ACKs read back with python-hl7: MSA-2, MSH-18, ERR fields."""

from __future__ import annotations

import datetime as dt
from typing import Any

import hl7
import pytest

from producers.gateways.exceptions import HL7ContentError, UnsupportedMessageError
from producers.gateways.hl7 import samples
from producers.gateways.hl7.ack import build_ack
from producers.gateways.hl7.charset import decode_message, encode_text
from producers.gateways.hl7.mapping import map_message, parse_header

NOW = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)


def _parse(text: str) -> Any:
    return hl7.parse(text)


def test_aa_swaps_sender_and_receiver_and_echoes_msh_10() -> None:
    header = parse_header(decode_message(samples.oru_r01()))
    ack = _parse(build_ack(header, "AA", now=NOW))
    msh = ack.segment("MSH")
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == ("CLINHUB", "REGION", "LIS-Cerner", "H001")
    assert str(msh(9)) == "ACK^R01^ACK" and str(msh(12)) == "2.5.1" and str(msh(18)) == "UNICODE UTF-8"
    assert str(msh(7)) == "20261123020000+0000" and str(msh(10)) != "ORU0001"
    msa = ack.segment("MSA")
    assert (str(msa(1)), str(msa(2))) == ("AA", "ORU0001")
    with pytest.raises(KeyError):
        ack.segment("ERR")


def test_ae_has_one_err_per_error_with_location_code_and_reason() -> None:
    header = parse_header(decode_message(samples.oru_r01()))
    errors = [
        HL7ContentError("OBX", 5, "value '<>' | not a comparator", sequence=2, component=1),
        HL7ContentError("PID", 3, "the MRN is required", code=101),
    ]
    ack = _parse(build_ack(header, "AE", errors, text="2 errors", now=NOW))
    assert str(ack.segment("MSA")(3)) == "2 errors"
    first, second = ack.segments("ERR")
    assert str(first(2)) == "OBX^2^5^1"
    assert (str(first(3)(1)(1)), str(first(3)(1)(3))) == ("102", "HL70357")
    assert str(first(4)) == "E"
    assert ack.unescape(str(first(8))) == "value '<>' | not a comparator"
    assert str(second(2)) == "PID^1^3" and str(second(3)(1)(1)) == "101"


def test_the_ack_of_a_gb18030_message_is_in_gb18030() -> None:
    raw = samples.oru_gb18030()
    header = parse_header(decode_message(raw))
    error = HL7ContentError("PV1", 3, f"ward {samples.TRAP_WARD} unknown")
    encoded = encode_text(build_ack(header, "AE", [error], now=NOW), header.charset)
    decoded = decode_message(encoded)
    assert decoded.codec == "gb18030" and decoded.charset == "GB 18030-2000"
    ack = _parse(decoded.text)
    assert str(ack.segment("MSA")(2)) == "GB0001"
    assert samples.TRAP_WARD in ack.unescape(str(ack.segment("ERR")(8)))


def test_unsupported_message_gets_ar_naming_the_type() -> None:
    raw = samples.unsupported()
    decoded = decode_message(raw)
    with pytest.raises(UnsupportedMessageError) as caught:
        map_message(decoded, "H001", NOW)
    ack = _parse(build_ack(parse_header(decoded), "AR", [caught.value], now=NOW))
    err = ack.segment("ERR")
    assert str(err(2)) == "MSH^1^9" and str(err(3)(1)(1)) == "200"
    assert "SIU^S12" in ack.unescape(str(err(8)))
    assert str(ack.segment("MSH")(9)) == "ACK^S12^ACK"


def test_no_header_gives_a_minimal_ascii_ack() -> None:
    error = HL7ContentError("MSH", None, "the message does not start with an MSH segment", code=100)
    text = build_ack(None, "AR", [error], now=NOW)
    text.encode("ascii")
    ack = _parse(text)
    assert str(ack.segment("MSA")(1)) == "AR" and str(ack.segment("MSA")(2)) == ""
    assert str(ack.segment("ERR")(2)) == "MSH^1" and str(ack.segment("ERR")(3)(1)(1)) == "100"


def test_a_code_outside_aa_ae_ar_is_a_bug() -> None:
    with pytest.raises(ValueError, match="CA"):
        build_ack(None, "CA", now=NOW)
