"""Typed settings: read from the environment (and .env), frozen once built, secrets kept out of reprs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from core.exceptions import ConfigurationError
from core.settings import (
    DatabaseSettings,
    KafkaSettings,
    RegistrySettings,
    SecuritySettings,
    StreamSettings,
    load_settings,
)

SECRET = "s3cr3t-Do-Not-Log"  # noqa: S105 - a test value, not a credential


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CLINHUB_* variable or .env file of the developer's machine may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("CLINHUB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_kafka_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Kafka client gets its connection properties from CLINHUB_KAFKA_* variables."""
    monkeypatch.setenv("CLINHUB_KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9093,kafka-2:9093")
    monkeypatch.setenv("CLINHUB_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CLINHUB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CLINHUB_KAFKA_SASL_USERNAME", "hub")
    monkeypatch.setenv("CLINHUB_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("CLINHUB_KAFKA_SSL_CA_LOCATION", "/etc/clinhub/kafka-ca.pem")
    monkeypatch.setenv("CLINHUB_KAFKA_TOPIC_PARTITIONS", "12")

    kafka = KafkaSettings()

    assert kafka.topic_partitions == 12
    assert kafka.client_config() == {
        "bootstrap.servers": "kafka-1:9093,kafka-2:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "hub",
        "sasl.password": SECRET,
        "ssl.ca.location": "/etc/clinhub/kafka-ca.pem",
    }


def test_kafka_without_sasl_sends_no_sasl_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka rejects SASL properties on a PLAINTEXT connection, so none are set."""
    monkeypatch.setenv("CLINHUB_KAFKA_BOOTSTRAP_SERVERS", "localhost:19092")
    monkeypatch.setenv("CLINHUB_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    config = KafkaSettings().client_config()
    assert config["bootstrap.servers"] == "localhost:19092"
    assert not any(key.startswith("sasl.") for key in config)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLINHUB_KAFKA_TOPIC_PARTITIONS", "0"),
        ("CLINHUB_KAFKA_TOPIC_REPLICATION", "-1"),
        ("CLINHUB_KAFKA_TOPIC_PARTITIONS", "three"),
    ],
)
def test_invalid_kafka_values_are_refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    """A topic needs at least one partition and one replica; nonsense fails at start-up, not later."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        KafkaSettings()


def test_database_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store URL and echo flag come from CLINHUB_DATABASE_*."""
    url = f"postgresql+psycopg://hub:{SECRET}@db.internal:5432/clinhub"
    monkeypatch.setenv("CLINHUB_DATABASE_URL", url)
    monkeypatch.setenv("CLINHUB_DATABASE_ECHO", "true")
    database = DatabaseSettings()
    assert database.url.get_secret_value() == url
    assert database.echo is True


def test_dotenv_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A .env file configures a checkout; a real environment variable overrides it."""
    (tmp_path / ".env").write_text(
        "CLINHUB_KAFKA_BOOTSTRAP_SERVERS=from-dotenv:9092\nCLINHUB_KAFKA_SECURITY_PROTOCOL=SSL\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("CLINHUB_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    kafka = KafkaSettings()
    assert (kafka.bootstrap_servers, kafka.security_protocol) == ("from-dotenv:9092", "SASL_SSL")


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        (lambda: KafkaSettings(), "bootstrap_servers", "elsewhere:9092"),
        (lambda: DatabaseSettings(), "echo", True),
        (lambda: StreamSettings(), "batch_size", 1),
        (lambda: RegistrySettings(), "url", "http://evil"),
    ],
)
def test_settings_are_frozen(settings: Callable[[], BaseModel], field: str, value: object) -> None:
    """Settings are read once at the edge; nothing may change them behind the clients' backs."""
    model = settings()
    before = getattr(model, field)
    with pytest.raises(ValidationError):
        setattr(model, field, value)
    assert getattr(model, field) == before


def _renderings(model: BaseModel) -> list[str]:
    return [repr(model), str(model), model.model_dump_json(), repr(model.model_dump())]


def test_secrets_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passwords, database URLs and pseudonym keys never appear in reprs, logs or dumps."""
    monkeypatch.setenv("CLINHUB_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("CLINHUB_DATABASE_URL", f"postgresql://hub:{SECRET}@db/clinhub")
    monkeypatch.setenv("CLINHUB_REGISTRY_BASIC_AUTH_USER", "hub")
    monkeypatch.setenv("CLINHUB_REGISTRY_BASIC_AUTH_PASSWORD", SECRET)
    monkeypatch.setenv("CLINHUB_SECURITY_PSEUDONYM_KEY", SECRET)
    for model in (
        KafkaSettings(),
        DatabaseSettings(),
        RegistrySettings(),
        SecuritySettings(),
        load_settings(),
    ):
        for text in _renderings(model):
            assert SECRET not in text, type(model).__name__


def test_registry_basic_auth_needs_user_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials are passed only as a complete user:password pair."""
    monkeypatch.setenv("CLINHUB_REGISTRY_URL", "https://registry.internal/apis/ccompat/v7")
    monkeypatch.setenv("CLINHUB_REGISTRY_BASIC_AUTH_USER", "hub")
    assert RegistrySettings().client_config() == {"url": "https://registry.internal/apis/ccompat/v7"}
    monkeypatch.setenv("CLINHUB_REGISTRY_BASIC_AUTH_PASSWORD", SECRET)
    assert RegistrySettings().client_config()["basic.auth.user.info"] == f"hub:{SECRET}"


