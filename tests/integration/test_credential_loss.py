"""A running worker whose principal loses its ACLs or its credentials stops, typed, and loses nothing.

Each test gives its worker a principal of its own, with the ACLs the stage principal it stands for has
on this test's topics and groups (the shared broker's `worker` and `store` serve every other test), and
revokes that one. The worker must exit non-zero within a bound, naming the principal (never its
password), and the event it had not stored must reach the store once access is back.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from clinhub.infra.acls import apply_grants, remove_acls, revoke_principal, set_passwords
from clinhub.infra.tls import write_private
from clinhub.kafka_acls import grants
from clinhub.provision import admin_config
from core import principals
from producers.publisher import make_publisher
from streams.runtime.app import app_id_for
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import rows_for, wait_for

pytestmark = pytest.mark.integration

ACL_LOSS_BOUND = 30.0  # seconds from the revocation to the worker's exit
CREDENTIAL_LOSS_BOUND = 40.0  # a changed password shows only on a new connection (the access watch's)


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    password_file: Path
    stands_for: str  # the stage principal whose ACLs it has

    @property
    def password(self) -> str:
        return self.password_file.read_text()


def own_principal(hub: HubEnv, stands_for: str) -> Principal:
    """A new principal with the ACLs `stands_for` has on this test's topics and groups."""
    name = f"lose-{uuid.uuid4().hex[:8]}"
    password_file = hub.workdir / "secrets" / f"{name}.password"
    write_private(password_file, secrets.token_urlsafe(24).encode())
    principal = Principal(name, password_file, stands_for)
    restore(hub, principal)
    return principal


def restore(hub: HubEnv, principal: Principal) -> None:
    """Its credentials and ACLs (again), as an operator gives access back; returns once it gets in."""
    config = admin_config(hub.settings)
    set_passwords(config, {principal.name: principal.password})
    own = [
        dataclasses.replace(grant, principal=principal.name)
        for grant in grants(hub.topics, hub.settings.stream)
        if grant.principal == principal.stands_for
    ]
    apply_grants(config, own)  # returns once the broker's authorizer holds them
    deadline = time.monotonic() + 30
    while True:  # the broker learns new credentials a moment after the controller has them
        try:
            AdminClient(client_config(hub, principal)).list_topics(timeout=2)
            return
        except KafkaException:
            assert time.monotonic() < deadline, f"{principal.name} cannot connect after being restored"


def client_config(hub: HubEnv, principal: Principal) -> dict[str, str]:
    return {
        **hub.settings.kafka.client_config(),
        "sasl.username": principal.name,
        "sasl.password": principal.password,
    }


def until_refused(hub: HubEnv, principal: Principal, topic: str) -> None:
    """Return once the broker refuses `principal` even a look at `topic` (its ACLs gone there)."""
    admin = AdminClient(client_config(hub, principal))
    deadline = time.monotonic() + 30
    while (found := admin.list_topics(topic=topic, timeout=5).topics.get(topic)) is None or not found.error:
        assert time.monotonic() < deadline, f"{principal.name} still sees {topic}"
        time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker_as(hub: HubEnv, principal: Principal, roles: str | None = None) -> Worker:
    """`hub.start_worker`, connecting as `principal` alone: its username and password file for every
    client, no per-component secrets (the environment is replaced, not merged)."""
    index = len(list(hub.workdir.glob("worker-*.log")))
    log_path = hub.workdir / f"worker-{index}.log"
    env = {k: v for k, v in hub.env().items() if k != "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR"}
    env.update(
        {
            "CLINHUB_KAFKA_SASL_USERNAME": principal.name,
            "CLINHUB_KAFKA_SASL_PASSWORD_FILE": str(principal.password_file),
            "CLINHUB_STREAM_DATA_DIR": str(hub.workdir / f"faust-{index}"),
        }
    )
    if roles is not None:
        env["CLINHUB_STREAM_ROLES"] = roles
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinhub.cli", "stream", "worker"],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=hub.workdir,
    )
    hub.workers.append(proc)
    return Worker(proc, log_path)


def publish_lab(hub: HubEnv, value: float) -> str:
    publisher = make_publisher(hub.settings, "H001")
    record = lab_record("H001", "K", value, "mmol/L")
    publisher.publish_lab(record)
    publisher.close()
    return str(record["envelope"]["event_id"])


