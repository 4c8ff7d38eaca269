"""The hub's contract: the event kinds, the topics they travel on, and the keys of their messages.

Defined once here and read by producers, gateways, streams and sinks alike. A kind is one line of
`CLINICAL_KINDS`; everything else that lists kinds (topics, schemas per kind, the SDK's checks, the
store's converters) is derived from it, so a new kind (imaging reports, say) is that line, its Avro
schema, its normaliser and its converter in the store.

Topics, under an optional prefix (tests give each run its own):

- `raw.<institution>.<kind>`: what an institution publishes, keyed by `<institution>|<MRN>`; one
  prefix per institution, so an ACL can bind its principal to it;
- `norm.<kind>`: the regional standard, keyed by the regional patient id, so one patient's events
  stay in order on one partition;
- `norm.identity`, `alerts.critical`, `alerts.escalation`, `alerts.ack`: the hub's own records, keyed
  by the regional patient id; `deadletter`: rejected input, keyed as it came (the store keeps each
  without its bytes, for the institutions' integration staff; `topic_kind` tells its clinical kind);
- `alerts.state`: the state changes of each alert (repeats, escalations, acknowledgements), keyed by
  alert id and log-compacted (`HubRecord.compacted`, `topic_config`), so its latest record per key is
  the alert's current state. `alerts.critical` carries each alert once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class KindSpec:
    """One clinical event kind of the regional standard."""

    name: str
    schema: str  # full name of its Avro record (schemas/avro/<schema>.avsc)
    natural_key: str  # field that, with the institution, names the fact across versions and corrections


CLINICAL_KINDS: tuple[KindSpec, ...] = (
    KindSpec(name="lab", schema="org.clinhub.lab.LabResult", natural_key="result_id"),
    KindSpec(name="vitals", schema="org.clinhub.vitals.VitalSigns", natural_key="observation_id"),
    KindSpec(name="encounter", schema="org.clinhub.encounter.EncounterEvent", natural_key="encounter_id"),
    KindSpec(name="medication", schema="org.clinhub.medication.MedicationOrder", natural_key="order_id"),
    KindSpec(name="diagnosis", schema="org.clinhub.diagnosis.Diagnosis", natural_key="diagnosis_id"),
)

# The kinds institutions publish, in the order of CLINICAL_KINDS.
KINDS: tuple[str, ...] = tuple(spec.name for spec in CLINICAL_KINDS)
KIND_SPECS: dict[str, KindSpec] = {spec.name: spec for spec in CLINICAL_KINDS}


@dataclass(frozen=True)
class HubRecord:
    """A record the hub itself publishes: its short name, Avro record and topic (without prefix).

    `compacted`: its topic keeps the latest record of each key (cleanup.policy=compact), not a window
    of time: a reader gets the current state of every key without replaying every change."""

    name: str
    schema: str
    topic: str
    compacted: bool = False


IDENTITY = HubRecord("identity", "org.clinhub.identity.IdentityLink", "norm.identity")
ALERT = HubRecord("alert", "org.clinhub.alert.CriticalValueAlert", "alerts.critical")
ESCALATION = HubRecord("escalation", "org.clinhub.alert.AlertEscalation", "alerts.escalation")
ACK = HubRecord("ack", "org.clinhub.alert.AlertAcknowledgement", "alerts.ack")
ALERT_STATE = HubRecord("alert_state", "org.clinhub.alert.AlertState", "alerts.state", compacted=True)
DEADLETTER = HubRecord("deadletter", "org.clinhub.ops.DeadLetter", "deadletter")
HUB_RECORDS: tuple[HubRecord, ...] = (IDENTITY, ALERT, ESCALATION, ACK, ALERT_STATE, DEADLETTER)

# Every record on the hub's topics by its short name: the clinical kinds and the hub's own records.
RECORD_SCHEMAS: dict[str, str] = {
    **{spec.name: spec.schema for spec in CLINICAL_KINDS},
    **{record.name: record.schema for record in HUB_RECORDS},
}
# What the regional store keeps: every record of the hub's topics, dead letters included (their reason
# and position, not their bytes, which stay on Kafka to be fixed and replayed).
STORED_RECORDS: tuple[str, ...] = tuple(RECORD_SCHEMAS)


def check_kind(kind: str) -> str:
    if kind not in KIND_SPECS:
        raise ValueError(f"unknown event kind {kind!r}; one of {', '.join(KINDS)}")
    return kind


@dataclass(frozen=True)
class RawTopic:
    """A parsed `raw.<institution>.<kind>` name."""

    institution: str
    kind: str


_INSTITUTION = r"[A-Za-z0-9_-]+"


@cache
def _raw_pattern(prefix: str) -> re.Pattern[str]:
    kinds = "|".join(map(re.escape, KINDS))
    return re.compile(rf"^{re.escape(prefix)}raw\.({_INSTITUTION})\.({kinds})$")


@cache
def _clinical_topic_pattern() -> re.Pattern[str]:
    kinds = "|".join(map(re.escape, KINDS))
    return re.compile(rf"(?:raw\.{_INSTITUTION}\.|norm\.)({kinds})\Z")


def topic_kind(topic: str) -> str | None:
    """The clinical kind a `raw.<institution>.<kind>` or `norm.<kind>` topic carries, under any prefix;
    None for every other topic. For a dead letter, whose original topic is all that says what it was
    (the prefix is the one of the topic it was read from, which the store need not know)."""
    match = _clinical_topic_pattern().search(topic)
    return match.group(1) if match else None


@dataclass(frozen=True)
class TopicNames:
    """Every topic name, built and parsed in one place, under an optional prefix."""

    prefix: str = ""

    def raw(self, institution: str, kind: str) -> str:
        if not re.fullmatch(_INSTITUTION, institution):
            raise ValueError(f"institution id {institution!r} must be letters, digits, '_' or '-'")
        return f"{self.prefix}raw.{institution}.{check_kind(kind)}"

    def raw_pattern(self) -> re.Pattern[str]:
        """Every raw topic of a known kind under this prefix, whatever the institution."""
        return _raw_pattern(self.prefix)

    def parse_raw(self, topic: str) -> RawTopic | None:
        """The institution and kind of a raw topic of this prefix; None for any other name."""
        match = self.raw_pattern().match(topic)
        return RawTopic(match.group(1), match.group(2)) if match else None

    def norm(self, kind: str) -> str:
        return f"{self.prefix}norm.{check_kind(kind)}"

    def hub(self, record: HubRecord) -> str:
        return f"{self.prefix}{record.topic}"

    @property
    def identity_topic(self) -> str:
        return self.hub(IDENTITY)

    @property
    def alerts_topic(self) -> str:
        return self.hub(ALERT)

    @property
    def escalations_topic(self) -> str:
        return self.hub(ESCALATION)

    @property
    def acks_topic(self) -> str:
        return self.hub(ACK)

    @property
    def alert_states_topic(self) -> str:
        return self.hub(ALERT_STATE)

    @property
    def deadletter_topic(self) -> str:
        return self.hub(DEADLETTER)

    def stored(self) -> dict[str, str]:
        """topic -> record name, for every topic whose records the regional store keeps."""
        topics = {self.norm(kind): kind for kind in KINDS}
        topics.update(
            {self.hub(record): record.name for record in HUB_RECORDS if record.name in STORED_RECORDS}
        )
        return topics

    def all_for(self, institutions: Iterable[str], kinds: Iterable[str] = KINDS) -> list[str]:
        kinds = list(kinds)
        return (
            [self.raw(institution, kind) for institution in institutions for kind in kinds]
            + [self.norm(kind) for kind in kinds]
            + [self.hub(record) for record in HUB_RECORDS]
        )


COMPACTED = {"cleanup.policy": "compact"}


def topic_config(topic: str) -> dict[str, str]:
    """The topic-level settings the contract asks of one of its topics, whatever its prefix: the topic of
    a compacted record is compacted; every other topic takes the cluster's defaults ({})."""
    for record in HUB_RECORDS:
        # the names TopicNames builds end in a kind (raw., norm.) or are <prefix><record.topic>
        if record.compacted and topic.endswith(record.topic):
            return dict(COMPACTED)
    return {}


def patient_key(institution: str, mrn: str) -> str:
    """An institution's patient: the key of raw messages and of the identity-link table."""
    return f"{institution}|{mrn}"


def regional_key(regional_patient_id: str) -> bytes:
    """The key of every normalised and alert message (but alert states): the regional patient id."""
    return regional_patient_id.encode()


def alert_key(alert_id: str) -> bytes:
    """The key of an alert's state changes on alerts.state: its alert id, canonical lower-case text, so
    compaction keeps one record per alert."""
    return str(alert_id).lower().encode()


# The Kafka header on every record the hub derives from a raw event (its normalised record and identity
# link, the alerts and alert states its result raised): the broker timestamp of that raw message, in
# milliseconds since the epoch, as ASCII digits. Set by the normaliser from the raw message itself (never
# from a header an institution sent), carried by the stages after it; end-to-end latencies are measured
# from it, not from the envelope's times, which are the producer's clock.
RAW_TIMESTAMP_HEADER = "raw_timestamp_ms"
