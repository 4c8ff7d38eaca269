"""docker-compose.yml, checked by Docker Compose's own loader (`docker compose config`, no engine needed).

`scripts/validate-compose.sh` finds Compose v2 or builds it once from the Go module proxy; if it can do
neither, these tests fail (they never skip). The structural facts are read from Compose's resolved model
(`config --format json`), so YAML anchors, merge keys and short forms are already expanded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer.main
from prometheus_client import CollectorRegistry

from clinhub.cli import app as cli_app
from clinhub.infra.compose_secrets import Owners, Topology, make
from core import principals
from core.settings import DatabaseSettings, InfraSettings, KafkaSettings, StreamSettings
from sinks.metrics import SinkMetrics, make_sink_metrics
from sinks.privileges import CONSOLE as CONSOLE_ROLE
from sinks.privileges import OWNER
from sinks.privileges import STORE as STORE_ROLE
from streams.metrics import StreamMetrics, make_stream_metrics

ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / "scripts" / "validate-compose.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
INSTALL_FAILED = 3  # the validator's status when Compose v2 can be neither found nor built
# One stream worker service per stage (`clinhub stream worker --role <stage>`): the layout that scales out.
WORKERS = {"worker-normaliser": "normaliser", "worker-clinical": "clinical", "worker-store": "store"}

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


@pytest.fixture(scope="module")
def prometheus(validator: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml as parsed by a real YAML loader: Compose's, as an extension field
    of an otherwise empty project (the venv has no YAML library; `$` is escaped from interpolation)."""
    wrapper = tmp_path_factory.mktemp("prometheus") / "docker-compose.yml"
    config = textwrap.indent(PROMETHEUS_CONFIG.read_text().replace("$", "$$"), "  ")
    wrapper.write_text(f"name: prometheus-config\nservices: {{}}\nx-prometheus:\n{config}")
    result = run_validator("--json", str(wrapper))
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)["x-prometheus"]
    return parsed


def kafka_nodes(services: dict[str, Any]) -> list[str]:
    return sorted(name for name in services if name.startswith("kafka"))


def hub_services() -> list[str]:
    """The services that run the hub's image."""
    return ["init", *WORKERS, "simulator"]


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus' `replace` relabelling (the only action prometheus.yml uses), enough to read its labels."""
    out = dict(labels)
    for config in configs:
        assert config.get("action", "replace") == "replace", config
        value = config.get("separator", ";").join(out.get(name, "") for name in config["source_labels"])
        match = re.fullmatch(config.get("regex", "(.*)"), value)  # Prometheus anchors the regex
        if match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", config.get("replacement", "$1"))
            out[config["target_label"]] = match.expand(replacement)
    return out


