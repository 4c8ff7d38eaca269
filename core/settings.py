"""Typed settings, one frozen model per concern; the only place the hub reads its environment.

Nothing here connects to anything: `load_settings()` builds plain values, and each package builds
its clients from the part it needs.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.exceptions import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )


def read_secret_file(path: Path, setting: str) -> SecretStr:
    """A secret kept in a file: refused when others may read it (a password in a shared file is no
    longer a secret), and never echoed in an error."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(setting, f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            setting, f"{path} may be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    return SecretStr(path.read_text(encoding="utf-8").strip())


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster, and as whom (one principal per institution and per stage)."""

    model_config = _config("CLINHUB_KAFKA_")

    # Secure by default: the defaults reach the local broker `clinhub infra up` starts (SASL_SSL, SCRAM,
    # its CA and principals under .infra/). Another cluster sets its own values.
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "SASL_SSL"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # or the password in a file only its owner may read (CLINHUB_KAFKA_SASL_PASSWORD_FILE)
    sasl_password_file: Path | None = None
    # the CA that signed the brokers' certificates (PEM); None: the system's CAs
    ssl_ca_location: Path | None = PROJECT_ROOT / ".infra" / "tls" / "ca.crt"
    # Each component connects as its own principal (core/principals.py), with the password in
    # <this directory>/<principal>.password, as `clinhub infra up` keeps them; the username and password
    # above are then only those of direct clients. None: every component uses those. `load_settings`
    # points it at the local stack's unless a username is given.
    principal_secrets_dir: Path | None = None
    topic_partitions: int = Field(default=3, ge=1)
    topic_replication: int = Field(default=1, ge=1)
    # How long a producer holds a message for others to share its request (librdkafka's linger.ms): the
    # SDK's and the gateways', which send events one by one (the stream workers': below). An event's first
    # hop pays it once at low load. It bounds the broker's produce requests to 200 a second per producer:
    # at 1 ms, 1,000 events/s from three institutions were ~1,000
    # one-message requests a second, and the broker's per-request work (TLS, append, response) took
    # more of the two cores here than any stage.
    producer_linger_ms: float = Field(default=5.0, ge=0)
    # The stream workers' producer (outputs, table changelogs, dead letters): a stage hands over a batch's
    # messages in one burst and waits for the broker to confirm them, twice a batch (outputs, then the
    # changelog), so the burst makes its requests by itself (librdkafka sends one per partition either
    # way) and a linger only delays each confirmation: a 20-message burst was confirmed in 9 ms at 5 ms
    # and in 4 ms at 1 ms, in the same number of requests.
    stage_producer_linger_ms: float = Field(default=1.0, ge=0)

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def password(self) -> SecretStr | None:
        """The SASL password, from the setting or its file."""
        if self.sasl_password is not None:
            return self.sasl_password
        if self.sasl_password_file is not None:
            return read_secret_file(self.sasl_password_file, "CLINHUB_KAFKA_SASL_PASSWORD_FILE")
        return None

    def client_config(self) -> dict[str, str]:
        """librdkafka properties shared by producers, consumers and admin clients."""
        config = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        if self.uses_sasl:
            password = self.password()
            if not (self.sasl_mechanism and self.sasl_username and password):
                raise ConfigurationError(
                    "CLINHUB_KAFKA_SASL_USERNAME",
                    f"{self.security_protocol} needs a mechanism, a username and a password",
                )
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = password.get_secret_value()
        if self.uses_tls and self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config

    def for_principal(self, principal: str) -> KafkaSettings:
        """The settings a component that is `principal` connects with: with `principal_secrets_dir`
        (the local stack's layout) that principal and its password file there, chosen for good (a
        gateway's publishers stay the gateway's); otherwise the one username and password given."""
        if not self.uses_sasl or self.principal_secrets_dir is None:
            return self
        return self.model_copy(
            update={
                "sasl_username": principal,
                "sasl_password": None,
                "sasl_password_file": self.principal_secrets_dir / f"{principal}.password",
                "principal_secrets_dir": None,
            }
        )

    def producer_config(self, delivery_timeout: float, linger_ms: float | None = None) -> dict[str, Any]:
        """An idempotent acks=all producer that reports delivery only once the broker has the message;
        it lingers `linger_ms` (default `producer_linger_ms`)."""
        return {
            **self.client_config(),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": self.producer_linger_ms if linger_ms is None else linger_ms,
            "message.timeout.ms": int(delivery_timeout * 1000),
            "queue.buffering.max.messages": 100_000,
            # Java clients and aiokafka (Faust) hash keys with murmur2: same key, same partition number.
            "partitioner": "murmur2_random",
            "logger": logging.getLogger("clinhub.kafka.producer"),
        }

    def transactional_producer_config(self, delivery_timeout: float, transactional_id: str) -> dict[str, Any]:
        """`producer_config` with transactions. A transaction left open by a crashed process holds back
        every read-committed reader of its partitions until it times out, so the timeout is short."""
        return {
            **self.producer_config(delivery_timeout),
            "transactional.id": transactional_id,
            "transaction.timeout.ms": int(delivery_timeout * 1000) + 5000,
        }


class RegistrySettings(BaseSettings):
    """The Confluent-compatible schema registry (Apicurio's ccompat API locally, behind an
    authenticating TLS proxy: every principal reads, only the admin registers)."""

    model_config = _config("CLINHUB_REGISTRY_")

    url: str = "https://127.0.0.1:8081/apis/ccompat/v7"
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    basic_auth_password_file: Path | None = None  # only its owner may read it
    ssl_ca_location: Path | None = None  # the CA of the registry's certificate; None: the system's
    # as for Kafka: each component its own principal, password in <dir>/<principal>.password
    principal_secrets_dir: Path | None = None

    def password(self) -> SecretStr | None:
        if self.basic_auth_password is not None:
            return self.basic_auth_password
        if self.basic_auth_password_file is not None:
            return read_secret_file(
                self.basic_auth_password_file, "CLINHUB_REGISTRY_BASIC_AUTH_PASSWORD_FILE"
            )
        return None

    def for_principal(self, principal: str) -> RegistrySettings:
        """See `KafkaSettings.for_principal`."""
        if self.principal_secrets_dir is None:
            return self
        return self.model_copy(
            update={
                "basic_auth_user": principal,
                "basic_auth_password": None,
                "basic_auth_password_file": self.principal_secrets_dir / f"{principal}.password",
                "principal_secrets_dir": None,
            }
        )

    def client_config(self) -> dict[str, str]:
        config = {"url": self.url}
        password = self.password()
        if self.basic_auth_user and password:
            config["basic.auth.user.info"] = f"{self.basic_auth_user}:{password.get_secret_value()}"
        if self.url.startswith("https:") and self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config


class DatabaseSettings(BaseSettings):
    """The regional store. The URL is a secret because a URL may carry a password; better, leave the
    user and password out of it and give them below (the password from a file only its owner reads)."""

    model_config = _config("CLINHUB_DATABASE_")

    url: SecretStr = SecretStr(f"sqlite:///{PROJECT_ROOT / '.data' / 'clinhub.sqlite3'}")
    echo: bool = False
    # PostgreSQL only (the embedded SQLite store has no roles): who connects, unless the URL names a user
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # libpq's sslmode, unless the URL sets one: verify-full checks the server's certificate against
    # ssl_ca_location (None: libpq's default, ~/.postgresql/root.crt) and its host name
    ssl_mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "verify-full"
    ssl_ca_location: Path | None = None
    # Each component connects as its own role (sinks/privileges.py), with the password in
    # <this directory>/<role>.password, as `clinhub infra up --postgres` keeps them. None: every
    # component uses the username and password above. `load_settings` points it at the local stack's
    # unless a username is given.
    role_secrets_dir: Path | None = None

    def secret_password(self) -> SecretStr | None:
        """The password, from the setting or its file."""
        if self.password is not None:
            return self.password
        if self.password_file is not None:
            return read_secret_file(self.password_file, "CLINHUB_DATABASE_PASSWORD_FILE")
        return None

    def for_role(self, role: str) -> DatabaseSettings:
        """The settings a component that connects as `role` uses: with `role_secrets_dir` that role and
        its password file there, chosen for good; otherwise the one username and password given."""
        if self.role_secrets_dir is None:
            return self
        return self.model_copy(
            update={
                "username": role,
                "password": None,
                "password_file": self.role_secrets_dir / f"{role}.password",
                "role_secrets_dir": None,
            }
        )


class SecuritySettings(BaseSettings):
    """Keys for pseudonymisation; never in the repository."""

    model_config = _config("CLINHUB_SECURITY_")

    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: Path | None = None


class StreamSettings(BaseSettings):
    """The Faust processor: its identity, topics, and batching bounds."""

    model_config = _config("CLINHUB_STREAM_")

    app_id: str = "clinhub-streams"
    topic_prefix: str = ""
    institutions: tuple[str, ...] = ("H001", "H002", "C003")
    # Stages this worker runs: all three, or a subset. The Faust agents (normaliser, clinical) of one
    # worker form one app and group, "<app_id>" for all stages or "<app_id>-<roles>" for a subset; the
    # store stage is a librdkafka consumer in group "<app_id>-sink" whatever the subset. Scale out with
    # one role per worker, the layout the rebalance fault test runs.
    roles: tuple[str, ...] = ("normaliser", "clinical", "store")
    # A stage's batch is what has arrived, up to batch_size: taken once the stage is idle and its first
    # message has waited batch_linger_seconds for company (none when it came while the stage was busy).
    # It grows only under load; nothing waits for a batch to fill (stage.py `LingerBatches`).
    batch_size: int = Field(default=500, ge=1)
    batch_linger_seconds: float = Field(default=0.005, ge=0)
    data_dir: Path = PROJECT_ROOT / ".data" / "faust"
    web_port: int = 6066
    sink_retry_max_seconds: float = Field(default=30.0, gt=0)
    # A batch failing with an error of the hub's own code (a bug, not bad input, not an outage) is tried
    # this often; then its stage stops, reports clinhub_stage_up 0, and its events wait in Kafka.
    bug_attempts: int = Field(default=3, ge=1)
    # How often acked offsets are committed: a crash replays at most this much (outputs are idempotent)
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    # How long the group waits for a worker that stopped heartbeating (crashed) before its partitions
    # move: the failover time. Heartbeats run on the event loop, which handlers never block.
    session_timeout_seconds: float = Field(default=30.0, ge=6)
    # This worker's static group member id (KIP-345, streams/runtime/membership.py): restarted under the
    # same id, a crashed worker gets its partitions back at once instead of after the session timeout (a
    # worker that does not come back still loses them after it). Must name one live worker only: two
    # live members under one id fence each other out in turn. None: "<host>.<app id>.<digest of
    # data_dir>", the same at every restart of one worker slot and different for two live workers on a
    # host (each has its own data_dir, which RocksDB locks); a second live worker on the host under the
    # same id is refused at start. Set it where the host name changes at restart (a container's).
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    # A partition whose commit has not moved for this long while events wait behind it, with no batch in
    # flight that long, is read again from its commit (streams/runtime/stalls.py: Faust loses track after some
    # rebalances). Checked every stall_check_seconds.
    stall_patience_seconds: float = Field(default=120.0, gt=0)
    stall_check_seconds: float = Field(default=15.0, gt=0)
    # Faust table store: "rocksdb://" keeps state on disk under data_dir (a restart reads only the changelog
    # tail; see streams/runtime/tables.py), "memory://" rebuilds it from the changelogs at every start.
    table_store: str = Field(default="rocksdb://", pattern=r"^(rocksdb|memory)://")
    # Memory of each RocksDB table database (one per table and partition owned): two write buffers of
    # this size (one filling, one flushing) and a block cache. Faust's defaults, 3 x 64 MB and 2 GB per
    # database, allow a worker hundreds of MB of write buffers and gigabytes of cache under steady load.
    table_write_buffer_mb: int = Field(default=8, ge=1)
    table_block_cache_mb: int = Field(default=8, ge=1)
    escalation_check_seconds: float = Field(default=5.0, gt=0)
    # The clinical stage's state expiry timer (streams/domain/expiry.py): every this many seconds it judges
    # at most state_expiry_keys_per_tick keys of each table, resuming where it left off
    state_expiry_check_seconds: float = Field(default=5.0, gt=0)
    state_expiry_keys_per_tick: int = Field(default=500, ge=1)
    # How often the normaliser looks for raw.<institution>.<kind> topics created since it started
    raw_topic_scan_seconds: float = Field(default=60.0, gt=0)
    # Folder of the reference data (terminology, units, rules); None: the files shipped in streams/data
    reference_dir: Path | None = None


class ConsoleSettings(BaseSettings):
    """The clinician console (web + JSON API) and its notifications."""

    model_config = _config("CLINHUB_CONSOLE_")

    host: str = "127.0.0.1"
    port: int = Field(default=8400, ge=1, le=65535)
    # Session cookies are Secure (sent over HTTPS only; browsers also send them to http://127.0.0.1 and
    # http://localhost). Turn off only behind a proxy that terminates TLS on another host name.
    secure_cookies: bool = True
    session_hours: float = Field(default=12.0, gt=0)
    api_token_days: float = Field(default=90.0, gt=0)
    # How often the live feed looks for changed alerts in the store
    feed_poll_seconds: float = Field(default=0.5, gt=0)
    # An alert acknowledged without an action note is flagged "acknowledged, no action recorded" after this
    no_action_after_minutes: float = Field(default=30.0, gt=0)
    # Channels per institution, ward and severity (docs/console-notifications.md); None: none
    notifications_file: Path | None = None
    # The HMAC-SHA256 key of webhook signatures, unless a channel names its own key file
    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_sender: str = "clinhub@localhost"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    notify_max_attempts: int = Field(default=8, ge=1)
    notify_retry_max_seconds: float = Field(default=300.0, gt=0)
    notify_timeout_seconds: float = Field(default=5.0, gt=0)


class GatewaySettings(BaseSettings):
    """The gateways for what hospitals already send: HL7 v2 over MLLP, FHIR R4 over HTTP, CSV exports.

    The institution of a message comes from where it arrived (its listener, its client certificate, its
    token), never from the message itself."""

    model_config = _config("CLINHUB_GATEWAY_")

    host: str = "127.0.0.1"
    # MLLP: one listener port per institution
    mllp_listeners: dict[str, int] = Field(default_factory=lambda: {"H001": 2575, "H002": 2576, "C003": 2577})
    mllp_max_frame_bytes: int = Field(default=1_048_576, ge=1024)
    mllp_idle_timeout_seconds: float = Field(default=300.0, gt=0)
    mllp_max_connections: int = Field(default=256, ge=1)
    # TLS for the MLLP listeners (all of them) when a certificate is given; with a client CA, mutual TLS:
    # a client certificate is required and its subject CN must name the listener's institution, or be
    # mapped to it by mllp_tls_client_institutions (CN -> institution).
    mllp_tls_cert_file: Path | None = None
    mllp_tls_key_file: Path | None = None
    mllp_tls_client_ca_file: Path | None = None
    mllp_tls_client_institutions: dict[str, str] = Field(default_factory=dict)
    # The ACKs already sent, by sending facility and MSH-10, kept across restarts (resends get the same)
    ledger_path: Path = PROJECT_ROOT / ".data" / "gateway-ledger.sqlite3"
    ledger_days: float = Field(default=30.0, gt=0)
    # How long a message may wait for Kafka's confirmation before the sender is told to resend (AR, 503)
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    # The MLLP gateway's HTTP side: /metrics, /healthz, /readyz
    mllp_http_port: int = Field(default=9470, ge=0, le=65535)
    # FHIR R4 over HTTP (its /metrics, /healthz, /readyz on the same port)
    fhir_port: int = Field(default=8410, ge=1, le=65535)
    # Bearer tokens of the institutions: a file of lines "<institution> <sha256 hex of the token>"
    fhir_tokens_file: Path | None = None
    fhir_max_body_bytes: int = Field(default=10_485_760, ge=1024)
    # HTTPS only on the FHIR port (TLS 1.2+) when a certificate is given; with a client CA, mutual TLS: a
    # client certificate is required at the handshake and authenticates its institution (no token
    # needed), its subject CN naming it or mapped to it by fhir_tls_client_institutions (CN -> institution).
    fhir_tls_cert_file: Path | None = None
    fhir_tls_key_file: Path | None = None
    fhir_tls_client_ca_file: Path | None = None
    fhir_tls_client_institutions: dict[str, str] = Field(default_factory=dict)
    # Plain HTTP beyond loopback is refused (tokens would travel in clear) unless a TLS-terminating proxy
    # in front is said to be there
    fhir_allow_plain_http: bool = False


class InfraSettings(BaseSettings):
    """Where `clinhub infra` keeps the local services it starts, and their loopback ports."""

    model_config = _config("CLINHUB_INFRA_")

    home: Path = PROJECT_ROOT / ".infra"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    registry_port: int = 8081  # the authenticating TLS proxy clients reach
    registry_upstream_port: int = 8082  # Apicurio itself, behind it, loopback only
    postgres_port: int = 5433
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"  # the worker's /metrics; 0.0.0.0 in a container


class HubSettings(BaseSettings):
    """Everything together, as the command line builds it."""

    model_config = _config("CLINHUB_")

    kafka: KafkaSettings
    registry: RegistrySettings
    database: DatabaseSettings
    security: SecuritySettings
    stream: StreamSettings
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    infra: InfraSettings

    def as_principal(self, principal: str) -> HubSettings:
        """These settings for a component that connects to Kafka and the registry as `principal`."""
        return self.model_copy(
            update={
                "kafka": self.kafka.for_principal(principal),
                "registry": self.registry.for_principal(principal),
            }
        )


def local_stack_kafka(kafka: KafkaSettings, infra: InfraSettings) -> KafkaSettings:
    """The CA and principals' secrets of the local stack under CLINHUB_INFRA_HOME, unless set. A username
    given (CLINHUB_KAFKA_SASL_USERNAME) is one identity for every component: no principals' secrets."""
    local: dict[str, Path] = {"ssl_ca_location": infra.home / "tls" / "ca.crt"}
    if "sasl_username" not in kafka.model_fields_set:
        local["principal_secrets_dir"] = infra.home / "secrets" / "kafka"
    return kafka.model_copy(update={k: v for k, v in local.items() if k not in kafka.model_fields_set})


