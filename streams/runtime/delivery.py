"""Faust's fetch loop, handing each message to the conductor without four tasks per message.

Faust's consumer (faust/transport/consumer.py `_drain_messages`, faust-streaming 0.15.3 pinned) passes
every fetched message to the conductor as `wait_first(callback(message), suspend_flow.wait())`: the
callback is raced against a rebalance beginning, so that a callback held by flow control (suspended for
the rebalance) or by a full stream buffer does not hold the rebalance up. `wait_first` makes four tasks
(the callback, the suspend-flow wait, the service's stopped and crashed waits) and an `asyncio.wait`, and
cancels three of them, for every message: 85 us of a worker's CPU per message on this machine (a
normaliser spent ~500 us per event in all), against well under a microsecond for the callback itself.

The callback almost never waits: the flow is active and the stream's queue has room. So here it runs
inline up to its first suspension (`start_inline`); only if it does suspend is the rest of it raced
against suspend-flow exactly as Faust does (`wait_first`, which cancels it when a rebalance begins).
Everything else of the loop is Faust's: offsets, gaps, commit_every, yielding to the event loop every 100
messages, the stop and crash handling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING

YIELD_EVERY = 100  # messages handed over between two turns of the event loop, as Faust does


class _Rest:
    """The rest of a coroutine that already ran up to `pending`, the future it waits on, as an
    awaitable: awaiting it in a task resumes the coroutine where it stopped (the task waits on `pending`
    first), and a cancellation of the task is thrown into the coroutine."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task (a cancellation): passed on
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _resume(rest: _Rest) -> Any:
    return await rest


def start_inline(coro: Coroutine[Any, Any, Any]) -> Awaitable[Any] | None:
    """Run `coro` in the current task up to its first suspension: None once it has finished (its
    exception, if it raised, propagates), else an awaitable of the rest, to be awaited in a task of its
    own (`asyncio.ensure_future`)."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return _resume(_Rest(coro, pending))


def inline_delivery_consumer(consumer_class: Any) -> Any:
    """A Faust consumer class whose fetch loop starts each message's callback inline (`start_inline`)."""

    class InlineDeliveryConsumer(consumer_class):
        _n_acked: int  # Faust's count of acks since its last commit

        async def _deliver(self, callback: Any, message: Any) -> None:
            rest = start_inline(callback(message))
            if rest is not None:  # held (flow control, a full buffer): raced against a rebalance, as Faust
                await self.wait_first(rest, self.suspend_flow.wait())

        async def _drain_messages(self, fetcher: Any) -> None:
            callback = self.callback
            consumer_should_stop = self._stopped.is_set
            fetcher_should_stop = fetcher._stopped.is_set
            get_read_offset = self._read_offset.__getitem__
            set_read_offset = self._read_offset.__setitem__
            set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
            commit_every = self._commit_every
            acks_enabled_for = self.app.topics.acks_enabled_for
            since_yield = 0
            try:
                while not (consumer_should_stop() or fetcher_should_stop()):
                    set_flag(CONSUMER_FETCHING)
                    fetched = self.getmany(timeout=1.0)
                    await self.sleep(0)  # getmany may return at once, again and again
                    if not self.should_stop:
                        async for tp, message in fetched:
                            since_yield += 1
                            if since_yield > YIELD_EVERY:
                                await asyncio.sleep(0)
                                since_yield = 0
                            offset = message.offset
                            read_offset = get_read_offset(tp)
                            if read_offset is not None and offset < read_offset:
                                continue  # read already (Faust drops it too)
                            if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                                await self._add_gap(tp, read_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            await self._deliver(callback, message)
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    self.log.info("Broker stopped consumer, shutting down...")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    self.log.info("Consumer shutting down for user cancel.")
                    return
                raise
            except Exception as exc:
                self.log.exception("Drain messages raised: %r", exc)
                raise
            finally:
                unset_flag(CONSUMER_FETCHING)

    return InlineDeliveryConsumer


def inline_delivery_app(app_class: Any) -> Any:
    """A Faust App class whose transport's consumer is `inline_delivery_consumer` of the one it had."""

    class InlineDeliveryApp(app_class):
        def _new_transport(self) -> Any:
            transport = super()._new_transport()
            transport.Consumer = inline_delivery_consumer(transport.Consumer)
            return transport

    return cast(Any, InlineDeliveryApp)