def worker_job(prometheus: dict[str, Any]) -> dict[str, Any]:
    """The scrape job whose DNS discovery names the worker services."""
    jobs = [
        job
        for job in prometheus["scrape_configs"]
        if any(set(sd["names"]) & set(WORKERS) for sd in job.get("dns_sd_configs", []))
    ]
    assert len(jobs) == 1, jobs
    return jobs[0]


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
        "condition value must be one of 'service_started'",
    ),
    "the workers depend on a service that does not exist": (
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
    # The worker services share their settings through the x-worker anchor, so it must be the one they use.
    "worker services merge an anchor that does not exist": (
        "<<: *worker\n",
        "<<: *workers\n",
        "unknown anchor 'workers' referenced",
    ),
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
    for name in (
        "secrets",
        "registry",
        "registry-proxy",
        "postgres",
        "init",
        *WORKERS,
        "prometheus",
        "grafana",
    ):
        assert name in services, f"no {name} service"
    assert kafka_nodes(services) == ["kafka-1", "kafka-2", "kafka-3"]
    # Exactly one worker per stage; no all-stages `worker` left beside them.
    assert sorted(name for name in services if name.startswith("worker")) == sorted(WORKERS)
    assert services["simulator"]["profiles"] == ["demo"]
    for name in ["secrets", *hub_services()]:
        assert services[name]["build"]["context"] == str(ROOT)
        assert services[name]["image"] == services["init"]["image"]


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
    for name in hub_services():
        env = services[name]["environment"]
        assert env["CLINHUB_KAFKA_TOPIC_REPLICATION"] == "3", name
        assert env["CLINHUB_KAFKA_BOOTSTRAP_SERVERS"] == bootstrap, name
        assert env["CLINHUB_REGISTRY_URL"] == "https://registry-proxy:8443/apis/ccompat/v7", name
        # no user or password in the URL: each service's role and its password file (see below)
        assert env["CLINHUB_DATABASE_URL"] == "postgresql+psycopg://postgres:5432/clinhub", name


def test_registry_is_apicurio_with_its_schemas_in_postgres_over_tls(services: dict[str, Any]) -> None:
    registry = services["registry"]
    assert registry["image"] == "apicurio/apicurio-registry:3.0.9"
    env = registry["environment"]
    assert env["APICURIO_STORAGE_KIND"] == "sql"
    assert env["APICURIO_STORAGE_SQL_KIND"] == "postgresql"
    assert env["APICURIO_DATASOURCE_URL"] == (
        "jdbc:postgresql://postgres:5432/registry?sslmode=verify-full&sslrootcert=/run/clinhub/ca.crt"
    )
    assert env["APICURIO_DATASOURCE_USERNAME"] == "registry"
    assert "APICURIO_DATASOURCE_PASSWORD" not in env  # in its file (QUARKUS_CONFIG_LOCATIONS)
    assert env["QUARKUS_CONFIG_LOCATIONS"] == "/run/clinhub/application.properties"
    assert registry["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"] == "postgres:16"


def test_infrastructure_has_healthchecks(services: dict[str, Any]) -> None:
    for name in [*kafka_nodes(services), "registry", "registry-proxy", "postgres"]:
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_workers_start_after_init_completes_and_init_after_healthy_services(services: dict[str, Any]) -> None:
    for worker in WORKERS:
        depends_on = services[worker]["depends_on"]
        assert depends_on["init"]["condition"] == "service_completed_successfully", worker
        for name in [*kafka_nodes(services), "registry-proxy", "postgres"]:
            assert depends_on[name]["condition"] == "service_healthy", (worker, name)
        assert services[worker]["restart"] == "unless-stopped", worker
    simulator = services["simulator"]["depends_on"]
    assert simulator["init"]["condition"] == "service_completed_successfully"
    for worker in WORKERS:
        assert simulator[worker]["condition"] == "service_started", worker
    init = services["init"]
    for name in [*kafka_nodes(services), "registry-proxy", "postgres"]:
        assert init["depends_on"][name]["condition"] == "service_healthy", name
    assert init["restart"] == "no"
    command = " ".join(init["command"])
    steps = ("clinhub infra credentials", "clinhub db upgrade", "clinhub topics", "clinhub schemas register")
    assert [command.index(step) for step in steps] == sorted(command.index(step) for step in steps)


def test_each_worker_runs_one_stage_and_together_they_run_all(services: dict[str, Any]) -> None:
    # The stages are the ones the hub knows (all of them run by a worker given no role).
    assert sorted(WORKERS.values()) == sorted(StreamSettings.model_fields["roles"].default)
    worker_command = typer.main.get_command(cli_app).commands["stream"].commands["worker"]  # type: ignore[attr-defined]
    for name, role in WORKERS.items():
        command = services[name]["command"]
        assert command[:3] == ["clinhub", "stream", "worker"], name
        # Parsed by the `clinhub` command itself: an option it does not know is an error here.
        params = worker_command.make_context("worker", list(command[3:])).params
        assert params["role"] == [role], (name, command)


def test_workers_are_safe_to_scale_and_never_share_table_state(model: dict[str, Any]) -> None:
    named_volumes = set(model.get("volumes") or {})
    for name in WORKERS:
        worker = model["services"][name]
        # Replicas of a scaled service cannot share a container name or a host port.
        assert "container_name" not in worker, name
        assert not worker.get("ports"), name
        # RocksDB state under the data dir belongs to one process: an anonymous volume (one per
        # container, no source), never a named volume or bind mount every replica would open.
        data_dir = Path(worker["environment"]["CLINHUB_STREAM_DATA_DIR"])
        mounts = [v for v in worker.get("volumes") or [] if data_dir.is_relative_to(v["target"])]
        assert len(mounts) == 1, (name, worker.get("volumes"))
        assert mounts[0]["type"] == "volume", (name, mounts[0])
        assert not mounts[0].get("source"), f"{name} shares its table state: {mounts[0]}"
        for volume in worker.get("volumes") or []:
            if volume.get("source") == "secrets":  # its credentials, the same for every replica, read-only
                assert volume["read_only"] and volume["volume"]["subpath"] == name, (name, volume)
                continue
            assert volume.get("source") not in named_volumes, (name, volume)


def test_pseudonym_key_reaches_the_workers_only_as_a_secret(model: dict[str, Any]) -> None:
    assert model["secrets"]["pseudonym_key"]["environment"] == "CLINHUB_SECURITY_PSEUDONYM_KEY"
    # Only the normaliser computes pseudonyms; the other stages start without the key.
    holders = {
        name
        for name, service in model["services"].items()
        if "pseudonym_key" in {s["source"] for s in service.get("secrets") or []}
    }
    assert holders == {"worker-normaliser"}
    for name in WORKERS:
        env = model["services"][name]["environment"]
        expected = "/run/secrets/pseudonym_key" if name in holders else None
        assert env.get("CLINHUB_SECURITY_PSEUDONYM_KEY_FILE") == expected, name
        assert env["CLINHUB_INFRA_METRICS_PORT"] in ("9464", 9464), name
    for name, service in model["services"].items():
        assert "CLINHUB_SECURITY_PSEUDONYM_KEY" not in (service.get("environment") or {}), name


def test_prometheus_scrapes_every_replica_of_every_worker_on_all_interfaces(
    services: dict[str, Any], prometheus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = set()
    for name in WORKERS:
        env = services[name]["environment"]
        assert env["CLINHUB_INFRA_METRICS_HOST"] == "0.0.0.0", name  # noqa: S104 - in the container network
        ports.add(env["CLINHUB_INFRA_METRICS_PORT"])
        assert env["CLINHUB_INFRA_METRICS_PORT"] in services[name]["expose"], name
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{env['CLINHUB_INFRA_METRICS_PORT']}/metrics" in probe, name
    assert len(ports) == 1, ports
    port = ports.pop()
    # DNS discovery (type A): a service's name resolves to all its replicas, so `--scale` adds targets.
    job = worker_job(prometheus)
    discovered = {}
    for sd in job["dns_sd_configs"]:
        assert sd["type"] == "A" and sd["port"] == int(port), sd
        discovered.update(dict.fromkeys(sd["names"], sd))
    assert sorted(discovered) == sorted(WORKERS)
    for name, role in WORKERS.items():
        labels = relabel(
            {"__address__": f"172.18.0.9:{port}", "__meta_dns_name": name}, job["relabel_configs"]
        )
        assert labels["role"] == role, labels
        assert labels["service"] == name, labels
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS_CONFIG)
    # The variable the compose file sets is the one the settings read.
    monkeypatch.setenv("CLINHUB_INFRA_METRICS_HOST", "0.0.0.0")  # noqa: S104
    monkeypatch.setenv("CLINHUB_INFRA_METRICS_PORT", port)
    infra = InfraSettings()
    assert (infra.metrics_host, infra.metrics_port) == ("0.0.0.0", int(port))  # noqa: S104
    monkeypatch.delenv("CLINHUB_INFRA_METRICS_HOST")
    assert InfraSettings().metrics_host == "127.0.0.1"


def exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name a worker exports for the hub, with its labels: the real metric factories (the
    stream stages' and the store writer's) on a fresh registry. Counters export `<name>_total`,
    histograms `_bucket` (labelled `le`), `_sum` and `_count`."""
    registry = CollectorRegistry()
    built: list[StreamMetrics | SinkMetrics] = [make_stream_metrics(registry), make_sink_metrics(registry)]
    # prometheus_client shows a metric's label names on the metric object only, not on its collected family.
    labels = {
        metric._name: frozenset(metric._labelnames)
        for metrics in built
        for metric in (getattr(metrics, field.name) for field in dataclasses.fields(metrics))
    }
    names: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        assert family.name in labels, f"{family.name} is registered outside the metrics dataclasses"
        own = labels[family.name]
        if family.type == "counter":
            names[f"{family.name}_total"] = own
        elif family.type == "histogram":
            names[f"{family.name}_bucket"] = own | {"le"}
            names.update(dict.fromkeys((f"{family.name}_sum", f"{family.name}_count"), own))
        else:
            names[family.name] = own
    return names


# An aggregation keeps only the labels of its `by (...)` clause (none without one). The dashboard writes
# the clause before the operand: `sum by (stage) (...)`.
AGGREGATION = re.compile(
    r"\b(?:sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile)\s*(?:by\s*\(([^)]*)\))?\s*\("
)
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")


def test_grafana_is_provisioned_with_a_dashboard_on_real_metrics(
    services: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    mounts = {v["target"]: v["source"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA_DIR / "provisioning")
    assert mounts["/etc/grafana/dashboards"] == str(GRAFANA_DIR / "dashboards")
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource
    assert "uid: prometheus" in datasource
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "clinhub.yml").read_text()
    assert "path: /etc/grafana/dashboards" in provider

    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "clinhub.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exported = exported_metrics()
    used = {name for expr in exprs for name in re.findall(r"\bclinhub_[a-z0-9_]+", expr)}
    assert used <= set(exported), used - set(exported)
    assert {
        "clinhub_stream_events_total",
        "clinhub_stream_rejects_total",
        "clinhub_alerts_raised_total",
        "clinhub_store_end_to_end_seconds_bucket",
        "clinhub_stream_batch_seconds_bucket",
        "clinhub_consumer_lag_messages",
    } <= used
    assert any(
        "histogram_quantile(0.95" in e and "clinhub_store_end_to_end_seconds_bucket" in e for e in exprs
    )
    # Jobs the dashboard selects are jobs Prometheus scrapes.
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    used_jobs = {job for expr in exprs for job in re.findall(r'\bjob="([^"]+)"', expr)}
    assert used_jobs and used_jobs <= jobs, used_jobs - jobs
    # Labels a query filters on or a legend names are ones its series carry: the metric's own or those of
    # the workers' scrape (all `up` has); an aggregation keeps only its `by` labels. Every query reads the
    # workers' job, so those are the scrape labels to allow.
    workers = worker_job(prometheus)
    scrape_labels = {"job", "instance"} | {c["target_label"] for c in workers["relabel_configs"]}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert set(re.findall(r'\bjob="([^"]+)"', expr)) <= {workers["job_name"]}, (panel["title"], expr)
            for name, matchers in SELECTOR.findall(expr):
                assert name == "up" or name in exported, (panel["title"], name)
                own = scrape_labels | exported.get(name, frozenset())
                filtered = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
                assert filtered <= own, (panel["title"], name, filtered - own)
                stages = set(re.findall(r'\bstage="([^"]*)"', matchers))
                assert stages <= set(WORKERS.values()), (panel["title"], stages)
            metrics = re.findall(r"\bclinhub_[a-z0-9_]+", expr)
            carried = scrape_labels.union(*(exported[name] for name in metrics))
            for kept in AGGREGATION.findall(expr):
                carried &= {label.strip() for label in kept.split(",") if label.strip()}
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= carried, (panel["title"], legend - carried)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


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


# ---------------------------------------------------------------- security (README "With Docker")

# What each hub service's part of the `secrets` volume holds: its principals' passwords and its role's
ADMIN_PRINCIPALS = ("admin", "normaliser", "clinical", "store", *StreamSettings().institutions)
OWN_SECRETS = {
    "init": {"kafka": set(ADMIN_PRINCIPALS), "registry": set(ADMIN_PRINCIPALS), "postgres": {OWNER}},
    "worker-normaliser": {"kafka": {"normaliser"}, "registry": {"normaliser"}},
    "worker-clinical": {"kafka": {"clinical"}, "registry": {"clinical"}},
    "worker-store": {"kafka": {"store"}, "registry": {"store"}, "postgres": {STORE_ROLE}},
    "simulator": {
        "kafka": set(StreamSettings().institutions),
        "registry": set(StreamSettings().institutions),
    },
}
# The values a user chooses (.env); everything secret beyond them is made by the `secrets` service
USER_VARIABLES = {
    "CLINHUB_SECURITY_PSEUDONYM_KEY",
    "GRAFANA_ADMIN_PASSWORD",
    "CLINHUB_LOG_LEVEL",
    "CLINHUB_IMAGE_TAG",
    "SIMULATOR_COUNT",
    "SIMULATOR_RATE",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `secrets` volume as its service makes it with its default settings (the compose names)."""
    root = tmp_path_factory.mktemp("compose-secrets") / "secrets"
    make(root)
    return root


def secrets_mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's mounts of the `secrets` volume, by target."""
    return {v["target"]: v for v in service.get("volumes") or [] if v.get("source") == "secrets"}


def protocols(env: dict[str, str]) -> dict[str, str]:
    return dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))


