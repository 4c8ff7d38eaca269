"""The MLLP framer: frames recovered exactly however the stream is chunked, garbage skipped and counted,
truncated and oversized frames reported, memory bounded; never a crash or a hang (hypothesis, bounded)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.gateways.mllp import (
    Frame,
    FramerEvent,
    MLLPFramer,
    Oversized,
    Skipped,
    Truncated,
    read_frames,
    wrap,
)

MAX = 2048
# Message content: any byte but the start block 0x0B and the end block 0x1C (HL7 text never has them).
content = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
# Garbage between frames: anything without a start block.
garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\x0b", b""))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(framer: MLLPFramer, chunks: list[bytes]) -> list[FramerEvent]:
    events: list[FramerEvent] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
        assert framer.buffered <= framer.max_frame_bytes
    tail = framer.close()
    if tail is not None:
        events.append(tail)
    return events


def test_one_frame() -> None:
    framer = MLLPFramer(MAX)
    assert framer.feed(wrap(b"MSH|^~\\&|A\rPID|1")) == [Frame(b"MSH|^~\\&|A\rPID|1")]
    assert framer.close() is None


def test_end_block_split_across_chunks() -> None:
    framer = MLLPFramer(MAX)
    assert framer.feed(b"\x0bMSH|x\x1c") == []
    assert framer.feed(b"\x0d") == [Frame(b"MSH|x")]


def test_lone_file_separator_is_content() -> None:
    framer = MLLPFramer(MAX)
    assert framer.feed(b"\x0ba\x1cb\x1c\x0d") == [Frame(b"a\x1cb")]
    assert framer.feed(b"\x0ba\x1c") == []
    assert framer.feed(b"b\x1c\x0d") == [Frame(b"a\x1cb")]


def test_garbage_is_skipped_and_counted() -> None:
    framer = MLLPFramer(MAX)
    events = framer.feed(b"noise\r\n" + wrap(b"one") + b"\x00\xff" + wrap(b"two") + b"tail")
    assert events == [Skipped(7), Frame(b"one"), Skipped(2), Frame(b"two"), Skipped(4)]


def test_start_block_inside_a_frame_truncates_it_and_resynchronises() -> None:
    framer = MLLPFramer(MAX)
    assert framer.feed(b"\x0bMSH|cut short" + wrap(b"MSH|whole")) == [
        Truncated(b"MSH|cut short"),
        Frame(b"MSH|whole"),
    ]


def test_stream_ending_inside_a_frame() -> None:
    framer = MLLPFramer(MAX)
    assert framer.feed(b"\x0bMSH|half\x1c") == []
    assert framer.close() == Truncated(b"MSH|half\x1c")


def test_oversized_frame_is_reported_and_the_next_one_read() -> None:
    framer = MLLPFramer(1024, head_bytes=100)
    big = b"MSH|" + b"x" * 5000
    events = run(framer, [wrap(big)[:3000], wrap(big)[3000:] + wrap(b"next")])
    assert events == [Oversized(len(big), big[:100]), Frame(b"next")]


def test_frame_of_exactly_the_maximum_passes() -> None:
    assert MLLPFramer(1024).feed(wrap(b"a" * 1024)) == [Frame(b"a" * 1024)]
    assert isinstance(MLLPFramer(1024).feed(wrap(b"a" * 1025))[0], Oversized)


def test_read_frames() -> None:
    assert read_frames(b"x" + wrap(b"ack1") + wrap(b"ack2")) == [b"ack1", b"ack2"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.tuples(garbage, content, st.booleans()), max_size=12),
    trailing=garbage,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_frames_recovered_exactly_however_chunked(
    items: list[tuple[bytes, bytes, bool]], trailing: bytes, cuts: list[int]
) -> None:
    """Garbage between frames, truncated frames (a start block without its end) inside the stream."""
    stream = b""
    expected: list[FramerEvent] = []
    for noise, payload, truncate in items:
        stream += noise
        if noise:
            expected.append(Skipped(len(noise)))
        if truncate:
            stream += b"\x0b" + payload  # cut short: the next start block (or the end) truncates it
            expected.append(Truncated(payload))
            expected.append(Frame(payload))
            stream += wrap(payload)
        else:
            stream += wrap(payload)
            expected.append(Frame(payload))
    stream += trailing
    if trailing:
        expected.append(Skipped(len(trailing)))
    events = run(MLLPFramer(MAX), chunked(stream, cuts))
    assert merge(events) == merge(expected)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=20),
)
def test_oversized_frames_never_buffer_more_than_the_maximum(sizes: list[int], cuts: list[int]) -> None:
    framer = MLLPFramer(1024, head_bytes=64)
    payloads = [bytes([0x41 + i % 26]) * size for i, size in enumerate(sizes)]
    events = run(framer, chunked(b"".join(wrap(p) for p in payloads), cuts))
    expected = [Frame(p) if len(p) <= 1024 else Oversized(len(p), p[:64]) for p in payloads]
    assert events == expected


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
)
def test_random_bytes_never_crash_and_every_byte_is_accounted(stream: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes: only framer events, bounded memory, and each byte is in one event or a delimiter."""
    events = run(MLLPFramer(512, head_bytes=512), chunked(stream, cuts))
    accounted = 0
    for event in events:
        if isinstance(event, Skipped):
            accounted += event.count
        elif isinstance(event, Frame | Truncated):
            accounted += len(event.payload)
        else:
            assert isinstance(event, Oversized)
            assert event.size > 512
            accounted += event.size
    framed = len([e for e in events if not isinstance(e, Skipped)])
    assert accounted <= len(stream)
    assert len(stream) - accounted <= 3 * framed  # a start block and at most an end block per frame
    # the same stream in one chunk gives the same events
    assert merge(run(MLLPFramer(512, head_bytes=512), [stream])) == merge(events)


def merge(events: list[FramerEvent]) -> list[FramerEvent]:
    merged: list[FramerEvent] = []
    for event in events:
        if isinstance(event, Skipped) and merged and isinstance(merged[-1], Skipped):
            merged[-1] = Skipped(merged[-1].count + event.count)
        else:
            merged.append(event)
    return merged
