import base64
import uuid
from unittest import mock

from clinhub.infra import kafka


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
