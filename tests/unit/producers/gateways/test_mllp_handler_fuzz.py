"""The MLLP message handler under random input and a broker that fails at random: an AA only when
Kafka confirmed every event derived from the message, an AE or AR otherwise, never another exception,
and a resend of an answered message gets the same ACK without publishing again."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import GatewaySettings
from producers.exceptions import DeliveryFailedError
from producers.gateways.hl7 import samples
from producers.gateways.ledger import AckLedger
from producers.gateways.mllp import MessageHandler, make_mllp_metrics
from producers.publisher import Receipt
from producers.validation import check_event
from schemas import standard

SCHEMAS = {kind: standard.load(name) for kind, name in standard.KIND_SCHEMAS.items()}


class FlakyPublisher:
    """Confirms each event with probability `p`, records what it confirmed."""

    def __init__(self, rng: random.Random, p: float) -> None:
        self.rng, self.p = rng, p
        self.confirmed: list[str] = []

    def validate(self, kind: str, record: Mapping[str, Any]) -> None:
        check_event(kind, record, SCHEMAS[kind], "H001")

    def publish_many(
        self, kind: str, records: Sequence[Mapping[str, Any]]
    ) -> list[Receipt | DeliveryFailedError]:
        return self.publish_events([(kind, r) for r in records])

    def publish_events(
        self, events: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Receipt | DeliveryFailedError]:
        out: list[Receipt | DeliveryFailedError] = []
        for kind, record in events:
            event_id = str(record["envelope"]["event_id"])
            if self.rng.random() < self.p:
                self.confirmed.append(event_id)
                out.append(Receipt(event_id, kind, 0, 0))
            else:
                out.append(DeliveryFailedError(event_id, "broker unavailable", retriable=True))
        return out

    def close(self, timeout: float | None = None) -> None:
        return None


class DeadLetters:
    def __init__(self) -> None:
        self.records: list[Mapping[str, Any]] = []

    def publish(self, record: Mapping[str, Any], key: bytes | None) -> None:
        self.records.append(record)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        if not buf:
            break
        at = rng.randrange(len(buf))
        choice = rng.random()
        if choice < 0.4:
            buf[at] = rng.randrange(256)
        elif choice < 0.7:
            del buf[at : at + rng.randint(1, 20)]
        else:
            buf[at:at] = bytes([rng.choice(b"|^~\\&\r\n\x0b\x1c")])
    return bytes(buf)


MESSAGES = list(samples.all_samples("H001").values())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), p=st.sampled_from([0.0, 0.5, 0.9, 1.0]), which=st.integers(0, 1000))
def test_an_aa_only_for_a_message_whose_every_event_was_confirmed(
    tmp_path: Path, seed: int, p: float, which: int
) -> None:
    rng = random.Random(seed)
    message = MESSAGES[which % len(MESSAGES)]
    raw = mutate(message, rng) if rng.random() < 0.7 else message
    publisher = FlakyPublisher(rng, p)
    ledger = AckLedger(tmp_path / f"ledger-{uuid.uuid4().hex}.sqlite3", 30)  # hypothesis replays examples
    with ThreadPoolExecutor(2) as publish, ThreadPoolExecutor(1) as keep:
        handler = MessageHandler(
            GatewaySettings(), {"H001": publisher}, ledger, DeadLetters(), make_mllp_metrics(), publish, keep
        )

        async def run() -> tuple[Any, Any]:
            first = await handler.handle_frame("H001", raw)
            confirmed_after_first = list(publisher.confirmed)
            second = await handler.handle_frame("H001", raw)
            if raw == message and first.code in ("AA", "AE"):
                assert second.from_ledger, "an answered message with its MSH-10 is in the ledger"
            if second.from_ledger:  # (a message without MSH-10 has nothing to be known again by)
                assert second.ack == first.ack, "the original ACK"
                assert publisher.confirmed == confirmed_after_first, "and nothing published again"
            return first, confirmed_after_first

        try:
            first, confirmed = asyncio.run(run())
        finally:
            handler.close()
            ledger.close()
    assert first.code in ("AA", "AE", "AR")
    if first.code == "AA":
        assert first.published > 0 and len(confirmed) == first.published, "AA: every event confirmed"
    else:
        assert first.ack.startswith(b"MSH")
    assert b"MSA|" + first.code.encode() in first.ack


def test_a_broker_that_fails_gets_ar_and_the_resend_once_it_is_back_gets_aa(tmp_path: Path) -> None:
    """The same paths without randomness: so the property above is not vacuous."""
    publisher = FlakyPublisher(random.Random(1), 0.0)
    ledger = AckLedger(tmp_path / "ledger.sqlite3", 30)
    message = samples.oru_r01("H001")
    with ThreadPoolExecutor(2) as publish, ThreadPoolExecutor(1) as keep:
        handler = MessageHandler(
            GatewaySettings(), {"H001": publisher}, ledger, DeadLetters(), make_mllp_metrics(), publish, keep
        )

        async def run() -> list[Any]:
            down = await handler.handle_frame("H001", message)
            publisher.p = 1.0
            back = await handler.handle_frame("H001", message)
            again = await handler.handle_frame("H001", message)
            return [down, back, again]

        try:
            down, back, again = asyncio.run(run())
        finally:
            handler.close()
            ledger.close()
    assert (down.code, back.code, again.code) == ("AR", "AA", "AA")
    assert back.published == len(set(publisher.confirmed)) > 0
    assert again.from_ledger and again.ack == back.ack
