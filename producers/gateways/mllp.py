"""The MLLP gateway: HL7 v2 over TCP (optionally TLS, optionally mutual TLS), one listener per institution.

A frame is `0x0B <message> 0x1C 0x0D`. Frames are read as bytes (`MLLPFramer`, a pure class): the charset
is only known from MSH-18, so nothing is decoded before `hl7.charset.decode_message` reads it.

For each frame: decode -> map -> publish every derived event through the institution's `Publisher` (in a
thread; it blocks until Kafka confirms) -> answer:

- `AA` only once every event derived from the message is durably accepted by Kafka (acks=all);
- `AE` for a content error (an ERR segment naming segment, field, position and reason); the raw frame
  goes to the dead-letter topic first, and if that fails the answer is `AR` instead (nothing rejected is
  silent);
- `AR` when the message cannot be processed now (broker or registry unavailable, publish timeout), for an
  unsupported message type ("application reject", HL7 table 0357 code 200), an oversized frame or a
  truncated one: the sender resends and nothing is lost.

Resends: the ACK ledger (`ledger.py`) keeps the AA and AE answers by (institution, MSH-4, MSH-10); the
same message again gets the original ACK bytes and nothing is published (also after a restart).

Framing decisions (see docs/gateway-mllp.md):
- bytes outside a frame are skipped and counted;
- a start block inside a frame ends that frame as *truncated* (answered AR, dead-lettered) and starts a
  new one: the stream resynchronises at the next 0x0B;
- a frame longer than `mllp_max_frame_bytes` is not buffered: its first bytes are kept for the dead
  letter, the rest discarded up to its end block (or the next start block), then it is answered AR
  naming the limit, and the connection goes on with the next frame (resynchronised, not closed);
- a connection that ends inside a frame has its partial frame dead-lettered (no one to answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from core.contract import TopicNames
from core.settings import GatewaySettings, HubSettings
from producers.exceptions import DeliveryFailedError
from producers.gateways.common import GatewayMetrics, make_gateway_metrics
from producers.gateways.exceptions import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    GatewayError,
    HL7ContentError,
    InstitutionMismatchError,
    UnsupportedMessageError,
)
from producers.gateways.hl7.ack import build_ack
from producers.gateways.hl7.charset import Decoded, decode_message, encode_text
from producers.gateways.hl7.mapping import Header, map_message, parse_header, salvage_header
from producers.gateways.ledger import AckLedger, LedgerKey
from producers.gateways.tls import (
    certificate_institution,
    common_name,
    is_mutual,
    peer_certificate,
    server_ssl_context,
)
from producers.publisher import Receipt
from schemas.exceptions import RecordValidationError

log = logging.getLogger("clinhub.gateway.mllp")

START_BLOCK = 0x0B
END_BLOCK = 0x1C
CARRIAGE_RETURN = 0x0D
SB = b"\x0b"
EB = b"\x1c"
END = b"\x1c\x0d"
GATEWAY = "mllp"
PROCESSOR = "gateway-mllp"
# How much of an oversized frame is kept for its dead letter (and to read its MSH for the AR).
OVERSIZED_HEAD_BYTES = 65_536
DEADLETTER_NAMESPACE = uuid.UUID("0b1c0d00-6d6c-5c70-8a7e-6761746577a1")


def wrap(message: bytes) -> bytes:
    """One MLLP frame around a message."""
    return SB + message + END


# --- the framer: pure, bytes in, events out ---------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A complete frame's content (between 0x0B and 0x1C 0x0D)."""

    payload: bytes


@dataclass(frozen=True)
class Oversized:
    """A frame longer than the maximum: its size as far as seen and its first bytes."""

    size: int
    head: bytes


@dataclass(frozen=True)
class Truncated:
    """A frame cut short: a new start block, or the end of the stream, before its end block."""

    payload: bytes


@dataclass(frozen=True)
class Skipped:
    """Bytes outside any frame, skipped."""

    count: int


FramerEvent = Frame | Oversized | Truncated | Skipped


