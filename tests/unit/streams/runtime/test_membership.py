"""Static group membership: the worker's instance id, its claim on the host, and leaving on a clean stop."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.exceptions import ConfigurationError
from core.settings import StreamSettings
from streams.runtime.membership import (
    FENCED_INSTANCE_ID,
    INSTANCE_ID,
    LeaveStaticGroup,
    claim_instance_id,
    group_instance_id,
    leave_and_close,
    leave_error,
    leave_on_close,
)
from streams.runtime.store_consumer import consumer_config


def unique_id() -> str:
    return f"test.{uuid.uuid4().hex}"


# -- the id ---------------------------------------------------------------------------------------------


def test_the_derived_id_is_the_same_at_every_restart_of_one_worker_slot(tmp_path: Path) -> None:
    stream = StreamSettings(data_dir=tmp_path / "faust")
    first = group_instance_id(stream, "clinhub-streams-store", host="node-1")
    assert first == group_instance_id(
        StreamSettings(data_dir=tmp_path / "faust"), "clinhub-streams-store", "node-1"
    )
    assert first.startswith("node-1.clinhub-streams-store.")
    assert INSTANCE_ID.match(first)


def test_two_workers_differ_by_host_stages_or_data_dir(tmp_path: Path) -> None:
    stream = StreamSettings(data_dir=tmp_path / "a")
    ids = {
        group_instance_id(stream, "clinhub-streams", "node-1"),
        group_instance_id(stream, "clinhub-streams", "node-2"),
        group_instance_id(stream, "clinhub-streams-store", "node-1"),
        group_instance_id(StreamSettings(data_dir=tmp_path / "b"), "clinhub-streams", "node-1"),
    }
    assert len(ids) == 4


def test_a_host_name_kafka_would_refuse_is_made_legal(tmp_path: Path) -> None:
    made = group_instance_id(StreamSettings(data_dir=tmp_path), "app", host="ward 7/ü" + "x" * 300)
    assert INSTANCE_ID.match(made), made


def test_a_set_id_is_used_as_it_is_and_checked_as_kafka_checks_it(tmp_path: Path) -> None:
    assert group_instance_id(StreamSettings(instance_id="store-2", data_dir=tmp_path), "app") == "store-2"
    with pytest.raises(ValidationError):
        StreamSettings(instance_id="store 2")


def test_the_store_consumer_is_a_static_member_when_given_an_id() -> None:
    static = consumer_config({"bootstrap.servers": "b:9092"}, "app-sink", 1.0, 30.0, instance_id="node-1.x")
    assert static["group.instance.id"] == "node-1.x"
    assert "group.instance.id" not in consumer_config({}, "app-sink", 1.0, 30.0)


# -- the claim -------------------------------------------------------------------------------------------


def test_an_id_a_live_process_holds_is_refused(tmp_path: Path) -> None:
    instance = unique_id()
    held = os.open(tmp_path / f"clinhub-group-instance-{instance}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another worker's (flock is per open file)
    try:
        with pytest.raises(ConfigurationError, match="CLINHUB_STREAM_INSTANCE_ID") as refused:
            claim_instance_id(instance, tmp_path)
        assert instance in str(refused.value)
    finally:
        os.close(held)
    claim_instance_id(instance, tmp_path)  # that worker gone: free


def test_claiming_again_in_the_same_process_is_allowed(tmp_path: Path) -> None:
    instance = unique_id()
    claim_instance_id(instance, tmp_path)
    claim_instance_id(instance, tmp_path)  # the CLI, then the consumers of the same worker


# -- leaving: librdkafka ------------------------------------------------------------------------------


class FakeConfluentConsumer:
    def __init__(self, revoked_after_polls: int = 2, refuse_unsubscribe: bool = False) -> None:
        self.calls: list[str] = []
        self.polls_left = revoked_after_polls
        self.refuse_unsubscribe = refuse_unsubscribe
        self.unsubscribed = False

    def unsubscribe(self) -> None:
        self.calls.append("unsubscribe")
        if self.refuse_unsubscribe:
            raise RuntimeError("consumer closed")
        self.unsubscribed = True

    def assignment(self) -> list[str]:
        return [] if self.unsubscribed and self.polls_left <= 0 else ["norm.lab[0]"]

    def poll(self, timeout: float) -> None:
        self.calls.append("poll")
        self.polls_left -= 1

    def close(self) -> None:
        self.calls.append("close")


def test_a_librdkafka_consumer_unsubscribes_and_waits_for_the_revocation_before_it_closes() -> None:
    consumer = FakeConfluentConsumer(revoked_after_polls=2)
    leave_and_close(consumer)
    assert consumer.calls == ["unsubscribe", "poll", "poll", "close"]


def test_a_librdkafka_consumer_is_closed_even_when_it_cannot_unsubscribe() -> None:
    consumer = FakeConfluentConsumer(refuse_unsubscribe=True)
    with pytest.raises(RuntimeError):
        leave_and_close(consumer)
    assert consumer.calls == ["unsubscribe", "close"]


# -- leaving: aiokafka, LeaveGroup v3 ------------------------------------------------------------------


def test_the_leave_request_is_leave_group_v3_naming_the_member_and_its_instance() -> None:
    request = LeaveStaticGroup("app", "member-1", "node-1.app.abc").prepare({13: (0, 5)})
    assert request.API_VERSION == 3
    # group, then an array of one (member id, instance id), Kafka's non-flexible encoding
    assert request.encode() == b"\x00\x03app\x00\x00\x00\x01\x00\x08member-1\x00\x0enode-1.app.abc"


class FakeResponse:
    def __init__(self, error_code: int, member_code: int) -> None:
        self.error_code = error_code
        self.members = [("member-1", "node-1", member_code)]


def test_a_leave_answer_reports_the_request_error_else_the_members() -> None:
    assert leave_error(FakeResponse(0, 0)) == 0
    assert leave_error(FakeResponse(0, FENCED_INSTANCE_ID)) == FENCED_INSTANCE_ID
    assert leave_error(FakeResponse(16, 0)) == 16


class FakeCoordinator:
    group_id = "app"

    def __init__(self, instance_id: str | None, member_code: int = 0) -> None:
        self._group_instance_id = instance_id
        self.generation = 4
        self.member_id = "member-1"
        self.member_code = member_code
        self.sent: list[Any] = []

    async def _maybe_leave_group(self) -> None:
        self.sent.append("aiokafka's own leave")
        self.reset_generation()

    async def _send_req(self, request: Any) -> FakeResponse:
        self.sent.append(request.prepare({13: (0, 5)}))
        return FakeResponse(0, self.member_code)

    def reset_generation(self) -> None:
        self.generation = -1
        self.member_id = ""


def test_a_static_member_leaves_its_group_when_its_coordinator_closes() -> None:
    coordinator = FakeCoordinator("node-1.app.abc")
    leave_on_close(coordinator)
    asyncio.run(coordinator._maybe_leave_group())  # as GroupCoordinator.close() calls it
    [request] = coordinator.sent
    assert (request.group_id, request.members) == ("app", [("member-1", "node-1.app.abc")])
    assert coordinator.generation == -1, "the generation is reset, as aiokafka's own leave does"


def test_a_member_fenced_by_a_newer_one_is_told_and_removes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    coordinator = FakeCoordinator("node-1.app.abc", member_code=FENCED_INSTANCE_ID)
    leave_on_close(coordinator)
    with caplog.at_level(logging.WARNING, "clinhub.streams.membership"):
        asyncio.run(coordinator._maybe_leave_group())
    assert "another worker took group instance id node-1.app.abc" in caplog.text


def test_a_member_that_never_joined_sends_nothing() -> None:
    coordinator = FakeCoordinator("node-1.app.abc")
    coordinator.generation = -1
    leave_on_close(coordinator)
    asyncio.run(coordinator._maybe_leave_group())
    assert coordinator.sent == []


def test_a_dynamic_member_keeps_aiokafkas_own_leave() -> None:
    coordinator = FakeCoordinator(None)
    leave_on_close(coordinator)
    asyncio.run(coordinator._maybe_leave_group())
    assert coordinator.sent == ["aiokafka's own leave"]


# -- the Faust consumer --------------------------------------------------------------------------------


def test_the_faust_consumer_is_a_static_member_that_claims_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faust

    from streams.runtime import membership
    from streams.runtime.stalls import contiguous_offsets_app
    from streams.runtime.startup import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the claim's lock file
    instance = unique_id()
    app = contiguous_offsets_app(faust.App)(
        "membership-test",
        broker="kafka://127.0.0.1:1",
        store="memory://",
        datadir=str(tmp_path),
        consumer_group_instance_id=instance,
    )
    thread = app.consumer._new_consumer_thread()

    async def create() -> Any:
        return thread._create_worker_consumer(app.transport)  # built, not connected

    consumer = asyncio.run(create())
    assert consumer._group_instance_id == instance
    assert consumer._isolation_level == "read_committed"
    # not Faust's 1.5 s long-poll, which partitions resumed after the recovery waited for
    assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS < 1500
    # a fetch is answered after the wait unless a batch is there: not one fetch per arriving event
    assert consumer._fetch_min_bytes == FETCH_MIN_BYTES > 1
    assert instance in membership._claimed
    assert (tmp_path / f"clinhub-group-instance-{instance}.lock").exists()


def test_a_store_consumer_fenced_by_a_live_worker_under_its_id_stops_loudly() -> None:
    """librdkafka makes it a fatal error: the consumer is unusable. One fencing (its own rejoin after an
    outage) is survived by a new consumer; a live worker elsewhere under the same id fences every new
    one, so after a few the store stage stops with the error instead of polling (and logging) for ever;
    nothing of the batches the errors came with is marked stored."""
    from confluent_kafka import KafkaError, KafkaException

    from streams.runtime.store_consumer import MOST_REBUILDS, StoreConsumer
    from tests.unit.streams.runtime.test_store_consumer import STORE_CONFIG, FakeConsumer, FakeMessage

    fenced = KafkaError(KafkaError.FENCED_INSTANCE_ID, "fenced by another consumer", fatal=True)
    made: list[FakeConsumer] = []

    def fenced_each_time(_config: Any) -> FakeConsumer:
        made.append(
            FakeConsumer([[FakeMessage("norm.lab", 1, 7), FakeMessage("norm.lab", 0, -1, error=fenced)]])
        )
        return made[-1]

    async def handle(_messages: Any) -> None:
        raise AssertionError("not stored")

    store = StoreConsumer(STORE_CONFIG, ["norm.lab"], handle, 500, 0.01, consumer_factory=fenced_each_time)
    with pytest.raises(KafkaException) as stopped:
        asyncio.run(asyncio.wait_for(store.run(), 5))
    assert stopped.value.args[0].code() == KafkaError.FENCED_INSTANCE_ID
    assert len(made) == MOST_REBUILDS + 1
    # a dead consumer can neither commit nor leave: closed only, and nothing marked stored
    assert all([name for name, _ in consumer.calls] == ["subscribe", "close"] for consumer in made)
