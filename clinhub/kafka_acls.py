"""What each principal may do on Kafka: exactly what its work needs, nothing by default.

Pure: `grants` and `institution_grants` list the ACLs of a deployment (a topic prefix and a stream app
id); `clinhub/infra/acls.py` applies them as the admin. READ and WRITE imply DESCRIBE in Kafka's
authorizer, so only they are listed. Every stage's Faust app creates and owns its internal topics
(`<app id>-...`: table changelogs, the assignor's leader topic) and reads in its consumer group.
"""

from __future__ import annotations

from collections.abc import Iterable

from console.runtime.alert_source import notify_group
from core import principals
from core.contract import KINDS, TopicNames
from core.principals import Grant, Operation
from core.settings import StreamSettings
from streams.runtime.app import app_id_for, clinical_sources
from streams.runtime.store_consumer import store_group


def _topics(
    principal: str, names: Iterable[str], *operations: Operation, prefixed: bool = False
) -> list[Grant]:
    return [Grant(principal, "topic", name, op, prefixed) for name in names for op in operations]


def _faust_app(principal: str, app_id: str) -> list[Grant]:
    """A Faust app's own group and internal topics (created by Faust at start-up)."""
    internal = f"{app_id}-"
    return [
        Grant(principal, "group", app_id, "READ"),
        *_topics(principal, [internal], "CREATE", "READ", "WRITE", "DESCRIBE_CONFIGS", prefixed=True),
    ]


def _normaliser(principal: str, topics: TopicNames) -> list[Grant]:
    return [
        *_topics(principal, [f"{topics.prefix}raw."], "READ", prefixed=True),
        *_topics(principal, [f"{topics.prefix}norm."], "WRITE", prefixed=True),
        *_topics(principal, [topics.deadletter_topic], "WRITE"),
    ]


def _clinical(principal: str, topics: TopicNames) -> list[Grant]:
    return [
        *_topics(principal, clinical_sources(topics), "READ"),
        *_topics(
            principal,
            [
                topics.alerts_topic,
                topics.escalations_topic,
                topics.alert_states_topic,
                topics.deadletter_topic,
            ],
            "WRITE",
        ),
    ]


def _store(principal: str, topics: TopicNames, app_id: str) -> list[Grant]:
    return [
        *_topics(principal, topics.stored(), "READ"),
        Grant(principal, "group", store_group(app_id), "READ"),
    ]


def grants(topics: TopicNames, stream: StreamSettings) -> list[Grant]:
    """Every stage principal's ACLs for one deployment (its topic prefix and app id)."""
    app_id = stream.app_id
    normaliser, clinical, store = principals.NORMALISER, principals.CLINICAL, principals.STORE
    one_stage = [
        *_normaliser(normaliser, topics),
        *_faust_app(normaliser, app_id_for(stream, [normaliser])),
        *_clinical(clinical, topics),
        *_faust_app(clinical, app_id_for(stream, [clinical])),
        *_store(store, topics, app_id),
        *_faust_app(store, app_id_for(stream, [store])),
    ]
    worker = principals.WORKER
    every_stage = [
        *_normaliser(worker, topics),
        *_clinical(worker, topics),
        *_store(worker, topics, app_id),
        *_faust_app(worker, app_id),  # the app id of all stages together
    ]
    gateways = principals.GATEWAYS
    console = principals.CONSOLE
    return [
        *one_stage,
        *every_stage,
        *_topics(gateways, [f"{topics.prefix}raw."], "WRITE", prefixed=True),
        *_topics(gateways, [topics.deadletter_topic], "WRITE"),
        Grant(gateways, "transactional_id", principals.FHIR_TRANSACTIONAL_PREFIX, "WRITE", prefixed=True),
        *_topics(console, [topics.acks_topic], "WRITE"),
        *_topics(console, [topics.alerts_topic, topics.escalations_topic], "READ"),
        Grant(console, "group", notify_group(app_id), "READ"),
    ]


def institution_grants(topics: TopicNames, institution: str) -> list[Grant]:
    """An institution writes its own raw topics and nothing else; it reads nothing."""
    own = topics.raw(institution, KINDS[0]).rsplit(".", 1)[0] + "."  # <prefix>raw.<institution>.
    return _topics(institution, [own], "WRITE", prefixed=True)