class MLLPFramer:
    """Turns a byte stream, chunked anyhow, into frames. Memory is bounded by the maximum frame size.

    `feed(chunk)` returns the events completed by that chunk, in stream order; `close()` the partial frame
    left at the end of the stream, if any.
    """

    def __init__(self, max_frame_bytes: int, head_bytes: int = OVERSIZED_HEAD_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.head_bytes = min(head_bytes, max_frame_bytes)
        self._in_frame = False
        self._buffer = bytearray()
        self._oversized = 0  # bytes of the current frame once it is over the maximum (0: it is not)
        self._head = b""
        self._pending_eb = False  # the previous chunk ended on 0x1C inside a frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _append(self, chunk: bytes | memoryview) -> None:
        if not chunk:
            return
        if self._oversized:
            self._oversized += len(chunk)
        elif len(self._buffer) + len(chunk) > self.max_frame_bytes:
            self._oversized = len(self._buffer) + len(chunk)
            self._head = (bytes(self._buffer) + bytes(chunk[: self.head_bytes]))[: self.head_bytes]
            self._buffer = bytearray()
        else:
            self._buffer += chunk

    def _take(self, complete: bool) -> FramerEvent:
        if self._oversized:
            event: FramerEvent = Oversized(self._oversized, self._head)
        elif complete:
            event = Frame(bytes(self._buffer))
        else:
            event = Truncated(bytes(self._buffer))
        self._buffer = bytearray()
        self._oversized = 0
        self._head = b""
        self._in_frame = False
        return event

    def feed(self, data: bytes) -> list[FramerEvent]:
        events: list[FramerEvent] = []
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            if not self._in_frame:
                start = data.find(SB, i)
                if start < 0:
                    events.append(Skipped(n - i))
                    break
                if start > i:
                    events.append(Skipped(start - i))
                self._in_frame = True
                i = start + 1
                continue
            if self._pending_eb:
                self._pending_eb = False
                if data[i] == CARRIAGE_RETURN:
                    events.append(self._take(complete=True))
                    i += 1
                    continue
                self._append(EB)  # a lone 0x1C is content (it will not decode as HL7 text)
            start = data.find(SB, i)
            limit = n if start < 0 else start
            end = data.find(EB, i, limit)
            while end >= 0 and end + 1 < n and data[end + 1] != CARRIAGE_RETURN:
                end = data.find(EB, end + 1, limit)
            if end >= 0 and end + 1 < n:  # a complete end block before any start block
                self._append(view[i:end])
                events.append(self._take(complete=True))
                i = end + 2
            elif end >= 0:  # 0x1C is the chunk's last byte: the 0x0D may come next
                self._append(view[i:end])
                self._pending_eb = True
                i = n
            elif start >= 0:  # a new start block inside the frame: this one was truncated
                self._append(view[i:start])
                events.append(self._take(complete=False))
                self._in_frame = True
                i = start + 1
            else:
                self._append(view[i:n])
                i = n
        return _merge_skips(events)

    def close(self) -> Truncated | Oversized | None:
        """The partial frame left when the stream ends (None if it ended between frames)."""
        if not self._in_frame:
            return None
        if self._pending_eb:
            self._pending_eb = False
            self._append(EB)
        event = self._take(complete=False)
        assert isinstance(event, Truncated | Oversized)  # noqa: S101 - _take(False) never gives a Frame
        return event


def _merge_skips(events: list[FramerEvent]) -> list[FramerEvent]:
    merged: list[FramerEvent] = []
    for event in events:
        if isinstance(event, Skipped) and merged and isinstance(merged[-1], Skipped):
            merged[-1] = Skipped(merged[-1].count + event.count)
        else:
            merged.append(event)
    return merged


def read_frames(data: bytes) -> list[bytes]:
    """The complete frames in a byte string (a client's view of our ACKs)."""
    return [e.payload for e in MLLPFramer(max(len(data), 1024)).feed(data) if isinstance(e, Frame)]


# --- metrics ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLLPMetrics:
    gateway: GatewayMetrics
    connections_open: Gauge
    connections: Counter
    connections_refused: Counter
    frames_oversized: Counter
    frames_truncated: Counter
    garbage_bytes: Counter
    idle_closed: Counter
    resends: Counter
    registry: CollectorRegistry


def make_mllp_metrics(registry: CollectorRegistry | None = None) -> MLLPMetrics:
    """Labels are bounded: institution (the configured listeners), reason (a fixed short list)."""
    registry = registry or CollectorRegistry()
    return MLLPMetrics(
        gateway=make_gateway_metrics(registry),
        connections_open=Gauge(
            "clinhub_mllp_connections_open", "MLLP connections open", ["institution"], registry=registry
        ),
        connections=Counter(
            "clinhub_mllp_connections", "MLLP connections accepted", ["institution"], registry=registry
        ),
        connections_refused=Counter(
            "clinhub_mllp_connections_refused",
            "MLLP connections refused: tls (handshake failed, no or untrusted client certificate),"
            " client_certificate (CN of another institution), max_connections, stopping",
            ["institution", "reason"],
            registry=registry,
        ),
        frames_oversized=Counter(
            "clinhub_mllp_frames_oversized",
            "Frames over mllp_max_frame_bytes",
            ["institution"],
            registry=registry,
        ),
        frames_truncated=Counter(
            "clinhub_mllp_frames_truncated",
            "Frames cut short by a new start block or the end of the connection",
            ["institution"],
            registry=registry,
        ),
        garbage_bytes=Counter(
            "clinhub_mllp_garbage_bytes",
            "Bytes received outside any frame, skipped",
            ["institution"],
            registry=registry,
        ),
        idle_closed=Counter(
            "clinhub_mllp_idle_closed",
            "Connections closed after mllp_idle_timeout_seconds without a byte",
            ["institution"],
            registry=registry,
        ),
        resends=Counter(
            "clinhub_mllp_resends",
            "Messages already answered (same MSH-4 and MSH-10), answered from the ledger",
            ["institution"],
            registry=registry,
        ),
        registry=registry,
    )


# --- dead letters -------------------------------------------------------------------------------------------


class DeadLetterSink(Protocol):
    def publish(self, record: Mapping[str, Any], key: bytes | None) -> None:
        """Return once the broker durably has the dead letter; raise otherwise."""


class PublisherLike(Protocol):
    def publish_many(
        self, kind: str, records: Sequence[Mapping[str, Any]]
    ) -> list[Receipt | DeliveryFailedError]: ...

    def publish_events(
        self, events: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Receipt | DeliveryFailedError]: ...

    def validate(self, kind: str, record: Mapping[str, Any]) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class DeadLetterUndelivered(GatewayError):
    """The dead letter was not confirmed by the broker."""


class KafkaDeadLetters:
    """DeadLetter records on the hub's dead-letter topic: librdkafka (acks=all) and the registry encoder."""

    def __init__(
        self, producer: Any, encoder: Callable[[Mapping[str, Any]], bytes], topic: str, timeout: float
    ):
        self._producer = producer
        self._encoder = encoder
        self.topic = topic
        self._timeout = timeout
        self._lock = threading.Lock()

    def publish(self, record: Mapping[str, Any], key: bytes | None) -> None:
        value = self._encoder(record)
        done: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            done.append(err)

        with self._lock:
            self._producer.produce(self.topic, value=value, key=key, on_delivery=on_delivery)
        deadline = time.monotonic() + self._timeout + 5
        while not done and time.monotonic() < deadline:
            self._producer.poll(0.1)
        if not done:
            raise DeadLetterUndelivered("no delivery report for the dead letter within the timeout")
        if done[0] is not None:
            raise DeadLetterUndelivered(f"dead letter not delivered: {done[0]}")

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)


