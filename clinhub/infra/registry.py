"""Apicurio Registry 3.x (Confluent-compatible API under /apis/ccompat/v7), from Maven Central.

`infra/registry/build.sh` unpacks the official server distribution; this module starts it on loopback.
Secure by default: Apicurio listens on a loopback port of its own (`upstream_port`) and clients reach it
only through the authenticating TLS proxy of `clinhub/infra/registry_proxy.py` on `port`.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from clinhub.exceptions import ServiceError
from clinhub.infra import registry_proxy
from clinhub.infra.process import (
    ServiceProcess,
    pid_from_file,
    port_open,
    run_checked,
    spawn,
    stop_recorded,
    wait_until,
)
from clinhub.infra.secrets import LocalCredentials, ensure_password
from core.principals import ADMIN
from core.settings import RegistrySettings

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "registry" / "build.sh"
CCOMPAT_PATH = "/apis/ccompat/v7"


@dataclass(frozen=True)
class RegistryLayout(LocalCredentials):
    SECRETS_KIND: ClassVar[str] = "registry"
    home: Path
    port: int = 8081
    persistent: bool = True
    heap: str = "256m"
    shared_app: Path | None = None
    secure: bool = True
    upstream_port: int = 0  # Apicurio's own (loopback, no client is given it); 0: port + 1
    tls_home: Path | None = None  # the local CA; default beside home
    secrets_home: Path | None = None  # the principals' password files; default beside home

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
        scheme = "https" if self.secure else "http"
        return f"{scheme}://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    @property
    def app_port(self) -> int:
        """Where Apicurio itself listens: behind the proxy when secure, else the clients' port."""
        return (self.upstream_port or self.port + 1) if self.secure else self.port

    @property
    def proxy(self) -> registry_proxy.ProxyLayout:
        return registry_proxy.ProxyLayout(
            home=self.home / "proxy",
            port=self.port,
            upstream_port=self.app_port,
            tls_dir=self.tls_dir,
            secrets_dir=self.secrets_dir,
        )

    def settings_for(self, principal: str) -> RegistrySettings:
        """Client settings of one principal (its password made on first use)."""
        if not self.secure:
            return RegistrySettings(url=self.url)
        proxy = self.proxy
        ensure_password(proxy.password_file(principal))
        return RegistrySettings(
            url=self.url,
            basic_auth_user=principal,
            basic_auth_password_file=proxy.password_file(principal),
            ssl_ca_location=proxy.tls_dir / "ca.crt",
        )


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


def proxy_answers(settings: RegistrySettings) -> bool:
    """The registry through the proxy, as a client reaches it (TLS verified, authenticated)."""
    from schemas.wire import ConfluentRegistry

    ConfluentRegistry(settings.client_config()).subjects()
    return True


def start(layout: RegistryLayout, principals: Iterable[str] = (), timeout: float = 120.0) -> ServiceProcess:
    """Apicurio, and when secure the proxy in front of it with a user for each of `principals` (and the
    admin); returns once clients can use it."""
    upstream = f"http://127.0.0.1:{layout.app_port}{CCOMPAT_PATH}"
    proc = _start_app(layout, upstream, timeout)
    if layout.secure:
        users = sorted({ADMIN, *principals})
        admin = layout.settings_for(ADMIN)
        registry_proxy.start(layout.proxy, users, lambda: proxy_answers(admin))
    return proc


def _start_app(layout: RegistryLayout, upstream: str, timeout: float) -> ServiceProcess:
    running = running_pid(layout)
    if running is not None:
        proc = ServiceProcess("registry", running, layout.log_path)
        wait_until(proc, lambda: registry_answers(upstream), timeout, "serving the ccompat API")
        return proc
    if port_open(layout.app_port):
        raise ServiceError("registry", f"port {layout.app_port} is taken by another process")
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
        f"-Dquarkus.http.port={layout.app_port}",
        "-Dquarkus.http.access-log.enabled=false",
        "-Dapicurio.rules.global.compatibility=BACKWARD_TRANSITIVE",
        *storage,
        "-jar",
        str(jar),
    ]
    proc = spawn("registry", argv, layout.log_path, layout.pid_path, cwd=layout.home)
    wait_until(proc, lambda: registry_answers(upstream), timeout, "serving the ccompat API")
    return proc


def running_pid(layout: RegistryLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: RegistryLayout) -> bool:
    proxy_stopped = registry_proxy.stop(layout.proxy) if layout.secure else False
    return stop_recorded(layout.pid_path) or proxy_stopped
