"""What the stream worker is built from, made at the command's edge: the secrets live here.

The pseudonymisation key is loaded only for a worker that runs the normaliser, the database engine
built only for one that runs the store; `streams/` receives them as plain objects (`Components`).
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry

from core.exceptions import ConfigurationError
from core.settings import HubSettings, SecuritySettings, read_secret_file
from schemas.wire import ConfluentRegistry
from sinks import privileges
from sinks.metrics import make_sink_metrics
from sinks.sql import SqlStoreSink
from sinks.store import engine_for, ensure_current
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import DATA_DIR, load_reference
from streams.metrics import make_stream_metrics
from streams.runtime.app import ROLES
from streams.runtime.stage import Components, RetryPolicy

MIN_KEY_BYTES = 32


def _long_enough(key: bytes, setting: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            setting, f"pseudonymisation key has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes"
        )
    return key


def load_pseudonym_key(security: SecuritySettings) -> bytes:
    if security.pseudonym_key is not None:
        return _long_enough(
            security.pseudonym_key.get_secret_value().encode(), "CLINHUB_SECURITY_PSEUDONYM_KEY"
        )
    if security.pseudonym_key_file is not None:
        # refused when others may read it: whoever reads the key can re-identify every patient
        key = read_secret_file(security.pseudonym_key_file, "CLINHUB_SECURITY_PSEUDONYM_KEY_FILE")
        return _long_enough(key.get_secret_value().encode(), "CLINHUB_SECURITY_PSEUDONYM_KEY_FILE")
    raise ConfigurationError(
        "CLINHUB_SECURITY_PSEUDONYM_KEY",
        "no pseudonymisation key; set it or CLINHUB_SECURITY_PSEUDONYM_KEY_FILE",
    )


def build_components(
    settings: HubSettings, registry: CollectorRegistry, roles: Collection[str] = ROLES
) -> Components:
    """What the given stages need, and no more: the key only where pseudonyms are computed, the
    database only where the store is written, so a stage's process holds no secret it does not use."""
    sink = None
    if "store" in roles:
        engine = engine_for(settings.database.for_role(privileges.STORE))
        ensure_current(engine)
        sink = SqlStoreSink(engine, metrics=make_sink_metrics(registry))
    reference_dir = settings.stream.reference_dir or DATA_DIR
    return Components(
        registry=ConfluentRegistry(settings.registry.client_config()),
        reference=load_reference(reference_dir),
        codes=load_codes(reference_dir),
        metrics=make_stream_metrics(registry),
        identity=RegionalIdentity(load_pseudonym_key(settings.security)) if "normaliser" in roles else None,
        sink=sink,
        retry=RetryPolicy(
            max_delay=settings.stream.sink_retry_max_seconds, bug_attempts=settings.stream.bug_attempts
        ),
    )
