"""The contract: kinds defined once, topic names built and parsed in one place, message keys."""

from __future__ import annotations

import pytest

from core import contract
from core.contract import KINDS, RawTopic, TopicNames
from schemas import standard


@pytest.mark.parametrize(
    ("prefix", "topic", "parsed"),
    [
        ("", "raw.H001.lab", RawTopic("H001", "lab")),
        ("", "raw.H002.vitals", RawTopic("H002", "vitals")),
        ("ci-1234-", "ci-1234-raw.H001.lab", RawTopic("H001", "lab")),  # a prefix without a dot
        ("team.a.", "team.a.raw.H002.lab", RawTopic("H002", "lab")),  # a prefix with dots
        ("", "alerts.critical", None),
        ("", "deadletter", None),
        ("", "raw.H001", None),
        ("", "raw.H001.xray", None),  # not a kind of the standard
        ("", "raw.H0.01.lab", None),
        ("t1.", "raw.H001.lab", None),  # another prefix's topic
        ("", "", None),
    ],
)
def test_raw_topics_parse_to_institution_and_kind(prefix: str, topic: str, parsed: RawTopic | None) -> None:
    assert TopicNames(prefix=prefix).parse_raw(topic) == parsed


@pytest.mark.parametrize("prefix", ["", "ci-", "test.run7.", "t_"])
@pytest.mark.parametrize("kind", KINDS)
def test_parsing_inverts_building(prefix: str, kind: str) -> None:
    """Every raw topic the hub names maps back to its institution and kind; its own outputs to none."""
    names = TopicNames(prefix=prefix)
    for institution in ("H007", "X-9", "c_3"):
        assert names.parse_raw(names.raw(institution, kind)) == RawTopic(institution, kind)
    assert all(names.parse_raw(topic) is None for topic in (names.alerts_topic, names.deadletter_topic))
    assert names.parse_raw(names.norm(kind)) is None


def test_an_unknown_kind_or_malformed_institution_has_no_topic() -> None:
    """A typo in the kind must not create a stray topic, nor a dot in an institution id a wrong one."""
    with pytest.raises(ValueError, match="unknown event kind"):
        TopicNames().raw("H001", "labs")
    with pytest.raises(ValueError, match="unknown event kind"):
        TopicNames().norm("labs")
    with pytest.raises(ValueError, match="institution id"):
        TopicNames().raw("H0.01", "lab")


def test_every_kind_and_hub_record_has_a_schema_of_the_standard() -> None:
    for name, schema in contract.RECORD_SCHEMAS.items():
        assert standard.load(schema).name == schema, name
    for spec in contract.CLINICAL_KINDS:
        fields = {f["name"] for f in standard.load(spec.schema).parsed["fields"]}
        assert {spec.natural_key, "envelope", "patient_mrn"} <= fields, spec.name


def test_the_store_keeps_every_record_dead_letters_included_each_from_its_own_topic() -> None:
    names = TopicNames(prefix="p-")
    stored = names.stored()
    assert sorted(stored.values()) == sorted(contract.STORED_RECORDS) == sorted(contract.RECORD_SCHEMAS)
    assert stored[names.deadletter_topic] == "deadletter" == contract.DEADLETTER.name
    assert stored[names.norm("lab")] == "lab" and stored[names.alerts_topic] == "alert"
    assert stored[names.alert_states_topic] == "alert_state" == contract.ALERT_STATE.name
    assert not any(topic.startswith("p-raw.") for topic in stored), "raw input is the normaliser's"


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("raw.H001.lab", "lab"),
        ("norm.vitals", "vitals"),
        ("t123.raw.H001.lab", "lab"),  # the tests' prefixes
        ("t123.norm.diagnosis", "diagnosis"),
        ("ci-1234-raw.C-3.medication", "medication"),  # a prefix without a dot
        ("team.a.norm.encounter", "encounter"),
        ("norm.raw.H002.lab", "lab"),  # a prefix that looks like a topic
        ("norm.identity", None),  # the hub's own records carry no clinical kind
        ("t1.alerts.critical", None),
        ("deadletter", None),
        ("raw.H001.xray", None),  # not a kind of the standard
        ("raw.H0.01.lab", None),
        ("norm.labs", None),
        ("raw.H001.lab.extra", None),
        ("", None),
    ],
)
def test_the_kind_of_a_topic_is_read_under_any_prefix(topic: str, kind: str | None) -> None:
    assert contract.topic_kind(topic) == kind


@pytest.mark.parametrize("prefix", ["", "ci-", "test.run7.", "norm."])
def test_every_clinical_topic_the_hub_names_reads_back_as_its_kind(prefix: str) -> None:
    names = TopicNames(prefix=prefix)
    for kind in KINDS:
        assert contract.topic_kind(names.raw("H007", kind)) == kind
        assert contract.topic_kind(names.norm(kind)) == kind
    assert all(contract.topic_kind(names.hub(record)) is None for record in contract.HUB_RECORDS)


def test_keys() -> None:
    assert contract.patient_key("H001", "MRN1") == "H001|MRN1"
    assert contract.regional_key("rp-1") == b"rp-1"
    alert_id = "0B0E58F2-5A8E-5C0F-9A47-0D9C2B7E2F11"
    assert contract.alert_key(alert_id) == contract.alert_key(alert_id.lower()) == alert_id.lower().encode()


@pytest.mark.parametrize("prefix", ["", "ci-1234-", "team.a."])
def test_only_the_alert_state_topic_is_compacted_whatever_the_prefix(prefix: str) -> None:
    names = TopicNames(prefix=prefix)
    configs = {topic: contract.topic_config(topic) for topic in names.all_for(["H001", "X-9"])}
    assert names.alert_states_topic == f"{prefix}alerts.state"
    assert {topic for topic, config in configs.items() if config} == {names.alert_states_topic}
    assert configs[names.alert_states_topic] == {"cleanup.policy": "compact"}