def make_dead_letters(settings: HubSettings, timeout: float) -> KafkaDeadLetters:
    from confluent_kafka import Producer

    from schemas import standard
    from schemas.wire import ConfluentRegistry, make_encoder

    encoder = make_encoder(
        ConfluentRegistry(settings.registry.client_config()), standard.load(standard.DEAD_LETTER), check=False
    )
    return KafkaDeadLetters(
        Producer(settings.kafka.producer_config(timeout)),
        encoder,
        TopicNames(prefix=settings.stream.topic_prefix).deadletter_topic,
        timeout,
    )


def dead_letter_for(
    institution: str,
    raw: bytes,
    error_class: str,
    reason: str,
    field_name: str | None,
    control_id: str | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """The DeadLetter record of a rejected frame; its id derives from the institution and the bytes, so a
    resend of the same rejected message makes the same dead letter."""
    digest = hashlib.sha256(raw).hexdigest()
    return {
        "deadletter_id": str(
            uuid.uuid5(DEADLETTER_NAMESPACE, f"{GATEWAY}|{institution}|{digest}|{error_class}")
        ),
        "original_topic": f"{GATEWAY}:{institution}",
        "original_partition": -1,
        "original_offset": -1,
        "original_key": None,
        "original_value": raw,
        "error_class": error_class,
        "field": field_name,
        "reason": reason,
        "institution_id": institution,
        "correlation_id": control_id or None,
        "failed_time": now,
        "processor": PROCESSOR,
        "possibly_critical": False,
        "loinc_code": None,
    }


# --- handling one message -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one frame got: the ACK code, the encoded ACK (a frame's content), why (for metrics)."""

    code: str
    ack: bytes
    reason: str
    published: int = 0
    from_ledger: bool = False


def _error_field(error: HL7ContentError) -> str | None:
    """Where, as the ERR segment says it (`OBX[2]-5.1`); None for an error of the whole frame."""
    return error.location if error.field is not None else None


def _reason_label(error: BaseException) -> str:
    """A short, bounded label for the rejected-by-reason counter."""
    if isinstance(error, UnsupportedMessageError):
        return "unsupported"
    if isinstance(error, InstitutionMismatchError):
        return "institution_mismatch"
    if isinstance(error, HL7ContentError):
        return "content"
    if isinstance(error, RecordValidationError):
        return "validation"
    return "unavailable"


def _gateway_error(
    reason: str, segment: str = "MSH", code: int = APPLICATION_INTERNAL_ERROR
) -> HL7ContentError:
    """An HL7ContentError for the ERR segment of an answer that is not about one field (AR causes)."""
    return HL7ContentError(segment, None, reason, code=code)


def _header_of(raw: bytes) -> Header | None:
    """The header, best effort (to echo MSH-10 and follow MSH-18 in an answer to a broken frame)."""
    try:
        return parse_header(decode_message(raw))
    except Exception:  # noqa: BLE001 - best effort only: the MSH read as Latin-1, or no header at all
        try:
            return salvage_header(raw)
        except Exception:  # noqa: BLE001
            return None


Events = Sequence[tuple[str, Mapping[str, Any]]]
BatchResult = list[Receipt | DeliveryFailedError] | BaseException


def publish_batch(publisher: PublisherLike, messages: Sequence[Events]) -> list[BatchResult]:
    """Publish the events of several messages in one `publish_events` (one wait for all their delivery
    reports, whatever their kinds); results per message.

    A message with an invalid record gets its `RecordValidationError` and sends nothing; the others are
    published (publish_events would otherwise refuse the whole batch for one bad record)."""
    out: list[BatchResult | None] = [None] * len(messages)
    items: list[tuple[int, int, str, Mapping[str, Any]]] = []
    for m, events in enumerate(messages):
        try:
            for kind, record in events:
                publisher.validate(kind, record)
        except RecordValidationError as error:
            out[m] = error
            continue
        out[m] = [DeliveryFailedError("", "not published", True)] * len(events)
        items.extend((m, e, kind, record) for e, (kind, record) in enumerate(events))
    if items:
        try:
            results = publisher.publish_events([(kind, record) for _m, _e, kind, record in items])
        except Exception as error:  # noqa: BLE001 - every message of the batch gets it (AR)
            for m, _e, _kind, _record in items:
                out[m] = error
        else:
            for (m, e, _kind, _record), result in zip(items, results, strict=True):
                slot = out[m]
                if isinstance(slot, list):
                    slot[e] = result
    return [r if r is not None else [] for r in out]


class PublishBatcher:
    """One institution's publishing on one thread of its own: the messages that arrive while a batch is
    on its way to Kafka go together in the next one (one publish_many per kind), so concurrent
    connections share the broker's round trips instead of competing for the producer's delivery reports
    (a publish_many polling from several threads at once can sleep through its own report)."""

    def __init__(self, publisher: PublisherLike) -> None:
        self.publisher = publisher
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mllp-publish")
        self._pending: list[tuple[Events, asyncio.Future[list[Receipt | DeliveryFailedError]]]] = []
        self._task: asyncio.Task[None] | None = None

    async def publish(self, events: Events) -> list[Receipt | DeliveryFailedError]:
        future: asyncio.Future[list[Receipt | DeliveryFailedError]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending.append((events, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(
                    self._executor, publish_batch, self.publisher, [events for events, _f in batch]
                )
            except Exception as error:  # noqa: BLE001 - handed to every waiting message
                results = [error] * len(batch)
            for (_events, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class MessageHandler:
    """Turns one frame (or framing event) into its ACK. Blocking work runs in the given executors."""

    def __init__(
        self,
        gateway: GatewaySettings,
        publishers: Mapping[str, PublisherLike],
        ledger: AckLedger,
        dead_letters: DeadLetterSink,
        metrics: MLLPMetrics,
        publish_executor: ThreadPoolExecutor,
        ledger_executor: ThreadPoolExecutor,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.gateway = gateway
        self.publishers = publishers
        self.ledger = ledger
        self.dead_letters = dead_letters
        self.metrics = metrics
        self._publish_executor = publish_executor
        self._ledger_executor = ledger_executor
        self.clock = clock
        self._key_locks: dict[LedgerKey, asyncio.Lock] = {}
        self._batchers: dict[str, PublishBatcher] = {}

    def _batcher(self, institution: str) -> PublishBatcher:
        batcher = self._batchers.get(institution)
        if batcher is None:
            batcher = self._batchers[institution] = PublishBatcher(self.publishers[institution])
        return batcher

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()

    async def _in(self, executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _ack(
        self,
        header: Header | None,
        code: str,
        errors: Sequence[HL7ContentError] = (),
        text: str | None = None,
    ) -> bytes:
        charset = header.charset if header is not None else None
        message = build_ack(header, code, errors=tuple(errors), text=text)
        try:
            return encode_text(message, charset)
        except Exception:  # noqa: BLE001 - a charset that cannot encode the ACK text: plain ASCII-safe UTF-8
            return message.encode("utf-8")

    async def _dead_letter(
        self,
        institution: str,
        raw: bytes,
        error: BaseException,
        reason: str,
        field_name: str | None,
        header: Header | None,
    ) -> bool:
        record = dead_letter_for(
            institution,
            raw,
            type(error).__name__,
            reason,
            field_name,
            header.control_id if header else None,
            self.clock(),
        )
        try:
            await asyncio.wait_for(
                self._in(self._publish_executor, self.dead_letters.publish, record, institution.encode()),
                timeout=self.gateway.publish_timeout_seconds + 10,
            )
            return True
        except Exception as exc:  # noqa: BLE001 - the dead letter did not land: the sender must resend
            log.warning("dead letter for %s not published (%s): answering AR", institution, exc)
            return False

    def _count(self, institution: str, answer: Answer, started: float) -> Answer:
        m = self.metrics.gateway
        if answer.code == "AA":
            m.accepted.labels(GATEWAY, institution).inc()
        else:
            m.rejected.labels(GATEWAY, institution, answer.reason).inc()
        m.response_seconds.labels(GATEWAY).observe(time.perf_counter() - started)
        return answer

    async def reject(
        self,
        institution: str,
        raw: bytes,
        error: HL7ContentError,
        header: Header | None,
        code: str,
        reason_label: str,
        key: LedgerKey | None = None,
    ) -> Answer:
        """AE or AR with an ERR segment, after the raw bytes are on the dead-letter topic (else AR)."""
        reason = str(error)
        if not await self._dead_letter(institution, raw, error, reason, _error_field(error), header):
            ack = self._ack(header, "AR", [_gateway_error(f"{reason}; not recorded, send again")])
            return Answer("AR", ack, "deadletter_unavailable")
        ack = self._ack(header, code, [error])
        if code == "AE" and key is not None:
            await self._keep(key, "AE", ack, raw)
        return Answer(code, ack, reason_label)

    async def _keep(self, key: LedgerKey, code: str, ack: bytes, raw: bytes) -> None:
        try:
            await self._in(self._ledger_executor, self.ledger.put, key, code, ack, raw)
        except Exception:
            log.exception("ACK ledger write failed for %s", key)

    async def handle_frame(self, institution: str, raw: bytes) -> Answer:
        started = time.perf_counter()
        self.metrics.gateway.received.labels(GATEWAY, institution).inc()
        answer = await self._handle_frame(institution, raw)
        return self._count(institution, answer, started)

    async def _handle_frame(self, institution: str, raw: bytes) -> Answer:
        received = self.clock()
        decoded: Decoded | None = None
        failure: HL7ContentError | None = None
        try:
            decoded = decode_message(raw)
            header: Header | None = parse_header(decoded)
        except HL7ContentError as error:
            # not decodable (unknown or wrong MSH-18, no MSH...): the MSH read as Latin-1 if it can be,
            # for MSA-2 and the ledger key
            failure, header = error, _header_of(raw)
        key = (
            LedgerKey(institution, header.sending_facility or "", header.control_id)
            if header is not None and header.control_id
            else None
        )
        if key is None:
            return await self._answer(institution, raw, decoded, header, failure, received, None)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                entry = await self._in(self._ledger_executor, self.ledger.get, key)
                if entry is not None:
                    self.metrics.resends.labels(institution).inc()
                    if entry.message_sha256 != hashlib.sha256(raw).hexdigest():
                        log.warning(
                            "%s resent MSH-10 %s with other content: answered as the first time",
                            institution,
                            key.control_id,
                        )
                    reason = "accepted" if entry.code == "AA" else "resend"
                    return Answer(entry.code, entry.ack, reason, 0, True)
                return await self._answer(institution, raw, decoded, header, failure, received, key)
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._key_locks.pop(key, None)

    async def _answer(
        self,
        institution: str,
        raw: bytes,
        decoded: Decoded | None,
        header: Header | None,
        failure: HL7ContentError | None,
        received: dt.datetime,
        key: LedgerKey | None,
    ) -> Answer:
        if failure is not None or decoded is None or header is None:
            error = failure or HL7ContentError("MSH", None, "the message cannot be read", code=100)
            return await self.reject(institution, raw, error, header, "AE", _reason_label(error), key)
        return await self._process(institution, raw, decoded, header, received, key)

    async def _process(
        self,
        institution: str,
        raw: bytes,
        decoded: Decoded,
        header: Header,
        received: dt.datetime,
        key: LedgerKey | None,
    ) -> Answer:
        try:
            mapped = map_message(decoded, institution, received)
        except UnsupportedMessageError as error:
            return await self.reject(institution, raw, error, header, "AR", "unsupported")
        except HL7ContentError as error:
            return await self.reject(institution, raw, error, header, "AE", _reason_label(error), key)
        published = 0
        try:
            results = await asyncio.wait_for(
                self._batcher(institution).publish(mapped.events),
                timeout=self.gateway.publish_timeout_seconds + 10,
            )
            failed = [r for r in results if isinstance(r, DeliveryFailedError)]
            if failed:
                raise failed[0]
            published = len(results)
            for kind, _record in mapped.events:
                self.metrics.gateway.events.labels(GATEWAY, institution, kind).inc()
        except RecordValidationError as error:
            content = HL7ContentError(
                "MSH",
                None,
                f"the mapped {error.field or 'record'} is not valid: {error}",
                code=DATA_TYPE_ERROR,
            )
            return await self.reject(institution, raw, content, header, "AE", "validation", key)
        except (DeliveryFailedError, TimeoutError) as error:
            reason = "Kafka did not confirm in time" if isinstance(error, TimeoutError) else str(error)
            log.warning("%s MSH-10 %s not published (%s): AR", institution, header.control_id, reason)
            ack = self._ack(header, "AR", [_gateway_error(f"not processed now ({reason}); send again")])
            return Answer("AR", ack, "unavailable", published)
        except Exception as error:
            log.exception("%s MSH-10 %s: publishing failed", institution, header.control_id)
            ack = self._ack(
                header, "AR", [_gateway_error(f"not processed now ({type(error).__name__}); send again")]
            )
            return Answer("AR", ack, "unavailable", published)
        ack = self._ack(header, "AA")
        if key is not None:
            await self._keep(key, "AA", ack, raw)
        return Answer("AA", ack, "accepted", published)

    async def handle_oversized(self, institution: str, event: Oversized) -> Answer:
        started = time.perf_counter()
        self.metrics.gateway.received.labels(GATEWAY, institution).inc()
        self.metrics.frames_oversized.labels(institution).inc()
        limit = self.gateway.mllp_max_frame_bytes
        error = _gateway_error(
            f"frame of {event.size} bytes or more is over the maximum of {limit} bytes; not processed"
        )
        header = _header_of(event.head)
        raw = event.head
        answer = await self.reject(institution, raw, error, header, "AR", "oversized")
        return self._count(institution, answer, started)

    async def handle_truncated(self, institution: str, event: Truncated, answer: bool) -> Answer:
        started = time.perf_counter()
        self.metrics.gateway.received.labels(GATEWAY, institution).inc()
        self.metrics.frames_truncated.labels(institution).inc()
        error = _gateway_error("frame truncated: a start block or the end of the connection before 0x1C 0x0D")
        result = await self.reject(
            institution, event.payload, error, _header_of(event.payload), "AR", "truncated"
        )
        return self._count(institution, result, started) if answer else result


# --- TLS ----------------------------------------------------------------------------------------------------


def make_server_ssl_context(gateway: GatewaySettings) -> ssl.SSLContext | None:
    """None without a certificate; TLS with one; mutual TLS (client certificate required) with a client CA."""
    return server_ssl_context(
        gateway.mllp_tls_cert_file, gateway.mllp_tls_key_file, gateway.mllp_tls_client_ca_file
    )


# --- the server ---------------------------------------------------------------------------------------------


class _Plain:
    """A plain TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(65_536)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class _TLS:
    """TLS over the connection's own byte stream (ssl.MemoryBIO): the handshake's outcome is ours to see
    and count (a refused client certificate included), and no byte is read before TLS owns the stream."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(65_536)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed during the TLS handshake") from None
                continue
            except ssl.SSLError:
                with contextlib.suppress(Exception):
                    await self._flush()  # the alert, so the client knows why
                raise
            await self._flush()
            return

    def peer_certificate(self) -> x509.Certificate | None:
        return peer_certificate(self._tls)

    async def read(self) -> bytes:
        while True:
            try:
                data = self._tls.read(65_536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            await self._flush()
            return data

    async def send(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()


@dataclass(eq=False)
class _Connection:
    institution: str
    writer: asyncio.StreamWriter
    task: asyncio.Task[Any] | None
    busy: bool = False
    closing: bool = False


@dataclass
class MLLPServer:
    """The listeners (one per institution) and their connections."""

    gateway: GatewaySettings
    handler: MessageHandler
    metrics: MLLPMetrics
    ssl_context: ssl.SSLContext | None = None
    servers: dict[str, asyncio.Server] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _connections: set[Any] = field(default_factory=set)
    _stopping: bool = False

    @property
    def mutual_tls(self) -> bool:
        return is_mutual(self.ssl_context)

    async def start(self) -> None:
        for institution, port in self.gateway.mllp_listeners.items():

            async def serve(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, institution: str = institution
            ) -> None:
                await self._serve(institution, reader, writer)

            server = await asyncio.start_server(
                serve, self.gateway.host, port, limit=1 << 16, reuse_address=True
            )
            self.servers[institution] = server
            self.ports[institution] = int(server.sockets[0].getsockname()[1])
            log.info(
                "MLLP listener for %s on %s:%d (%s)",
                institution,
                self.gateway.host,
                self.ports[institution],
                "mutual TLS" if self.mutual_tls else "TLS" if self.ssl_context else "plain TCP",
            )

    def _refuse(self, institution: str, writer: asyncio.StreamWriter, reason: str) -> None:
        self.metrics.connections_refused.labels(institution, reason).inc()
        writer.close()

    async def _serve(
        self, institution: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._stopping:
            self._refuse(institution, writer, "stopping")
            return
        if len(self._connections) >= self.gateway.mllp_max_connections:
            log.warning("%s: refused a connection, %d open", institution, len(self._connections))
            self._refuse(institution, writer, "max_connections")
            return
        conn = _Connection(institution, writer, asyncio.current_task())
        self._connections.add(conn)
        try:
            stream: _Plain | _TLS = _Plain(reader, writer)
            if self.ssl_context is not None:
                tls = _TLS(reader, writer, self.ssl_context)
                if not await self._handshake(institution, tls):
                    return
                stream = tls
            self.metrics.connections.labels(institution).inc()
            self.metrics.connections_open.labels(institution).inc()
            try:
                await self._read_loop(conn, stream)
            finally:
                self.metrics.connections_open.labels(institution).dec()
        except asyncio.CancelledError:
            pass
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.info("%s: connection ended (%s)", institution, exc)
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _handshake(self, institution: str, tls: _TLS) -> bool:
        try:
            await asyncio.wait_for(tls.handshake(), timeout=min(30.0, self.gateway.mllp_idle_timeout_seconds))
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log.warning("%s: TLS handshake refused (%s)", institution, exc or type(exc).__name__)
            self.metrics.connections_refused.labels(institution, "tls").inc()
            return False
        if self.mutual_tls:
            certificate = tls.peer_certificate()
            cn = common_name(certificate) if certificate else ""
            mapped = certificate_institution(cn, self.gateway.mllp_tls_client_institutions)
            if mapped != institution:
                log.warning(
                    "%s: refused a client certificate of CN %r (institution %r)", institution, cn, mapped
                )
                self.metrics.connections_refused.labels(institution, "client_certificate").inc()
                return False
        return True

    async def _read_loop(self, conn: _Connection, stream: _Plain | _TLS) -> None:
        institution = conn.institution
        framer = MLLPFramer(self.gateway.mllp_max_frame_bytes)
        try:
            while not conn.closing:
                try:
                    data = await asyncio.wait_for(stream.read(), self.gateway.mllp_idle_timeout_seconds)
                except TimeoutError:
                    self.metrics.idle_closed.labels(institution).inc()
                    log.info("%s: idle connection closed", institution)
                    return
                if not data:
                    return
                events = framer.feed(data)
                if any(not isinstance(e, Skipped) for e in events):
                    conn.busy = True
                try:
                    for event in events:
                        answer = await self._on_event(institution, event)
                        if answer is not None:
                            await stream.send(wrap(answer.ack))
                finally:
                    conn.busy = False
        finally:
            tail = framer.close()
            # no one to answer: the partial frame is dead-lettered (not if the gateway is stopping and cut
            # it, since the sender will resend it)
            if isinstance(tail, Truncated) and tail.payload and not self._stopping:
                await self.handler.handle_truncated(institution, tail, answer=False)

    async def _on_event(self, institution: str, event: FramerEvent) -> Answer | None:
        if isinstance(event, Skipped):
            self.metrics.garbage_bytes.labels(institution).inc(event.count)
            return None
        if isinstance(event, Frame):
            return await self.handler.handle_frame(institution, event.payload)
        if isinstance(event, Oversized):
            return await self.handler.handle_oversized(institution, event)
        return await self.handler.handle_truncated(institution, event, answer=True)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let the messages in flight be answered, close every connection."""
        self._stopping = True
        for server in self.servers.values():
            server.close()
        for conn in list(self._connections):
            conn.closing = True
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [conn.task for conn in self._connections if conn.task is not None]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5)
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)


# --- the HTTP side ------------------------------------------------------------------------------------------


def make_http_app(metrics: MLLPMetrics, ready: Callable[[], str | None]) -> Any:
    """/metrics (Prometheus), /healthz (the process answers), /readyz (Kafka and the registry answer)."""
    from fastapi import FastAPI, Response
    from fastapi.responses import JSONResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="clinhub MLLP gateway", docs_url=None, redoc_url=None, openapi_url=None)
    cache: dict[str, Any] = {"at": 0.0, "problem": None}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if time.monotonic() - cache["at"] > 2.0:
            cache["problem"], cache["at"] = ready(), time.monotonic()
        problem = cache["problem"]
        if problem:
            return JSONResponse({"status": "not ready", "problem": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def make_http_server(app: Any, sock: socket.socket) -> Any:
    """A uvicorn server on a bound socket that leaves signal handling to the gateway."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