def local_stack_registry(registry: RegistrySettings, infra: InfraSettings) -> RegistrySettings:
    """The local stack's CA and registry principals' secrets, unless set (as `local_stack_kafka`)."""
    local: dict[str, Path] = {"ssl_ca_location": infra.home / "tls" / "ca.crt"}
    if "basic_auth_user" not in registry.model_fields_set:
        local["principal_secrets_dir"] = infra.home / "secrets" / "registry"
    return registry.model_copy(update={k: v for k, v in local.items() if k not in registry.model_fields_set})


def local_stack_database(database: DatabaseSettings, infra: InfraSettings) -> DatabaseSettings:
    """The local stack's CA and database roles' secrets, unless set (as `local_stack_kafka`)."""
    local: dict[str, Path] = {"ssl_ca_location": infra.home / "tls" / "ca.crt"}
    if "username" not in database.model_fields_set:
        local["role_secrets_dir"] = infra.home / "secrets" / "postgres"
    return database.model_copy(update={k: v for k, v in local.items() if k not in database.model_fields_set})


def load_settings() -> HubSettings:
    """Read the environment (and `.env`) once; call at the edge, pass the parts inward."""
    infra = InfraSettings()
    return HubSettings(
        kafka=local_stack_kafka(KafkaSettings(), infra),
        registry=local_stack_registry(RegistrySettings(), infra),
        database=local_stack_database(DatabaseSettings(), infra),
        security=SecuritySettings(),
        stream=StreamSettings(),
        console=ConsoleSettings(),
        gateway=GatewaySettings(),
        infra=infra,
    )