def listeners(value: str) -> dict[str, str]:
    """listener name -> host:port."""
    return {item.split("://")[0]: item.split("://")[1] for item in value.split(",")}


def test_the_secrets_service_runs_first_and_every_other_service_waits_for_it(
    services: dict[str, Any],
) -> None:
    service = services["secrets"]
    command = service["command"]
    assert command[:3] == ["clinhub", "infra", "secrets"]
    # parsed by `clinhub` itself: an option it does not know is an error here
    secrets_command = typer.main.get_command(cli_app).commands["infra"].commands["secrets"]  # type: ignore[attr-defined]
    params = secrets_command.make_context("secrets", list(command[3:])).params
    assert params["directory"] == Path("/secrets")
    assert service["user"] == "0:0"  # it gives each file to the user of the service that reads it
    assert service["network_mode"] == "none"
    assert service["restart"] == "no"
    assert [(v["source"], v["target"], bool(v.get("volume"))) for v in service["volumes"]] == [
        ("secrets", "/secrets", False)  # the whole volume: no subpath
    ]
    for name, other in services.items():
        if name != "secrets":
            assert other["depends_on"]["secrets"]["condition"] == "service_completed_successfully", name
    # its defaults are the compose file's names, which its certificates carry
    topology = Topology()
    assert topology.kafka == tuple(services[node]["hostname"] for node in kafka_nodes(services))
    assert (
        f"https://{topology.registry_proxy}:{topology.registry_proxy_port}/"
        in (services["init"]["environment"]["CLINHUB_REGISTRY_URL"])
    )
    assert topology.registry_upstream == "registry:8080"
    assert "//postgres:5432/" in services["init"]["environment"]["CLINHUB_DATABASE_URL"]


