"""Static group membership (KIP-345): a restarted worker takes its partitions back at once, and a
clean stop hands them over at once.

A dynamic member that crashes keeps its partitions until its session expires
(`CLINHUB_STREAM_SESSION_TIMEOUT_SECONDS`); the worker started in its place is a new member, and the
group waits for the dead one before it rebalances. A static member names itself with a
`group.instance.id` that survives restarts: the restarted worker joins under the same id, the
coordinator replaces the dead member with it and hands it the same partitions, with no wait.

Both consumers of a worker are static members under one id: Faust's aiokafka consumer
(`group_instance_id`, aiokafka 0.14: JoinGroup v5, SyncGroup v3) in the Faust group and the store
stage's librdkafka consumer (`group.instance.id`) in the store group. The id must belong to one live
worker only: two live members under one id fence each other out of the group in turn. The derived
id (`group_instance_id`) names the host, the worker's stages (its app id) and its data directory,
which a live worker already holds alone (RocksDB locks it); `claim_instance_id` refuses a second
live worker on the host under the same id.

Static members do not leave the group when they close (neither aiokafka nor librdkafka sends a
LeaveGroup for them, as KIP-345 says), so a clean stop would leave the partitions idle for the
session timeout. So a worker that stops cleanly leaves explicitly:

- librdkafka leaves for a static member when it unsubscribes (only its close skips the LeaveGroup):
  `leave_and_close` unsubscribes, waits for the revocation (which commits the offsets marked stored),
  then closes;
- aiokafka 0.14 knows LeaveGroup v0-v1 only, which name no instance: `leave_on_close` makes the
  consumer's coordinator send LeaveGroup v3 (KIP-345, the request of the Java admin's
  removeMembersFromConsumerGroup) with its member id and instance id once it has stopped
  heartbeating and Faust has committed. Naming the member id too means a worker that was fenced by
  a newer one under the same id removes nothing (FENCED_INSTANCE_ID for that member).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Int16, Int32, Schema, String

from core.exceptions import ConfigurationError
from core.settings import StreamSettings

log = logging.getLogger("clinhub.streams.membership")

# Kafka's rule for a group.instance.id (as for topic names): these characters, at most 249 of them
INSTANCE_ID = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
INSTANCE_ID_SETTING = "CLINHUB_STREAM_INSTANCE_ID"
FENCED_INSTANCE_ID = 82  # Kafka error code: another member holds this instance id now


def _legal(text: str, most: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:most] or "_"


def group_instance_id(stream: StreamSettings, app_id: str, host: str | None = None) -> str:
    """The worker's static member id: `CLINHUB_STREAM_INSTANCE_ID`, else `<host>.<app id>.<digest of
    the resolved data dir>` (the app id names the stages, `app.app_id_for`). The same worker slot
    gets the same id at every restart; two live workers on one host differ in their data dirs."""
    if stream.instance_id is not None:
        return stream.instance_id
    digest = hashlib.sha256(str(stream.data_dir.resolve()).encode()).hexdigest()[:12]
    return f"{_legal(host or socket.gethostname(), 100)}.{_legal(app_id, 120)}.{digest}"


_claimed: dict[str, int] = {}  # instance id -> descriptor of its lock, held for the process's life


def claim_instance_id(instance_id: str, lock_dir: Path | None = None) -> None:
    """Hold `instance_id` for this process; ConfigurationError when a live process on this host holds
    it. A lock file in the temporary directory (readable by all, so other users' workers count too);
    the kernel drops the lock when the process ends, however it ends. Claiming again is a no-op."""
    if instance_id in _claimed:
        return
    path = (lock_dir or Path(tempfile.gettempdir())) / f"clinhub-group-instance-{instance_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except PermissionError:
        log.warning("cannot open %s to check that group instance id %s is free", path, instance_id)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigurationError(
            INSTANCE_ID_SETTING,
            f"group instance id {instance_id} is in use by another live worker on this host; give each "
            "worker its own CLINHUB_STREAM_DATA_DIR (the id is derived from it) or its own "
            f"{INSTANCE_ID_SETTING}",
        ) from None
    _claimed[instance_id] = fd


# -- librdkafka --------------------------------------------------------------------------------------


def leave_and_close(consumer: Any, revoke_timeout: float = 10.0) -> None:
    """Close a librdkafka consumer so that its partitions move at once, static member or not.

    Unsubscribing revokes the partitions (librdkafka commits the offsets marked stored) and sends the
    LeaveGroup that close() alone skips for a static member; polling serves the revocation. Anything
    polled meanwhile is dropped unmarked: the partitions' next owner reads it from the commit."""
    try:
        consumer.unsubscribe()
        deadline = time.monotonic() + revoke_timeout
        while consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.1)
    finally:
        consumer.close()


# -- aiokafka: LeaveGroup v3 (KIP-345), which aiokafka 0.14 does not have ------------------------------


class LeaveGroupResponseV3(Response):
    API_KEY = 13
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        (
            "members",
            Array(
                ("member_id", String("utf-8")),
                ("group_instance_id", String("utf-8")),
                ("error_code", Int16),
            ),
        ),
    )


class LeaveGroupRequestV3(RequestStruct):
    API_KEY = 13
    API_VERSION = 3
    RESPONSE_TYPE = LeaveGroupResponseV3
    SCHEMA = Schema(
        ("group_id", String("utf-8")),
        ("members", Array(("member_id", String("utf-8")), ("group_instance_id", String("utf-8")))),
    )


class LeaveStaticGroup(Request[LeaveGroupRequestV3]):
    """One static member leaving: its member id (the generation it holds) and its instance id."""

    API_KEY = 13

    def __init__(self, group: str, member_id: str, instance_id: str) -> None:
        self.group = group
        self.member_id = member_id
        self.instance_id = instance_id

    def build(self, request_struct_class: type[LeaveGroupRequestV3]) -> LeaveGroupRequestV3:
        return request_struct_class(self.group, [(self.member_id, self.instance_id)])


def leave_error(response: Any) -> int:
    """The Kafka error code of a LeaveGroup v3 answer: the request's, else its one member's."""
    if response.error_code:
        return int(response.error_code)
    return next((int(code) for _member, _instance, code in response.members if code), 0)


def leave_on_close(coordinator: Any) -> None:
    """Make an aiokafka GroupCoordinator of a static member leave its group when it closes.

    Its close() stops the coordination and heartbeat tasks, then calls `_maybe_leave_group`, which
    sends nothing for a static member (aiokafka 0.14); this replaces it, on this coordinator only,
    with a LeaveGroup v3 naming the member. Best effort, as aiokafka's own leave: a failure is logged
    and the group falls back to the session timeout."""
    instance_id = coordinator._group_instance_id
    if instance_id is None:
        return  # dynamic: aiokafka leaves by itself

    async def leave() -> None:
        if coordinator.generation > 0 and coordinator.member_id:
            request = LeaveStaticGroup(coordinator.group_id, coordinator.member_id, instance_id)
            try:
                error = leave_error(await coordinator._send_req(request))
            except Exception as exc:  # noqa: BLE001 - closing; the session timeout moves them instead
                log.warning("group %s: leaving as %s failed: %r", coordinator.group_id, instance_id, exc)
            else:
                if error == FENCED_INSTANCE_ID:
                    log.warning(
                        "group %s: another worker took group instance id %s",
                        coordinator.group_id,
                        instance_id,
                    )
                elif error:
                    log.warning("group %s: leaving as %s: error %d", coordinator.group_id, instance_id, error)
                else:
                    log.info("group %s: left as static member %s", coordinator.group_id, instance_id)
        coordinator.reset_generation()

    coordinator._maybe_leave_group = leave
