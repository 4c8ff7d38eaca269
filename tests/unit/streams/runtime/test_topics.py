"""Topic creation asks for the settings the contract gives each topic: alerts.state is compacted."""

from __future__ import annotations

from typing import Any

import pytest

from core.contract import TopicNames


class FakeFuture:
    def result(self) -> None:
        return None


class FakeAdmin:
    created: list[Any] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def list_topics(self, timeout: float) -> Any:
        class Listed:
            topics = {"t-deadletter": object()}

        return Listed()

    def create_topics(self, topics: list[Any], operation_timeout: float) -> dict[str, FakeFuture]:
        FakeAdmin.created.extend(topics)
        return {topic.topic: FakeFuture() for topic in topics}


def test_every_caller_gets_the_compacted_alert_state_topic_without_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import confluent_kafka.admin

    from streams.runtime.topics import create_topics

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", FakeAdmin)
    FakeAdmin.created = []
    names = TopicNames(prefix="t-")
    created = create_topics({}, names.all_for(["H001"]), 3, 1)
    assert "t-deadletter" not in created, "an existing topic is left as it is"
    by_name = {topic.topic: topic for topic in FakeAdmin.created}
    assert set(by_name) == set(created)
    assert by_name["t-alerts.state"].config == {"cleanup.policy": "compact"}
    assert all(topic.config == {} for name, topic in by_name.items() if name != "t-alerts.state")
    assert {(topic.num_partitions, topic.replication_factor) for topic in by_name.values()} == {(3, 1)}


def test_the_worker_finds_its_raw_topics_among_those_the_access_check_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One connection at start-up, not two: `check_access` returns what it listed."""
    import confluent_kafka.admin

    from streams.runtime.topics import check_access, raw_topics_in

    names = TopicNames(prefix="t.")
    listed = {"t.raw.H001.lab", "t.raw.H009.vitals", "t.norm.lab", "t.deadletter"}
    made: list[Any] = []

    class Admin:
        def __init__(self, config: dict[str, Any]) -> None:
            made.append(config)

        def list_topics(self, timeout: float) -> Any:
            class Listed:
                topics = dict.fromkeys(listed)

            return Listed()

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", Admin)
    seen = check_access({}, "worker", ["t.raw.H001.lab", "t.norm.lab"])
    assert seen == listed
    assert raw_topics_in(seen, names) == ["t.raw.H001.lab", "t.raw.H009.vitals"]
    assert len(made) == 1