def test_no_broker_has_a_plaintext_listener_for_clients(services: dict[str, Any]) -> None:
    for node in kafka_nodes(services):
        env = services[node]["environment"]
        protocol = protocols(env)
        bound = listeners(env["KAFKA_LISTENERS"])
        advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
        assert set(bound) == set(protocol) == {"INTERNAL", "EXTERNAL", "CONTROLLER"}, node
        assert "PLAINTEXT" not in protocol.values() and "SASL_PLAINTEXT" not in protocol.values(), node
        # clients are given SASL_SSL listeners only; the controllers' is never advertised
        assert {protocol[name] for name in advertised} == {"SASL_SSL"}, node
        assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
        assert protocol["CONTROLLER"] == "SSL"
        assert env["KAFKA_LISTENER_NAME_CONTROLLER_SSL_CLIENT_AUTH"] == "required", node  # mutual TLS
        published = {int(port["target"]) for port in services[node].get("ports") or []}
        assert published == {int(advertised["EXTERNAL"].rsplit(":", 1)[1])}, node
        assert int(bound["CONTROLLER"].rsplit(":", 1)[1]) not in published, node
        # the image demands JKS keystores (KAFKA_SSL_KEYSTORE_FILENAME...) for an advertised listener named
        # *SSL://; these are PEM files, so no listener may be named so
        assert "SSL://" not in env["KAFKA_ADVERTISED_LISTENERS"], node


