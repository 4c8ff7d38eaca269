"""The worker's components are built at the command's edge, each stage with only the secrets it uses."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from clinhub.worker import build_components, load_pseudonym_key
from core.exceptions import ConfigurationError
from core.settings import (
    DatabaseSettings,
    HubSettings,
    InfraSettings,
    KafkaSettings,
    RegistrySettings,
    SecuritySettings,
    StreamSettings,
)
from streams.domain.identity import RegionalIdentity


def settings(tmp_path: Path, security: SecuritySettings | None = None) -> HubSettings:
    return HubSettings(
        kafka=KafkaSettings(),
        registry=RegistrySettings(url="mock://worker"),
        database=DatabaseSettings(),
        security=security or SecuritySettings(),
        stream=StreamSettings(app_id="worker-test", data_dir=tmp_path, table_store="memory://"),
        infra=InfraSettings(metrics_port=0),
    )


def test_each_stage_gets_only_the_secrets_it_uses(tmp_path: Path) -> None:
    base = settings(tmp_path)  # no pseudonymisation key; the database URL points nowhere useful
    clinical = build_components(base, CollectorRegistry(), roles=("clinical",))
    assert (clinical.identity, clinical.sink) == (None, None)
    with pytest.raises(ConfigurationError, match="CLINHUB_SECURITY_PSEUDONYM_KEY"):
        build_components(base, CollectorRegistry(), roles=("normaliser", "clinical"))

    keyed = settings(tmp_path, SecuritySettings(pseudonym_key=SecretStr("k" * 32)))
    normaliser = build_components(keyed, CollectorRegistry(), roles=("normaliser",))
    assert isinstance(normaliser.identity, RegionalIdentity) and normaliser.sink is None


def test_the_bug_retry_bound_comes_from_the_settings(tmp_path: Path) -> None:
    base = settings(tmp_path)
    tuned = base.model_copy(update={"stream": base.stream.model_copy(update={"bug_attempts": 5})})
    assert build_components(tuned, CollectorRegistry(), roles=("clinical",)).retry.bug_attempts == 5


@pytest.mark.parametrize("key", ["", "short-key", "x" * 31])
def test_a_short_or_empty_pseudonym_key_is_refused(key: str) -> None:
    """An empty key would make regional ids guessable; the worker must refuse to start."""
    with pytest.raises(ConfigurationError) as caught:
        load_pseudonym_key(SecuritySettings(pseudonym_key=SecretStr(key)))
    assert caught.value.setting == "CLINHUB_SECURITY_PSEUDONYM_KEY"


def test_a_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40 + "\n")
    key_file.chmod(0o600)
    assert load_pseudonym_key(SecuritySettings(pseudonym_key_file=key_file)) == b"k" * 40


def test_a_key_file_others_may_read_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    """Whoever reads the key can re-identify every patient: the worker does not start on it."""
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40)
    key_file.chmod(0o640)
    with pytest.raises(ConfigurationError) as refused:
        load_pseudonym_key(SecuritySettings(pseudonym_key_file=key_file))
    assert refused.value.setting == "CLINHUB_SECURITY_PSEUDONYM_KEY_FILE"
    assert "chmod 600" in str(refused.value) and "kkkk" not in str(refused.value)
