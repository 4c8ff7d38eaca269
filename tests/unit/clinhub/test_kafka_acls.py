"""Each principal's ACLs: what its work needs, nothing an institution or another stage could misuse."""

from __future__ import annotations

from pathlib import Path

from clinhub.kafka_acls import grants, institution_grants
from core import principals
from core.contract import TopicNames
from core.principals import Grant
from core.settings import StreamSettings

TOPICS = TopicNames(prefix="t1.")


def stream(tmp_path: Path) -> StreamSettings:
    return StreamSettings(topic_prefix="t1.", app_id="hub", data_dir=tmp_path)


def allowed(rules: list[Grant], principal: str, operation: str, topic: str) -> bool:
    """Would the authorizer let `principal` do `operation` on `topic` (READ/WRITE imply DESCRIBE)?"""
    implied = {operation, "READ", "WRITE"} if operation == "DESCRIBE" else {operation}
    return any(
        rule.principal == principal
        and rule.resource == "topic"
        and rule.operation in implied
        and (topic.startswith(rule.name) if rule.prefixed else topic == rule.name)
        for rule in rules
    )


def test_an_institution_writes_its_own_raw_topics_only_and_reads_nothing() -> None:
    rules = institution_grants(TOPICS, "H001")
    assert allowed(rules, "H001", "WRITE", "t1.raw.H001.lab")
    assert not allowed(rules, "H001", "WRITE", "t1.raw.H002.lab")
    assert not allowed(rules, "H001", "WRITE", "t1.raw.H0011.lab"), "a longer id is another institution"
    assert not any(rule.operation == "READ" for rule in rules)
    assert {rule.principal for rule in rules} == {"H001"}


def test_stage_principals_read_and_write_what_their_stage_does(tmp_path: Path) -> None:
    rules = grants(TOPICS, stream(tmp_path))
    for reader in (principals.NORMALISER, principals.WORKER):
        assert allowed(rules, reader, "READ", "t1.raw.H007.lab"), "raw topics of any institution"
    for principal in (*principals.SERVICE_PRINCIPALS,):
        if principal != principals.GATEWAYS:
            assert not allowed(rules, principal, "WRITE", "t1.raw.H001.lab"), principal
    assert allowed(rules, principals.GATEWAYS, "WRITE", "t1.raw.H001.lab")
    assert not any(r.principal == principals.GATEWAYS and r.operation == "READ" for r in rules)
    assert allowed(rules, principals.CLINICAL, "WRITE", "t1.alerts.critical")
    assert not allowed(rules, principals.CLINICAL, "READ", "t1.raw.H001.lab")
    assert allowed(rules, principals.STORE, "READ", "t1.norm.lab")
    store_writes = {r.name for r in rules if r.principal == principals.STORE and r.operation == "WRITE"}
    assert store_writes == {"hub-store-"}, "only its Faust app's own internal topics"
    assert allowed(rules, principals.CONSOLE, "WRITE", "t1.alerts.ack")
    assert not allowed(rules, principals.CONSOLE, "WRITE", "t1.alerts.critical")
    assert not allowed(rules, principals.CONSOLE, "READ", "t1.norm.lab")


def test_each_faust_app_owns_its_internal_topics_and_group(tmp_path: Path) -> None:
    rules = grants(TOPICS, stream(tmp_path))
    assert allowed(rules, principals.WORKER, "CREATE", "hub-identity-links-changelog")
    assert allowed(rules, principals.NORMALISER, "CREATE", "hub-normaliser-identity-links-changelog")
    assert not allowed(rules, principals.NORMALISER, "READ", "hub-clinical-alert-memory-changelog")
    groups = {(r.principal, r.name) for r in rules if r.resource == "group"}
    assert (principals.STORE, "hub-sink") in groups and (principals.WORKER, "hub") in groups
    assert (principals.CONSOLE, "hub-console-notify") in groups
    assert not any(r.principal == principals.CONSOLE and r.name == "hub" for r in rules)