def test_every_broker_takes_scram_over_tls_and_refuses_what_no_acl_allows(
    services: dict[str, Any], generated: Path
) -> None:
    nodes = kafka_nodes(services)
    for node in nodes:
        service = services[node]
        env = service["environment"]
        assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512", node
        assert protocols(env)[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "SASL_SSL", node
        assert env["KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL"] == "SCRAM-SHA-512", node
        assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
        assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false", node
        # the admin, and the brokers by their certificates on the controller listener; no ANONYMOUS
        assert env["KAFKA_SUPER_USERS"].split(";") == ["User:admin", *(f"User:CN={n}" for n in nodes)], node
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        # TLS and SASL files from this broker's own part of the `secrets` volume
        mount = secrets_mounts(service)["/run/clinhub"]
        assert mount["read_only"] and mount["volume"]["subpath"] == node, node
        files = {
            env["KAFKA_SSL_KEYSTORE_LOCATION"]: "keystore.pem",
            env["KAFKA_SSL_TRUSTSTORE_LOCATION"]: "ca.crt",
            env["KAFKA_OPTS"].removeprefix("-Djava.security.auth.login.config="): "jaas.conf",
        }
        assert (env["KAFKA_SSL_KEYSTORE_TYPE"], env["KAFKA_SSL_TRUSTSTORE_TYPE"]) == ("PEM", "PEM")
        for path, name in files.items():
            assert path == f"/run/clinhub/{name}" and (generated / node / name).is_file(), (node, path)
        assert "ScramLoginModule" in (generated / node / "jaas.conf").read_text()
        # SCRAM credentials at format time: deploy/kafka/start.sh with the admin's --add-scram arguments
        assert service["command"] == ["bash", "/opt/clinhub/start.sh"], node
        binds = {v["target"]: v["source"] for v in service["volumes"] if v["type"] == "bind"}
        assert binds["/opt/clinhub/start.sh"] == str(ROOT / "deploy" / "kafka" / "start.sh")
        assert (
            (generated / node / "scram.args")
            .read_text()
            .startswith("--add-scram\nSCRAM-SHA-512=[name=admin,")
        )
        check = " ".join(service["healthcheck"]["test"])
        assert "--command-config /run/clinhub/client.properties" in check, node
        assert "security.protocol=SASL_SSL" in (generated / node / "client.properties").read_text()


def test_each_hub_service_connects_as_its_own_principal_with_only_its_own_secrets(
    services: dict[str, Any], generated: Path
) -> None:
    for name, expected in OWN_SECRETS.items():
        service = services[name]
        env = service["environment"]
        assert env["CLINHUB_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", name
        assert env["CLINHUB_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", name
        assert "CLINHUB_KAFKA_SASL_USERNAME" not in env, name  # the principal is chosen by the work
        mount = secrets_mounts(service)["/run/clinhub"]
        assert mount.get("read_only", False) == (name != "init"), name  # init adds institutions there
        part = generated / mount["volume"]["subpath"]
        assert env["CLINHUB_INFRA_HOME"] == "/run/clinhub"

        def inside(path: str | Path, part: Path = part, name: str = name) -> Path:
            relative = Path(path).relative_to("/run/clinhub")
            assert (part / relative).exists(), (name, path)
            return part / relative

        for variable in (
            "CLINHUB_KAFKA_SSL_CA_LOCATION",
            "CLINHUB_REGISTRY_SSL_CA_LOCATION",
            "CLINHUB_DATABASE_SSL_CA_LOCATION",
        ):
            assert inside(env[variable]).read_bytes() == (generated / "ca" / "ca.crt").read_bytes(), name
        kinds = {
            "kafka": "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR",
            "registry": "CLINHUB_REGISTRY_PRINCIPAL_SECRETS_DIR",
        }
        for kind, variable in kinds.items():
            held = {p.stem for p in inside(env[variable]).glob("*.password")}
            assert held == expected[kind], (name, kind)
        postgres = part / "secrets" / "postgres"
        held = {p.stem for p in postgres.glob("*.password")} if postgres.exists() else set()
        assert held == expected.get("postgres", set()), name
        assert env["CLINHUB_DATABASE_ROLE_SECRETS_DIR"] == "/run/clinhub/secrets/postgres", name
        assert env["CLINHUB_DATABASE_SSL_MODE"] == "verify-full", name
    # the principal each worker's settings pick (clinhub stream worker: worker_principal of its roles)
    for name, stage in WORKERS.items():
        env = {k: str(v) for k, v in services[name]["environment"].items() if k.startswith("CLINHUB_KAFKA_")}
        kafka = KafkaSettings(**{k.removeprefix("CLINHUB_KAFKA_").lower(): v for k, v in env.items()})
        chosen = kafka.for_principal(principals.worker_principal([stage]))
        assert chosen.sasl_username == stage
        assert chosen.sasl_password_file is not None
        relative = chosen.sasl_password_file.relative_to("/run/clinhub")
        assert (generated / name / relative).is_file(), name
    store_env = services["worker-store"]["environment"]
    database = DatabaseSettings(
        url=store_env["CLINHUB_DATABASE_URL"],
        role_secrets_dir=Path(store_env["CLINHUB_DATABASE_ROLE_SECRETS_DIR"]),
    ).for_role(STORE_ROLE)
    assert database.username == STORE_ROLE and database.password_file is not None
    assert (generated / "worker-store" / database.password_file.relative_to("/run/clinhub")).is_file()


def test_the_registry_is_reached_only_through_its_authenticating_tls_proxy(
    model: dict[str, Any], generated: Path
) -> None:
    services = model["services"]
    registry, proxy = services["registry"], services["registry-proxy"]
    assert not registry.get("ports"), "Apicurio itself is published"
    assert list(registry["networks"]) == ["registry"]
    assert model["networks"]["registry"]["internal"] is True
    on_registry_network = {name for name, s in services.items() if "registry" in (s.get("networks") or {})}
    assert on_registry_network == {"registry", "registry-proxy", "postgres"}
    assert proxy["image"].startswith("nginx:")
    assert proxy["user"] == f"{Owners().hub}:{Owners().hub}"  # the hub's: init rewrites the users file
    assert [(p["host_ip"], int(p["target"])) for p in proxy["ports"]] == [("127.0.0.1", 8443)]
    assert proxy["command"][:3] == ["nginx", "-c", "/run/clinhub/nginx.conf"]
    mounts = {target: v["volume"]["subpath"] for target, v in secrets_mounts(proxy).items()}
    assert mounts == {"/run/clinhub": "registry-proxy", "/run/clinhub-users": "admin/registry/proxy"}
    config = (generated / "registry-proxy" / "nginx.conf").read_text()
    assert "listen 8443 ssl;" in config and "proxy_pass http://registry:8080;" in config
    assert "auth_basic_user_file /run/clinhub-users/htpasswd;" in config
    assert "ssl_certificate /run/clinhub/server.crt;" in config
    assert '"1:admin" 0;' in config  # changes for the admin only
    # Apicurio's own part: its database password and the CA, nothing else
    assert sorted(p.name for p in (generated / "registry").iterdir()) == ["application.properties", "ca.crt"]


def test_postgres_takes_tls_and_scram_sha_256_only(services: dict[str, Any], generated: Path) -> None:
    postgres = services["postgres"]
    settings = dict(
        postgres["command"][i + 1].split("=", 1) for i, part in enumerate(postgres["command"]) if part == "-c"
    )
    assert postgres["command"][0] == "postgres"
    assert settings["ssl"] == "on"
    assert settings["password_encryption"] == "scram-sha-256"  # noqa: S105 - a method, not a password
    mounts = secrets_mounts(postgres)
    assert mounts["/run/clinhub"]["volume"]["subpath"] == "postgres"
    assert mounts["/docker-entrypoint-initdb.d"]["volume"]["subpath"] == "postgres/initdb"
    assert all(m["read_only"] for m in mounts.values())
    for key in ("ssl_cert_file", "ssl_key_file", "hba_file"):
        assert (generated / "postgres" / Path(settings[key]).relative_to("/run/clinhub")).is_file(), key
    hba = (generated / "postgres" / Path(settings["hba_file"]).name).read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    for rule in rules:
        kind, method = rule[0], rule[-1]
        if kind == "local":  # the entrypoint's superuser on the socket; everyone else refused there
            assert (rule[2], method) == ("postgres", "peer") or method == "reject", rule
        elif method != "reject":
            assert (kind, method) == ("hostssl", "scram-sha-256"), rule
            assert rule[2] != "postgres", rule
    assert rules[-1] == ["host", "all", "all", "all", "reject"]
    env = postgres["environment"]
    assert "POSTGRES_PASSWORD" not in env
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/clinhub/postgres.password"  # noqa: S105 - a path
    roles = (generated / "postgres" / "initdb" / "10-clinhub-roles.sql").read_text()
    for role in (OWNER, STORE_ROLE, CONSOLE_ROLE, "registry"):
        assert f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE' in roles
    assert 'CREATE DATABASE "clinhub" OWNER "clinhub_owner"' in roles
    assert "clinhub db upgrade" in " ".join(services["init"]["command"])  # as the owner: it grants the rest


def test_no_secret_value_is_in_the_compose_file(model: dict[str, Any], generated: Path) -> None:
    text = COMPOSE_FILE.read_text()
    variables = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert variables <= USER_VARIABLES, variables - USER_VARIABLES
    assert "POSTGRES_PASSWORD:" not in text
    made = [p.read_text().strip() for p in generated.rglob("*.password")]
    for name, service in model["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|_KEY\b|_KEY_", key):
                assert key.endswith(("_FILE", "_DIR")), (name, key)  # where a secret is, never its value
            assert "password=" not in str(value).lower(), (name, key)
            assert "@" not in str(value) or not str(value).startswith(("postgresql", "jdbc")), (name, key)
        for secret in made:
            assert secret not in json.dumps(service), name
    for line in text.splitlines():
        assert not re.search(r"password\s*[:=]\s*[^\s${]", line, re.IGNORECASE) or "_FILE" in line, line


def test_published_ports_are_on_loopback_and_no_gateway_or_console_runs_without_tls(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert port["host_ip"] == "127.0.0.1", (name, port)
        command = " ".join(service.get("command") or [])
        # none runs today; one added must serve TLS (a FHIR gateway beyond loopback refuses to start without)
        if "gateway fhir" in command:
            assert service["environment"].get("CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE"), name
        if "gateway mllp" in command:
            assert service["environment"].get("CLINHUB_GATEWAY_MLLP_TLS_CERT_FILE"), name
        assert not command.startswith("clinhub console"), "the console needs TLS in front of it"
