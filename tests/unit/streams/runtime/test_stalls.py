"""The stall watchdog's decision, with plain numbers: which partitions are read again, and when not."""

from __future__ import annotations

from typing import Any

from streams.runtime.stalls import StallDetector, contiguous_offsets_app, skips_the_committed_offset

TP = ("norm.lab", 2)


def run(
    detector: StallDetector, checks: list[tuple[float, int, int, float | None]]
) -> list[list[tuple[str, int]]]:
    """Each check: (time, committed, end, busy_since) for one partition; the stalled lists returned."""
    return [detector.observe(now, {TP: committed}, {TP: end}, busy) for now, committed, end, busy in checks]


def test_a_commit_stuck_behind_waiting_events_for_the_patience_is_read_again_once_per_patience() -> None:
    decisions = run(
        StallDetector(patience=30),
        [
            (0, 167, 399, None),
            (15, 167, 399, None),
            (30, 167, 399, None),
            (45, 167, 399, None),
            (60, 167, 399, None),
        ],
    )
    assert decisions == [[], [], [TP], [], [TP]]


def test_a_moving_commit_is_never_a_stall() -> None:
    decisions = run(StallDetector(patience=30), [(t, 100 + t, 1000, None) for t in range(0, 120, 15)])
    assert decisions == [[]] * 8


def test_a_partition_read_to_its_end_is_never_a_stall_however_long_it_is_quiet() -> None:
    decisions = run(StallDetector(patience=30), [(t, 399, 399, None) for t in range(0, 120, 15)])
    assert decisions == [[]] * 8


def test_a_batch_in_flight_longer_than_the_patience_is_a_slow_store_not_a_stall() -> None:
    """A database outage holds one batch in its retry loop; re-reading would only add work."""
    decisions = run(StallDetector(patience=30), [(t, 167, 399, 0.0) for t in range(0, 120, 15)])
    assert decisions == [[]] * 8


def test_short_batches_of_other_partitions_do_not_hide_a_stall() -> None:
    decisions = run(StallDetector(patience=30), [(t, 167, 399, t - 1.0) for t in range(0, 45, 15)])
    assert decisions == [[], [], [TP]]


def test_a_new_commit_restarts_the_wait() -> None:
    decisions = run(
        StallDetector(patience=30),
        [
            (0, 167, 399, None),
            (20, 167, 399, None),
            (25, 180, 399, None),
            (50, 180, 399, None),
            (55, 180, 399, None),
        ],
    )
    assert decisions == [[], [], [], [], [TP]]


def test_a_partition_no_longer_assigned_is_forgotten() -> None:
    detector = StallDetector(patience=30)
    detector.observe(0, {TP: 167}, {TP: 399}, None)
    detector.observe(15, {}, {}, None)  # revoked
    assert detector.observe(30, {TP: 167}, {TP: 399}, None) == [], "the wait starts again on reassignment"


def test_a_commit_never_passes_the_unacknowledged_message_at_the_committed_offset(tmp_path: Any) -> None:
    """Faust's own check lets one missing message through (the one at the committed offset); the hub's
    consumer holds the commit there until the watchdog has the message read again."""
    import faust
    from faust.types import TP as FaustTP

    app = contiguous_offsets_app(faust.App)(
        "stalls-test", broker="kafka://127.0.0.1:1", store="memory://", datadir=str(tmp_path)
    )
    consumer = app.consumer  # built, not connected
    tp = FaustTP("raw.H001.lab", 0)
    for committed, acked, expected in [
        (40, [41, 42, 43], None),  # 40 was dropped after a rebalance: Faust alone would commit 44
        (40, [40, 41, 43], 42),  # the first run that starts at the commit
        (None, [1, 2], None),  # never committed: the partition starts at 0
        (None, [0, 1], 2),
    ]:
        consumer._committed_offset[tp] = committed
        consumer._acked[tp] = list(acked)
        consumer._acked_index[tp] = set(acked)
        assert consumer._new_offset(tp) == expected, (committed, acked)


def test_skips_the_committed_offset() -> None:
    assert skips_the_committed_offset([41], 40)
    assert not skips_the_committed_offset([40, 41], 40)
    assert not skips_the_committed_offset([], 40)
    assert skips_the_committed_offset([3], None)


def test_offsets_holding_no_event_are_committed_past_once_a_read_committed_reader_shows_it(
    tmp_path: Any,
) -> None:
    """Transaction markers and aborted records are never delivered; after a check (a read-committed
    read from the committed offset) the commit passes them. Events Faust dropped still hold it."""
    import asyncio

    import faust
    from faust.types import TP as FaustTP

    first_records = {("raw.C003.lab", 0, 40): 42, ("raw.H001.lab", 0, 40): 41}  # (topic, partition, start)
    asked: list[tuple[str, int, int]] = []

    def first_record_offset(topic: str, partition: int, start: int) -> int | None:
        asked.append((topic, partition, start))
        return first_records[(topic, partition, start)]

    app = contiguous_offsets_app(faust.App, first_record_offset)(
        "stalls-test", broker="kafka://127.0.0.1:1", store="memory://", datadir=str(tmp_path)
    )
    consumer = app.consumer

    async def commits(tp: FaustTP, acked: list[int]) -> list[int | None]:
        consumer._committed_offset[tp] = 40
        consumer._acked[tp] = list(acked)
        consumer._acked_index[tp] = set(acked)
        first = consumer._new_offset(tp)  # the check starts in a thread; meanwhile the commit waits
        for _ in range(100):
            await asyncio.sleep(0.01)
            if asked.count((tp.topic, tp.partition, 40)) and consumer._skipped._checking == set():
                break
        return [first, consumer._new_offset(tp)]

    # 40 and 41 hold no event (an aborted record, its marker): a read-committed reader gets 42 first
    assert asyncio.run(commits(FaustTP("raw.C003.lab", 0), [42, 43])) == [None, 44]
    # 40 is an event (Faust dropped it): the commit stays at 40 for the watchdog
    assert asyncio.run(commits(FaustTP("raw.H001.lab", 0), [42, 43])) == [None, None]
    assert asked == [("raw.C003.lab", 0, 40), ("raw.H001.lab", 0, 40)], "each position is checked once"
