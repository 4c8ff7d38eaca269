"""Setting up a deployment on Kafka as the admin: its topics, the ACLs of every stage principal and
institution, and institutions' credentials (`clinhub topics`, `clinhub institutions add|revoke`).

Each step can be run again: existing topics and ACLs are left as they are.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clinhub.infra.acls import apply_grants, revoke_principal, set_passwords
from clinhub.infra.tls import write_private
from clinhub.kafka_acls import grants, institution_grants
from core import principals
from core.contract import KINDS, TopicNames
from core.settings import HubSettings
from streams.runtime.topics import create_topics


@dataclass(frozen=True)
class Provisioned:
    topics_created: list[str]
    acls: int


def admin_config(settings: HubSettings) -> dict[str, str]:
    # log_level 5 (notice): librdkafka's info lines (the admin client's "Purging 1 unserved events from
    # background queue" as it is destroyed) stay off the terminal; notices, warnings and errors show.
    return {**settings.as_principal(principals.ADMIN).kafka.client_config(), "log_level": "5"}


def provision(settings: HubSettings, institutions: Sequence[str] | None = None) -> Provisioned:
    """The topics of the deployment and its institutions, and every ACL of its principals."""
    chosen = list(institutions if institutions is not None else settings.stream.institutions)
    topics = TopicNames(prefix=settings.stream.topic_prefix)
    config = admin_config(settings)
    created = create_topics(
        config, topics.all_for(chosen), settings.kafka.topic_partitions, settings.kafka.topic_replication
    )
    acls = 0
    if settings.kafka.uses_sasl:  # no authorizer to tell without authentication
        every = [*grants(topics, settings.stream)]
        every += [grant for institution in chosen for grant in institution_grants(topics, institution)]
        acls = apply_grants(config, every)
    return Provisioned(created, acls)


@dataclass(frozen=True)
class NewInstitution:
    institution: str
    password: str
    topics: list[str]


def add_institution(
    settings: HubSettings, institution: str, registry_user: Callable[[str], None] | None = None
) -> NewInstitution:
    """A principal of its own (a new password each time: adding again replaces it), its raw topics and
    its ACLs. With the local stack's secrets directory, the password is also kept there, and
    `registry_user` gives it a user of the schema registry (the local proxy's)."""
    topics = TopicNames(prefix=settings.stream.topic_prefix)
    names = [topics.raw(institution, kind) for kind in KINDS]  # refuses a malformed id first
    password = secrets.token_urlsafe(32)
    config = admin_config(settings)
    set_passwords(config, {institution: password})
    if settings.kafka.principal_secrets_dir is not None:
        write_private(settings.kafka.principal_secrets_dir / f"{institution}.password", password.encode())
    create_topics(config, names, settings.kafka.topic_partitions, settings.kafka.topic_replication)
    apply_grants(config, institution_grants(topics, institution))
    if registry_user is not None:
        registry_user(institution)
    return NewInstitution(institution, password, names)


def revoke_institution(settings: HubSettings, institution: str) -> int:
    """Its ACLs (at once: every request is authorised) and its credentials; returns the ACLs removed."""
    TopicNames(prefix=settings.stream.topic_prefix).raw(institution, KINDS[0])  # a well-formed id
    return revoke_principal(admin_config(settings), institution)