def test_load_settings_assembles_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's one call reads each concern's own prefix."""
    monkeypatch.setenv("CLINHUB_KAFKA_BOOTSTRAP_SERVERS", "k:1")
    monkeypatch.setenv("CLINHUB_STREAM_TOPIC_PREFIX", "ci-")
    monkeypatch.setenv("CLINHUB_STREAM_INSTITUTIONS", '["H001", "H003"]')
    hub = load_settings()
    assert hub.kafka.bootstrap_servers == "k:1"
    assert hub.stream.topic_prefix == "ci-"
    assert hub.stream.institutions == ("H001", "H003")


def test_a_password_file_readable_by_others_is_refused_and_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "normaliser.password"
    secret.write_text(f"{SECRET}\n", encoding="utf-8")
    secret.chmod(0o644)
    kafka = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="normaliser",
        sasl_password_file=secret,
        ssl_ca_location=tmp_path / "ca.crt",
    )
    with pytest.raises(ConfigurationError) as refused:
        kafka.client_config()
    assert "chmod 600" in str(refused.value) and SECRET not in str(refused.value)
    secret.chmod(0o600)
    config = kafka.client_config()
    assert (config["sasl.password"], config["ssl.ca.location"]) == (SECRET, str(tmp_path / "ca.crt"))


def test_each_component_connects_as_its_own_principal_with_the_local_stacks_secrets(tmp_path: Path) -> None:
    for name, password in (("clinical", "c-secret"), ("store", "s-secret")):
        (tmp_path / f"{name}.password").write_text(password)
        (tmp_path / f"{name}.password").chmod(0o600)
    local = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", principal_secrets_dir=tmp_path
    )
    clinical = local.for_principal("clinical").client_config()
    assert (clinical["sasl.username"], clinical["sasl.password"]) == ("clinical", "c-secret")
    assert local.for_principal("store").client_config()["sasl.password"] == "s-secret"
    chosen_for_good = local.for_principal("store").for_principal("clinical")  # a gateway's publishers
    assert chosen_for_good.client_config()["sasl.username"] == "store"
    admin = local.model_copy(update={"sasl_username": "admin", "sasl_password": SecretStr("a")})
    assert admin.client_config()["sasl.username"] == "admin"
    assert admin.for_principal("clinical").client_config()["sasl.username"] == "clinical"
    one = admin.model_copy(update={"principal_secrets_dir": None})
    assert one.for_principal("clinical").client_config()["sasl.username"] == "admin", "one identity given"
    plaintext = KafkaSettings(security_protocol="PLAINTEXT")
    assert plaintext.for_principal("clinical") == plaintext, "plaintext: no principal"


def test_sasl_without_credentials_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="CLINHUB_KAFKA_SASL_USERNAME"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512").client_config()
    with pytest.raises(ValidationError):
        KafkaSettings(security_protocol="SASL_SSSL")


def test_by_default_every_client_reaches_the_local_broker_secured() -> None:
    """Secure by default: SASL_SSL with SCRAM, the local CA, each component its own principal."""
    kafka = KafkaSettings()
    assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert kafka.ssl_ca_location is not None and kafka.ssl_ca_location.name == "ca.crt"
    with pytest.raises(ConfigurationError):
        kafka.client_config()  # no principal chosen: nothing connects anonymously
    local = load_settings().kafka
    assert local.principal_secrets_dir is not None
    normaliser = local.for_principal("normaliser")
    assert normaliser.sasl_password_file == local.principal_secrets_dir / "normaliser.password"


def test_the_local_stacks_ca_and_secrets_follow_its_home_unless_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLINHUB_INFRA_HOME", str(tmp_path / "infra"))
    kafka = load_settings().kafka
    assert kafka.ssl_ca_location == tmp_path / "infra" / "tls" / "ca.crt"
    assert kafka.principal_secrets_dir == tmp_path / "infra" / "secrets" / "kafka"
    monkeypatch.setenv("CLINHUB_KAFKA_SSL_CA_LOCATION", "/etc/kafka-ca.pem")
    assert load_settings().kafka.ssl_ca_location == Path("/etc/kafka-ca.pem")
    monkeypatch.setenv("CLINHUB_KAFKA_SASL_USERNAME", "hub")  # one identity for every component
    assert load_settings().kafka.principal_secrets_dir is None


def test_each_component_reads_the_registry_as_its_own_principal(tmp_path: Path) -> None:
    (tmp_path / "gateways.password").write_text("g-secret")
    (tmp_path / "gateways.password").chmod(0o600)
    local = RegistrySettings(
        url="https://127.0.0.1:8081/apis/ccompat/v7",
        ssl_ca_location=tmp_path / "ca.crt",
        principal_secrets_dir=tmp_path,
    )
    config = local.for_principal("gateways").client_config()
    assert config["basic.auth.user.info"] == "gateways:g-secret"
    assert config["ssl.ca.location"] == str(tmp_path / "ca.crt")
    assert "basic.auth.user.info" not in local.client_config(), "no principal chosen: no credentials"


def test_producers_linger_as_configured() -> None:
    """Every producer holds a message `producer_linger_ms` for company (a hop to an alert pays it once)."""
    plain = KafkaSettings(security_protocol="PLAINTEXT")
    assert plain.producer_config(30.0)["linger.ms"] == 5.0
    eager = KafkaSettings(security_protocol="PLAINTEXT", producer_linger_ms=0)
    assert eager.producer_config(30.0)["linger.ms"] == 0
    assert plain.producer_config(30.0, linger_ms=plain.stage_producer_linger_ms)["linger.ms"] == 1.0
