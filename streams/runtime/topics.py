"""The topics on the cluster: creating them with explicit partitions, replication and the settings the
contract asks of each (`core.contract.topic_config`: alerts.state is compacted), finding raw ones.

Their names are built and parsed by `core.contract.TopicNames`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from core.contract import TopicNames, topic_config
from core.exceptions import KafkaAuthorizationError
from core.kafka_errors import ClientErrors, refusal


def create_topics(
    admin_config: Mapping[str, Any], names: Iterable[str], partitions: int, replication: int
) -> list[str]:
    """Create missing topics, each with the settings the contract asks of it (`topic_config`); returns
    the ones created. Existing topics are left as they are."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(dict(admin_config))
    existing = set(admin.list_topics(timeout=15).topics)
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [
            NewTopic(n, num_partitions=partitions, replication_factor=replication, config=topic_config(n))
            for n in wanted
        ],
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

    return raw_topics_in(AdminClient(dict(admin_config)).list_topics(timeout=15).topics, names)


def raw_topics_in(listed: Iterable[str], names: TopicNames) -> list[str]:
    """The raw topics among these topic names (those `check_access` found, say), sorted."""
    pattern = names.raw_pattern()
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


def check_access(
    client_config: Mapping[str, Any], principal: str | None, topics: Iterable[str], timeout: float = 10.0
) -> set[str]:
    """Fail within seconds, typed, when the broker refuses this principal: its credentials (librdkafka
    tells only its error callback, then retries for ever) or a topic it may not even describe.
    Returns the topics the principal may see (`raw_topics_in` finds the raw ones without a second
    connection: each costs a TLS handshake and a SCRAM exchange at every worker start).

    A worker that started anyway would wait silently: nothing consumed, nothing logged.
    """
    from confluent_kafka.admin import AdminClient

    errors = ClientErrors(principal)
    config: dict[str, Any] = {**client_config, "error_cb": errors}
    admin = AdminClient(config)
    listed = _listed_topics(admin, errors, timeout)
    for topic in topics:
        if topic in listed:
            continue
        found = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        error = found.error if found is not None else None
        refused = refusal(error, principal, topic) if error is not None else None
        if refused is not None:
            raise refused
        raise KafkaAuthorizationError(principal, "the topic does not exist or may not be described", topic)
    return set(listed)


def _listed_topics(admin: Any, errors: ClientErrors, timeout: float) -> Any:
    """The cluster's topics as the principal may see them; its refusal when `errors` counts one
    meanwhile, KafkaException when the broker did not answer within `timeout`."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin.list_topics(timeout=1.0).topics
        except KafkaException:
            admin.poll(0.5)  # serves error_cb: the refusal, if that is what it was
            errors.raise_if_refused()
            if time.monotonic() > deadline:
                raise


def authenticates(client_config: Mapping[str, Any], errors: ClientErrors, timeout: float = 5.0) -> bool:
    """Whether a new connection of the principal authenticates now: True when the broker lists topics
    for it (`errors.succeeded()` is told), False when it did not answer within `timeout` (an outage, or
    refusals that do not count yet: they reached `errors`). Raises the refusal once `errors` counts one.

    A running worker's connections were authenticated when they opened, and Kafka does not ask again,
    so deleted or changed credentials show only on a new connection: this one.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {**client_config, "error_cb": errors}
    try:
        _listed_topics(AdminClient(config), errors, timeout)
    except KafkaException:
        return False
    errors.succeeded()
    return True
