"""docker-compose.yml, checked by Docker Compose's own loader (`docker compose config`, no engine needed).

`scripts/validate-compose.sh` finds Compose v2 or builds it once from the Go module proxy; if it can do
neither, these tests fail (they never skip). The structural facts are read from Compose's resolved model
(`config --format json`), so YAML anchors, merge keys and short forms are already expanded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from clinhub.settings import InfraSettings
from streams.metrics import make_stream_metrics

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / "scripts" / "validate-compose.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
INSTALL_FAILED = 3  # the validator's status when Compose v2 can be neither found nor built

# A first run builds Compose from source (2-3 minutes on 2 cores); later runs take well under a second.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def run_validator(*args: str) -> subprocess.CompletedProcess[str]:
    # COMPOSE_* variables (COMPOSE_FILE, COMPOSE_PROFILES...) would change what is checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(
        ["bash", str(VALIDATOR), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1400,
        check=False,
    )


@pytest.fixture(scope="module")
def validator() -> str:
    result = run_validator("--install-only")
    assert result.returncode == 0, (
        f"Docker Compose v2 could not be found or installed:\n{result.stderr[-6000:]}"
    )
    return result.stderr


@pytest.fixture(scope="module")
def model(validator: str) -> dict[str, Any]:
    result = run_validator("--json", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def services(model: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = model["services"]
    return found


def kafka_nodes(services: dict[str, Any]) -> list[str]:
    return sorted(name for name in services if name.startswith("kafka"))


def test_compose_accepts_the_file() -> None:
    # Runs first and on its own (installing Compose if missing), so a missing validator is a failure here.
    result = run_validator(str(COMPOSE_FILE))
    assert result.returncode != INSTALL_FAILED, (
        f"Docker Compose v2 could not be found or installed:\n{result.stderr}"
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr


# Each break must make Compose itself refuse the file (status 1), with an error naming the problem.
BROKEN = {
    "unknown depends_on condition": (
        "condition: service_completed_successfully",
        "condition: service_finished",
        "depends_on.init.condition",
    ),
    "worker depends on a service that does not exist": (
        "\n  init:\n",
        "\n  setup:\n",
        'undefined service "init"',
    ),
    "misspelt top-level key": (
        "\nservices:\n",
        "\nservice:\n",
        "additional properties 'service' not allowed",
    ),
    "port that is not a port": ('"127.0.0.1:5433:5432"', '"127.0.0.1:5433:postgres"', "containerPort"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_compose_rejects_a_broken_copy(validator: str, tmp_path: Path, name: str) -> None:
    good, bad, named_in_error = BROKEN[name]
    text = COMPOSE_FILE.read_text()
    assert good in text, f"the test's break no longer applies to docker-compose.yml: {good!r}"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(good, bad))
    result = run_validator(str(broken))
    assert result.returncode not in (0, INSTALL_FAILED), (name, result.returncode, result.stderr)
    assert named_in_error in result.stderr, result.stderr


def test_every_service_the_readme_promises_exists(services: dict[str, Any]) -> None:
    for name in ("registry", "postgres", "init", "worker", "prometheus", "grafana"):
        assert name in services, f"no {name} service"
    assert kafka_nodes(services) == ["kafka-1", "kafka-2", "kafka-3"]
    assert services["simulator"]["profiles"] == ["demo"]
    for name in ("init", "worker", "simulator"):
        assert services[name]["build"]["context"] == str(ROOT)
        assert services[name]["image"] == services["worker"]["image"]


def test_kafka_is_a_three_node_kraft_cluster_and_topics_use_replication_3(services: dict[str, Any]) -> None:
    nodes = kafka_nodes(services)
    envs = [services[node]["environment"] for node in nodes]
    assert {services[node]["image"] for node in nodes} == {"apache/kafka:4.1.1"}
    assert {env["KAFKA_PROCESS_ROLES"] for env in envs} == {"broker,controller"}
    assert sorted(env["KAFKA_NODE_ID"] for env in envs) == ["1", "2", "3"]
    assert len({env["CLUSTER_ID"] for env in envs}) == 1
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in envs}
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    for env in envs:
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    bootstrap = ",".join(f"{node}:19092" for node in nodes)
    for name in ("init", "worker", "simulator"):
        env = services[name]["environment"]
        assert env["CLINHUB_KAFKA_TOPIC_REPLICATION"] == "3", name
        assert env["CLINHUB_KAFKA_BOOTSTRAP_SERVERS"] == bootstrap, name
        assert env["CLINHUB_REGISTRY_URL"] == "http://registry:8080/apis/ccompat/v7", name
        assert env["CLINHUB_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["CLINHUB_DATABASE_URL"].endswith("@postgres:5432/clinhub"), name


def test_registry_is_apicurio_with_kafkasql_storage(services: dict[str, Any]) -> None:
    registry = services["registry"]
    assert registry["image"] == "apicurio/apicurio-registry:3.0.9"
    assert registry["environment"]["APICURIO_STORAGE_KIND"] == "kafkasql"
    servers = registry["environment"]["APICURIO_KAFKASQL_BOOTSTRAP_SERVERS"].split(",")
    assert sorted(servers) == [f"{node}:19092" for node in kafka_nodes(services)]
    assert services["postgres"]["image"] == "postgres:16"


def test_infrastructure_has_healthchecks(services: dict[str, Any]) -> None:
    for name in [*kafka_nodes(services), "registry", "postgres"]:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_worker_starts_after_init_completes_and_init_after_healthy_services(services: dict[str, Any]) -> None:
    assert services["worker"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["simulator"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    init = services["init"]
    for name in [*kafka_nodes(services), "registry", "postgres"]:
        assert init["depends_on"][name]["condition"] == "service_healthy", name
    assert init["restart"] == "no"
    command = " ".join(init["command"])
    for step in ("clinhub db upgrade", "clinhub topics", "clinhub schemas register"):
        assert step in command
    assert services["worker"]["command"] == ["clinhub", "stream", "worker"]


def test_pseudonym_key_reaches_the_worker_only_as_a_secret(model: dict[str, Any]) -> None:
    assert model["secrets"]["pseudonym_key"]["environment"] == "CLINHUB_SECURITY_PSEUDONYM_KEY"
    worker = model["services"]["worker"]
    assert {s["source"] for s in worker["secrets"]} >= {"pseudonym_key"}
    assert worker["environment"]["CLINHUB_SECURITY_PSEUDONYM_KEY_FILE"] == "/run/secrets/pseudonym_key"
    for name, service in model["services"].items():
        assert "CLINHUB_SECURITY_PSEUDONYM_KEY" not in (service.get("environment") or {}), name


def test_prometheus_scrapes_the_worker_on_all_interfaces(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = services["worker"]["environment"]
    assert env["CLINHUB_INFRA_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - inside the container network
    port = env["CLINHUB_INFRA_METRICS_PORT"]
    assert f'"worker:{port}"' in PROMETHEUS_CONFIG.read_text()
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS_CONFIG)
    # The variable the compose file sets is the one the settings read.
    monkeypatch.setenv("CLINHUB_INFRA_METRICS_HOST", "0.0.0.0")  # noqa: S104
    monkeypatch.setenv("CLINHUB_INFRA_METRICS_PORT", port)
    infra = InfraSettings()
    assert (infra.metrics_host, infra.metrics_port) == ("0.0.0.0", int(port))  # noqa: S104
    monkeypatch.delenv("CLINHUB_INFRA_METRICS_HOST")
    assert InfraSettings().metrics_host == "127.0.0.1"


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    make_stream_metrics(registry)
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_grafana_is_provisioned_with_a_dashboard_on_real_metrics(services: dict[str, Any]) -> None:
    mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA_DIR / "provisioning")
    assert mounts["/etc/grafana/dashboards"] == str(GRAFANA_DIR / "dashboards")
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource
    assert "uid: prometheus" in datasource
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "clinhub.yml").read_text()
    assert "path: /etc/grafana/dashboards" in provider

    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "clinhub.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bclinhub_[a-z0-9_]+", expr)}
    assert used <= exported_metric_names(), used - exported_metric_names()
    assert {
        "clinhub_stream_events_total",
        "clinhub_stream_rejects_total",
        "clinhub_alerts_raised_total",
        "clinhub_end_to_end_seconds_bucket",
        "clinhub_stream_batch_seconds_bucket",
    } <= used
    assert any("histogram_quantile(0.95" in e and "clinhub_end_to_end_seconds_bucket" in e for e in exprs)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]


def test_image_is_built_as_non_root_from_the_sources_only() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert stages and all(line.startswith("FROM python:3.11-slim") for line in stages), stages
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must end as a non-root user"
    ignore_lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in ignore_lines if line.strip() and not line.startswith("#")}
    assert {".env", ".git", ".venv", ".infra", ".data"} <= ignored
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ") and "--from" not in line]
    for source in (s for sources in copied for s in sources):
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source not in ignored, f"Dockerfile copies {source}, which .dockerignore leaves out"
