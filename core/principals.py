"""Who connects to Kafka: one principal per institution and one per stage, each with only the rights
its work needs (`clinhub/kafka_acls.py` grants them). The names are defined once, here."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

ADMIN = "admin"  # the admin tooling: topics, ACLs, credentials, schema registration; the only super user
NORMALISER = "normaliser"
CLINICAL = "clinical"
STORE = "store"
WORKER = "worker"  # one worker process running several stages: the union of their rights
GATEWAYS = "gateways"  # HL7 v2 MLLP, FHIR and CSV: publish for the institutions they serve
CONSOLE = "console"  # acknowledgements, notifications

# The FHIR gateway's transactional ids start with this (one per gateway process and institution)
FHIR_TRANSACTIONAL_PREFIX = "clinhub-fhir-"

STAGES: tuple[str, ...] = (NORMALISER, CLINICAL, STORE)
SERVICE_PRINCIPALS: tuple[str, ...] = (NORMALISER, CLINICAL, STORE, WORKER, GATEWAYS, CONSOLE)


def worker_principal(roles: Collection[str]) -> str:
    """A worker running one stage is that stage; several, the worker principal."""
    stages = set(roles)
    if len(stages) == 1 and next(iter(stages)) in STAGES:
        return next(iter(stages))
    return WORKER


Resource = Literal["topic", "group", "transactional_id"]
Operation = Literal["READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"]


@dataclass(frozen=True)
class Grant:
    """An ALLOW rule: `principal` may do `operation` on the resource `name` (or every name starting
    with it when `prefixed`)."""

    principal: str
    resource: Resource
    name: str
    operation: Operation
    prefixed: bool = False
