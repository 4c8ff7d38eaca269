"""The fetch loop's inline start of each message's callback (streams/runtime/delivery.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import pytest
from mode import Service

from streams.runtime.delivery import inline_delivery_consumer, start_inline


def test_a_coroutine_that_never_waits_finishes_inline() -> None:
    done: list[int] = []

    async def callback(value: int) -> None:
        done.append(value)

    assert start_inline(callback(7)) is None
    assert done == [7]


def test_an_error_of_the_first_step_propagates() -> None:
    async def callback() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        start_inline(callback())


def test_a_coroutine_that_waits_resumes_where_it_stopped_in_a_task_of_its_own() -> None:
    asyncio.run(_a_coroutine_that_waits_resumes_where_it_stopped_in_a_task_of_its_own())


async def _a_coroutine_that_waits_resumes_where_it_stopped_in_a_task_of_its_own() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def callback() -> str:
        steps.append("before")
        got = await future
        steps.append(got)
        await asyncio.sleep(0)  # a bare yield to the loop, after the first suspension
        steps.append("after")
        return "result"

    rest = start_inline(callback())
    assert rest is not None
    assert steps == ["before"]  # ran inline up to the wait, not beyond
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()  # waits on the future it stopped at
    future.set_result("resumed")
    assert await task == "result"
    assert steps == ["before", "resumed", "after"]


def test_cancelling_the_rest_cancels_the_coroutine_at_its_wait() -> None:
    asyncio.run(_cancelling_the_rest_cancels_the_coroutine_at_its_wait())


async def _cancelling_the_rest_cancels_the_coroutine_at_its_wait() -> None:
    blocker = asyncio.Event()
    cleaned: list[str] = []

    async def callback() -> None:
        try:
            await blocker.wait()
        finally:
            cleaned.append("finally")

    rest = start_inline(callback())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"]


def test_an_error_after_the_first_suspension_reaches_the_awaiting_task() -> None:
    asyncio.run(_an_error_after_the_first_suspension_reaches_the_awaiting_task())


async def _an_error_after_the_first_suspension_reaches_the_awaiting_task() -> None:
    async def callback() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    rest = start_inline(callback())
    assert rest is not None
    with pytest.raises(KeyError, match="later"):
        await asyncio.ensure_future(rest)


@dataclass(frozen=True)
class Message:
    topic: str
    offset: int


class FakeConsumer(Service):
    """What Faust's consumer gives the fetch loop; `wait_first`, `sleep` and the stop events are mode's."""

    consumer_stopped_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, batches: list[list[tuple[str, Message]]], callback: Any) -> None:
        super().__init__()
        self.batches = batches
        self.callback = callback
        self.suspend_flow = asyncio.Event()
        self._read_offset: dict[str, int | None] = {}
        self._commit_every = 3
        self._n_acked = 0
        self.commits = 0
        self.gaps: list[tuple[str, int, int]] = []
        self.diag = cast(Any, SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None))
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=True))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[str, Message]]:
        if not self.batches:
            self._stopped.set()  # nothing more: the loop ends at its next check
            return
        for pair in self.batches.pop(0):
            self._read_offset.setdefault(pair[0], None)
            yield pair

    async def _add_gap(self, tp: str, offset_from: int, offset_to: int) -> None:
        self.gaps.append((tp, offset_from, offset_to))

    async def commit(self) -> None:
        self.commits += 1


Delivering = inline_delivery_consumer(FakeConsumer)


def test_the_loop_hands_over_each_message_in_order_and_skips_offsets_below_the_read_one() -> None:
    asyncio.run(_the_loop_hands_over_each_message_in_order_and_skips_offsets_below_the_read_one())


async def _the_loop_hands_over_each_message_in_order_and_skips_offsets_below_the_read_one() -> None:
    delivered: list[int] = []

    async def callback(message: Message) -> None:
        delivered.append(message.offset)
        consumer._n_acked += 1

    batches = [
        [("tp", Message("t", 0)), ("tp", Message("t", 1))],
        [("tp", Message("t", 0)), ("tp", Message("t", 4)), ("tp", Message("t", 5))],  # 0 again; 2-3 missing
    ]
    consumer = Delivering(batches, callback)
    await consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event()))
    assert delivered == [0, 1, 4, 5]
    assert consumer._read_offset["tp"] == 5
    assert consumer.gaps == [("tp", 2, 4)]  # Faust's gap call (the hub's consumer ignores it, stalls.py)
    assert consumer.commits == 1  # commit_every 3 acks, checked before each message


def test_a_held_callback_is_cancelled_when_a_rebalance_begins_and_the_loop_goes_on() -> None:
    asyncio.run(_a_held_callback_is_cancelled_when_a_rebalance_begins_and_the_loop_goes_on())


async def _a_held_callback_is_cancelled_when_a_rebalance_begins_and_the_loop_goes_on() -> None:
    held = asyncio.Event()
    outcomes: list[str] = []

    async def callback(message: Message) -> None:
        if message.offset == 0:
            try:
                await held.wait()  # as flow control holds it while a rebalance runs
            except asyncio.CancelledError:
                outcomes.append("cancelled 0")
                raise
        outcomes.append(f"delivered {message.offset}")

    consumer = Delivering([[("tp", Message("t", 0)), ("tp", Message("t", 1))]], callback)
    draining = asyncio.ensure_future(consumer._drain_messages(SimpleNamespace(_stopped=asyncio.Event())))
    await asyncio.sleep(0.01)
    assert outcomes == []  # the loop waits on the held callback
    consumer.suspend_flow.set()
    await asyncio.wait_for(draining, 2)
    await asyncio.sleep(0)  # mode's wait_first cancels what lost without waiting for it, as in Faust
    assert sorted(outcomes) == ["cancelled 0", "delivered 1"]
