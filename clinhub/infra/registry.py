"""Apicurio Registry 3.x (Confluent-compatible API under /apis/ccompat/v7), from Maven Central.

`infra/registry/build.sh` unpacks the official server distribution; this module starts it on loopback.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from clinhub.exceptions import ServiceError
from clinhub.infra.process import (
    ServiceProcess,
    pid_from_file,
    port_open,
    run_checked,
    spawn,
    stop_recorded,
    wait_until,
)

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "registry" / "build.sh"
CCOMPAT_PATH = "/apis/ccompat/v7"


@dataclass(frozen=True)
class RegistryLayout:
    home: Path
    port: int = 8081
    persistent: bool = True
    heap: str = "256m"
    shared_app: Path | None = None

    @property
    def app_dir(self) -> Path:
        return self.shared_app or self.home.parent / "registry-app"

    @property
    def log_path(self) -> Path:
        return self.home / "registry.log"

    @property
    def pid_path(self) -> Path:
        return self.home / "registry.pid"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"


def ensure_built(app_dir: Path) -> Path:
    if shutil.which("mvn") is None:
        raise ServiceError("registry", "Maven (mvn) is needed to fetch Apicurio Registry; install it")
    run_checked(["bash", str(BUILD_SCRIPT), str(app_dir)], "registry (maven fetch)")
    jars = sorted(app_dir.glob("apicurio-registry-app-*-runner.jar"))
    if not jars:
        raise ServiceError("registry", f"no runner jar in {app_dir} after the build")
    return jars[-1]


def registry_answers(url: str) -> bool:
    if not url.startswith("http://127.0.0.1:"):
        raise ServiceError("registry", f"only a loopback registry is probed, not {url}")
    with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:  # noqa: S310 - loopback http only
        return int(response.status) == 200


def start(layout: RegistryLayout, timeout: float = 120.0) -> ServiceProcess:
    running = running_pid(layout)
    if running is not None:
        proc = ServiceProcess("registry", running, layout.log_path)
        wait_until(proc, lambda: registry_answers(layout.url), timeout, "serving the ccompat API")
        return proc
    if port_open(layout.port):
        raise ServiceError("registry", f"port {layout.port} is taken by another process")
    jar = ensure_built(layout.app_dir)
    layout.home.mkdir(parents=True, exist_ok=True)
    java = shutil.which("java")
    if java is None:
        raise ServiceError("registry", "Java 17+ is needed to run the registry; install a JDK")
    storage = (
        [f"-Dapicurio.datasource.url=jdbc:h2:file:{layout.home / 'data' / 'registry'}"]
        if layout.persistent
        else []
    )
    argv = [
        java,
        f"-Xmx{layout.heap}",
        "-XX:+UseSerialGC",
        "-Dquarkus.http.host=127.0.0.1",
        f"-Dquarkus.http.port={layout.port}",
        "-Dquarkus.http.access-log.enabled=false",
        "-Dapicurio.rules.global.compatibility=BACKWARD_TRANSITIVE",
        *storage,
        "-jar",
        str(jar),
    ]
    proc = spawn("registry", argv, layout.log_path, layout.pid_path, cwd=layout.home)
    wait_until(proc, lambda: registry_answers(layout.url), timeout, "serving the ccompat API")
    return proc


def running_pid(layout: RegistryLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: RegistryLayout) -> bool:
    return stop_recorded(layout.pid_path)