def stops_within(hub: HubEnv, worker: Worker, seconds: float, since: float, principal: Principal) -> str:
    """The worker exits non-zero within `seconds` of `since`, saying which principal Kafka refused and
    never its password; returns its log. It is no longer one of the running workers `wait_for` watches."""
    while worker.proc.poll() is None:
        assert time.monotonic() - since < seconds, f"still running after {seconds:.0f}s:\n{worker.log()}"
        time.sleep(0.2)
    hub.workers.remove(worker.proc)
    log = worker.log()
    assert worker.proc.returncode != 0, log[-3000:]
    assert f"error: Kafka refused principal {principal.name}" in log, log[-3000:]
    assert principal.password not in log
    return log


def test_a_worker_whose_acls_and_credentials_are_revoked_stops_and_loses_nothing(hub: HubEnv) -> None:
    principal = own_principal(hub, principals.WORKER)
    worker = start_worker_as(hub, principal)
    first = publish_lab(hub, 4.0)
    wait_for(lambda: rows_for(hub, first) == 1, hub, 120, what="the first event stored")

    revoked = time.monotonic()
    assert revoke_principal(admin_config(hub.settings), principal.name) > 0  # `institutions revoke` does so
    second = publish_lab(hub, 4.1)

    log = stops_within(hub, worker, ACL_LOSS_BOUND, revoked, principal)
    assert "worker stopping, stages normaliser, clinical, store down" in log

    restore(hub, principal)
    start_worker_as(hub, principal)
    wait_for(lambda: rows_for(hub, second) == 1, hub, 120, what="the second event stored after the restart")
    assert rows_for(hub, first) == 1
    time.sleep(2)
    assert rows_for(hub, second) == 1, "stored once"


def test_a_store_worker_whose_acls_are_removed_stops_and_its_events_wait(hub: HubEnv) -> None:
    """Only the store stage, on its own principal (the normaliser runs as its shared one); its
    credentials stay, so the refusal is of its topics and group, on connections already open."""
    principal = own_principal(hub, principals.STORE)
    store = start_worker_as(hub, principal, roles='["store"]')
    hub.start_worker({"CLINHUB_STREAM_ROLES": '["normaliser"]'})
    first = publish_lab(hub, 4.0)
    wait_for(lambda: rows_for(hub, first) == 1, hub, 120, what="the first event stored")

    removed = time.monotonic()
    assert remove_acls(admin_config(hub.settings), principal.name) > 0
    until_refused(hub, principal, hub.topics.norm("lab"))
    second = publish_lab(hub, 4.2)

    log = stops_within(hub, store, ACL_LOSS_BOUND, removed, principal)
    assert "AUTHORIZATION_FAILED" in log or "authorization failed" in log, log[-3000:]
    normaliser_group = app_id_for(hub.settings.stream, ["normaliser"])
    raw = hub.topics.raw("H001", "lab")
    wait_for(lambda: hub.caught_up(normaliser_group, raw), hub, 60, what="the normaliser passed it on")
    assert rows_for(hub, second) == 0, "stored while the store was refused its topics"

    restore(hub, principal)
    start_worker_as(hub, principal, roles='["store"]')
    wait_for(lambda: rows_for(hub, second) == 1, hub, 120, what="the second event stored after the restart")


def test_a_worker_whose_password_is_changed_stops_within_its_bound(hub: HubEnv) -> None:
    """Its ACLs stay and its open connections keep working (Kafka authenticates a connection once): the
    access watch's new connection is refused, and once that has lasted the worker stops."""
    principal = own_principal(hub, principals.WORKER)
    worker = start_worker_as(hub, principal)
    first = publish_lab(hub, 4.0)
    wait_for(lambda: rows_for(hub, first) == 1, hub, 120, what="the first event stored")

    changed = time.monotonic()
    set_passwords(admin_config(hub.settings), {principal.name: secrets.token_urlsafe(24)})

    log = stops_within(hub, worker, CREDENTIAL_LOSS_BOUND, changed, principal)
    assert "Authentication failed" in log, log[-3000:]

    restore(hub, principal)  # its own password again, as a restart with the new one would have
    start_worker_as(hub, principal)
    second = publish_lab(hub, 4.3)
    wait_for(lambda: rows_for(hub, second) == 1, hub, 120, what="an event stored after the restart")
