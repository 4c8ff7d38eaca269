"""Topic names of the hub, and their creation with explicit partitions and replication."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("lab", "vitals", "encounter", "medication", "diagnosis")


@dataclass(frozen=True)
class TopicNames:
    """All topic names, under an optional prefix (tests give each run its own)."""

    prefix: str = ""
    alerts: str = "alerts.critical"
    escalations: str = "alerts.escalation"
    acks: str = "alerts.ack"
    identity: str = "norm.identity"
    deadletter: str = "deadletter"

    def raw(self, institution: str, kind: str) -> str:
        """`raw.<institution>.<kind>`: one prefix per institution, so ACLs can bind its principal to it."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; one of {', '.join(KINDS)}")
        return f"{self.prefix}raw.{institution}.{kind}"

    def raw_pattern(self) -> re.Pattern[str]:
        """Every `raw.<institution>.<kind>` topic under this prefix, whatever the institution."""
        kinds = "|".join(map(re.escape, KINDS))
        return re.compile(rf"^{re.escape(self.prefix)}raw\.[A-Za-z0-9_-]+\.({kinds})$")

    def norm(self, kind: str) -> str:
        """`norm.<kind>`, keyed by regional patient id so that one patient's events stay in order."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; one of {', '.join(KINDS)}")
        return f"{self.prefix}norm.{kind}"

    @property
    def escalations_topic(self) -> str:
        return f"{self.prefix}{self.escalations}"

    @property
    def acks_topic(self) -> str:
        return f"{self.prefix}{self.acks}"

    @property
    def identity_topic(self) -> str:
        return f"{self.prefix}{self.identity}"

    @property
    def alerts_topic(self) -> str:
        return f"{self.prefix}{self.alerts}"

    @property
    def deadletter_topic(self) -> str:
        return f"{self.prefix}{self.deadletter}"

    def all_for(self, institutions: Iterable[str], kinds: Iterable[str] = KINDS) -> list[str]:
        kinds = list(kinds)
        return (
            [self.raw(inst, kind) for inst in institutions for kind in kinds]
            + [self.norm(kind) for kind in kinds]
            + [
                self.alerts_topic,
                self.escalations_topic,
                self.acks_topic,
                self.identity_topic,
                self.deadletter_topic,
            ]
        )


def create_topics(
    admin_config: Mapping[str, Any], names: Iterable[str], partitions: int, replication: int
) -> list[str]:
    """Create missing topics; returns the ones created. Existing topics are left as they are."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(dict(admin_config))
    existing = set(admin.list_topics(timeout=15).topics)
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=replication) for n in wanted],
        operation_timeout=30,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                continue
            raise
    return created


def discover_raw_topics(admin_config: Mapping[str, Any], names: TopicNames) -> list[str]:
    """Raw topics on the cluster that match the raw pattern.

    Faust's own pattern subscription does not work with its aiokafka driver (the driver says so in a
    comment, and a pattern topic replaced every other subscription of the app when tried), so the
    worker resolves the pattern itself, at start-up and then periodically (`subscribe_more`).
    """
    from confluent_kafka.admin import AdminClient

    pattern = names.raw_pattern()
    listed = AdminClient(dict(admin_config)).list_topics(timeout=15).topics
    return sorted(name for name in listed if pattern.match(name))


def subscribe_more(app: Any, known: str, names: Sequence[str], settle_seconds: float) -> int:
    """Add `names` to every subscribed channel that reads topic `known`; returns how many channels.

    The conductor (`app.topics`) holds the channels agents iterate; it resubscribes the consumer when
    told its subscriptions changed, after waiting `settle_seconds` (Faust's default is 45 s) so that
    several changes make one rebalance. The new topics' partitions then reach the same agent.
    """
    conductor = app.topics
    changed = 0
    for channel in list(conductor):
        if known in channel.topics:
            channel.topics = [*channel.topics, *(n for n in names if n not in channel.topics)]
            changed += 1
    if changed:
        conductor._resubscribe_sleep_lock_seconds = settle_seconds
        conductor._flag_changes()  # what Conductor.add/discard call; there is no public "topics changed"
    return changed
