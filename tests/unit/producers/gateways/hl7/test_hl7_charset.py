"""Decoding by MSH-18 before any field is split, and the GBK `|`/`^` trap."""

from __future__ import annotations

import pytest

from producers.gateways.exceptions import HL7ContentError
from producers.gateways.hl7 import samples
from producers.gateways.hl7.charset import Decoded, codec_for, decode_message, encode_text


def _msg(charset: str, body: str, encoding: str) -> bytes:
    msh = f"MSH|^~\\&|LIS|H002|HUB|REG|20261123093000+0800||ORU^R01|C1|P|2.5|||||CHN|{charset}"
    return f"{msh}\rPID|1||42^^^H002^MR||{body}\r".encode(encoding)


def test_the_trap_characters_are_real() -> None:
    pipes, carets = samples.gbk_trap_characters(0x7C), samples.gbk_trap_characters(0x5E)
    assert "東" in pipes and "區" in carets
    encoded = samples.TRAP_WARD.encode("gbk")
    assert b"|" in encoded and b"^" in encoded  # splitting these bytes on separators would corrupt them


@pytest.mark.parametrize("charset", ["GB 18030-2000", "GBK", "GB2312", "gb18030"])
def test_gb_charsets_decode_as_gb18030_with_the_trap_intact(charset: str) -> None:
    name = "".join(samples.gbk_trap_characters(0x7C)[:3] + samples.gbk_trap_characters(0x5E)[:3])
    decoded = decode_message(_msg(charset, name, "gb18030"))
    assert decoded == Decoded(decoded.text, charset, "gb18030")
    assert name in decoded.text


def test_a_gb18030_msh_with_trap_bytes_in_it_still_finds_msh_18() -> None:
    raw = (
        f"MSH|^~\\&|LIS|{samples.TRAP_WARD}|HUB|REG|20261123093000||ORU^R01|C1|P|2.5|||||CHN|GBK\rPID|1||42\r"
    ).encode("gb18030")
    decoded = decode_message(raw)
    assert decoded.codec == "gb18030" and decoded.charset == "GBK"
    assert samples.TRAP_WARD in decoded.text


@pytest.mark.parametrize(
    ("charset", "text", "encoding", "codec"),
    [
        ("UNICODE UTF-8", "Müller 钾", "utf-8", "utf-8"),
        ("8859/1", "Müller", "latin-1", "latin-1"),
        ("", "plain", "ascii", "ascii"),
        ("ASCII", "plain", "ascii", "ascii"),
    ],
)
def test_declared_charsets(charset: str, text: str, encoding: str, codec: str) -> None:
    decoded = decode_message(_msg(charset, text, encoding))
    assert decoded.codec == codec
    assert decoded.charset == (charset or None)
    assert text in decoded.text


def test_empty_msh_18_is_ascii_and_utf8_bytes_are_refused() -> None:
    with pytest.raises(HL7ContentError) as caught:
        decode_message(_msg("", "Müller", "utf-8"))
    error = caught.value
    assert (error.segment, error.field) == ("MSH", 18)
    assert "empty (ASCII)" in error.reason and "PID" in error.reason


def test_bytes_that_are_not_the_declared_charset_are_an_error_not_mojibake() -> None:
    with pytest.raises(HL7ContentError) as caught:
        decode_message(_msg("UNICODE UTF-8", "钾", "gb18030"))
    assert (caught.value.segment, caught.value.field) == ("MSH", 18)
    assert "not valid utf-8" in caught.value.reason


def test_unknown_charset_names_it() -> None:
    with pytest.raises(HL7ContentError) as caught:
        decode_message(_msg("KLINGON-1", "x", "ascii"))
    assert (caught.value.segment, caught.value.field, caught.value.code) == ("MSH", 18, 103)
    assert "KLINGON-1" in str(caught.value)


def test_no_msh_is_an_error() -> None:
    for raw in (b"", b"PID|1||42\r", b"\x00\xff\xfe garbage"):
        with pytest.raises(HL7ContentError) as caught:
            decode_message(raw)
        assert caught.value.segment == "MSH"


def test_encode_text_follows_the_charset() -> None:
    assert encode_text("钾", "GB 18030-2000") == "钾".encode("gb18030")
    assert encode_text("钾", "UNICODE UTF-8") == "钾".encode()
    assert encode_text("钾", None) == b"?"
    assert encode_text("x", "KLINGON") == b"x"
    assert codec_for("unicode utf-8") == "utf-8" and codec_for(None) == "ascii"


@pytest.mark.parametrize("raw", [b"MSH\rPID|1||42\r", b"MSH\nx", b"MSH|^~\r", b"\r\nMSH|"])
def test_an_msh_shorter_than_its_header_is_no_msh(raw: bytes) -> None:
    with pytest.raises(HL7ContentError) as caught:
        decode_message(raw)
    assert caught.value.segment == "MSH" and caught.value.code == 100
