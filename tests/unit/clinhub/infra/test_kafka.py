import base64
import stat
import sys
import uuid
from pathlib import Path
from unittest import mock

import pytest

from clinhub.exceptions import ServiceError
from clinhub.infra import kafka
from clinhub.infra.process import run_checked


def test_cluster_id_is_a_16_byte_urlsafe_id() -> None:
    decoded = base64.urlsafe_b64decode(kafka.cluster_id() + "==")
    assert len(decoded) == 16


def test_cluster_id_redraws_an_id_the_storage_tool_would_take_for_an_option() -> None:
    # 0xf8 encodes to a leading "-" in url-safe base64: the storage tool refused such an id in CI.
    leading_dash = uuid.UUID(bytes=b"\xf8" + bytes(15))
    plain = uuid.UUID(bytes=b"\x10" + bytes(15))
    assert base64.urlsafe_b64encode(leading_dash.bytes).startswith(b"-")
    with mock.patch.object(kafka.uuid, "uuid4", side_effect=[leading_dash, leading_dash, plain]):
        chosen = kafka.cluster_id()
    assert chosen == base64.urlsafe_b64encode(plain.bytes).decode().rstrip("=")


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_a_secure_broker_takes_clients_only_over_sasl_ssl_and_refuses_what_no_acl_allows(
    tmp_path: Path,
) -> None:
    layout = kafka.KafkaLayout(home=tmp_path / "kafka", port=19092, controller_port=19093, secure=True)
    config = properties(kafka._server_properties(layout))
    assert config["listeners"] == "SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert config["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL"
    assert config["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert config["authorizer.class.name"].endswith("StandardAuthorizer")
    assert config["allow.everyone.if.no.acl.found"] == "false"
    assert config["super.users"] == "User:admin;User:ANONYMOUS"
    password = layout.password_file("admin").read_text()
    assert stat.S_IMODE(layout.password_file("admin").stat().st_mode) == 0o600
    assert password in config["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    client = layout.settings_for("H001").client_config()
    assert (client["security.protocol"], client["sasl.username"]) == ("SASL_SSL", "H001")
    assert client["ssl.ca.location"] == str(layout.ca_file) and client["sasl.password"] != password


def test_a_failed_set_up_command_never_shows_the_password_it_was_given() -> None:
    with pytest.raises(ServiceError) as failed:
        run_checked(
            [sys.executable, "-c", "import sys; sys.exit(3)", "password=hunter2"], "x", secrets=["hunter2"]
        )
    assert "hunter2" not in str(failed.value) and "password=***" in str(failed.value)
