"""Random bytes and mutated samples through decode_message -> map_message: only HL7ContentError, never
another exception, never a hang (bounded examples, each under a time limit)."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.gateways.exceptions import HL7ContentError
from producers.gateways.hl7 import samples
from producers.gateways.hl7.ack import build_ack
from producers.gateways.hl7.charset import decode_message, encode_text
from producers.gateways.hl7.mapping import map_message, parse_header, salvage_header

NOW = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)
SAMPLES = [(name, raw) for name, raw in sorted(samples.all_samples().items())] + [
    ("unsupported", samples.unsupported())
]
INSTITUTION_OF = {"oru_r01_v23": "C003", "omp_o09": "H002", "oru_gb18030": "H002"}
SPECIAL = [b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\x00", b"\xff", b"\x81", b"MSH", b"\\X", b"\\XZZ\\"]


@contextmanager
def _at_most(seconds: int) -> Iterator[None]:
    def hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _through(raw: bytes, institution: str) -> None:
    with _at_most(5):
        try:
            decoded = decode_message(raw)
            header = parse_header(decoded)
            mapped = map_message(decoded, institution, NOW)
            assert mapped.events
            encode_text(build_ack(header, "AA", now=NOW), header.charset)
        except HL7ContentError as error:
            assert error.segment and error.reason and isinstance(error.code, int)
            ack = build_ack(salvage_header(raw), "AE", [error], now=NOW)
            assert "MSA|AE" in ack


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes(raw: bytes) -> None:
    _through(raw, "H001")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=500))
def test_random_bytes_after_an_msh(tail: bytes) -> None:
    _through(b"MSH|^~\\&|LIS|H001|HUB|REG|20261123093000||ORU^R01|C1|P|2.5.1\r" + tail, "H001")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=4000),
            st.integers(min_value=0, max_value=20),
            st.one_of(st.sampled_from(SPECIAL), st.binary(max_size=6)),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_samples(sample: tuple[str, bytes], edits: list[tuple[int, int, bytes]]) -> None:
    name, raw = sample
    data = bytearray(raw)
    for position, length, insert in edits:
        at = position % (len(data) + 1)
        data[at : at + length] = insert
    _through(bytes(data), INSTITUTION_OF.get(name, "H001"))


def test_truncations_of_every_sample() -> None:
    for name, raw in SAMPLES:
        for end in range(0, len(raw), 7):
            _through(raw[:end], INSTITUTION_OF.get(name, "H001"))
