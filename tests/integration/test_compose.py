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
from core.settings import InfraSettings, StreamSettings
from sinks.metrics import SinkMetrics, make_sink_metrics
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
        "depends_on.init.condition",
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
    for name in ("registry", "postgres", "init", *WORKERS, "prometheus", "grafana"):
        assert name in services, f"no {name} service"
    assert kafka_nodes(services) == ["kafka-1", "kafka-2", "kafka-3"]
    # Exactly one worker per stage; no all-stages `worker` left beside them.
    assert sorted(name for name in services if name.startswith("worker")) == sorted(WORKERS)
    assert services["simulator"]["profiles"] == ["demo"]
    for name in hub_services():
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


def test_workers_start_after_init_completes_and_init_after_healthy_services(services: dict[str, Any]) -> None:
    for worker in WORKERS:
        depends_on = services[worker]["depends_on"]
        assert depends_on["init"]["condition"] == "service_completed_successfully", worker
        for name in [*kafka_nodes(services), "registry", "postgres"]:
            assert depends_on[name]["condition"] == "service_healthy", (worker, name)
        assert services[worker]["restart"] == "unless-stopped", worker
    simulator = services["simulator"]["depends_on"]
    assert simulator["init"]["condition"] == "service_completed_successfully"
    for worker in WORKERS:
        assert simulator[worker]["condition"] == "service_started", worker
    init = services["init"]
    for name in [*kafka_nodes(services), "registry", "postgres"]:
        assert init["depends_on"][name]["condition"] == "service_healthy", name
    assert init["restart"] == "no"
    command = " ".join(init["command"])
    for step in ("clinhub db upgrade", "clinhub topics", "clinhub schemas register"):
        assert step in command


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
        "clinhub_end_to_end_seconds_bucket",
        "clinhub_stream_batch_seconds_bucket",
        "clinhub_consumer_lag_messages",
    } <= used
    assert any("histogram_quantile(0.95" in e and "clinhub_end_to_end_seconds_bucket" in e for e in exprs)
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
