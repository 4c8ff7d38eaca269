"""nginx in front of the schema registry: TLS with the local CA's certificate, HTTP basic authentication
per principal, and schema registration for the admin only.

Apicurio Registry authenticates only through an OpenID Connect server (Keycloak), which does not run
here, so a small authenticating reverse proxy does it (Debian's nginx): every principal may read
schemas and look one up (`POST /subjects/<subject>` answers "is this schema registered, under which
id"); registering a version, changing compatibility and deleting are the admin's. Apicurio itself then
listens on a loopback port of its own that no client is given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from clinhub.exceptions import ServiceError
from clinhub.infra.process import ServiceProcess, pid_from_file, spawn, stop_recorded, wait_until
from clinhub.infra.secrets import ensure_password
from clinhub.infra.tls import ensure_ca, issue_certificate, write_private
from core.principals import ADMIN

CCOMPAT = "/apis/ccompat/v7"


@dataclass(frozen=True)
class ProxyLayout:
    home: Path
    port: int  # what clients reach (https)
    upstream_port: int  # Apicurio's own, loopback only
    tls_dir: Path
    secrets_dir: Path

    @property
    def pid_path(self) -> Path:
        return self.home / "nginx.pid"

    @property
    def log_path(self) -> Path:
        return self.home / "nginx.log"

    @property
    def config_path(self) -> Path:
        return self.home / "nginx.conf"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{CCOMPAT}"

    def password_file(self, principal: str) -> Path:
        return self.secrets_dir / f"{principal}.password"


def _crypt(password: str) -> str:
    """A SHA-512 crypt(3) hash, which nginx's auth_basic checks (openssl makes it; no Python crypt)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServiceError("registry proxy", "openssl is needed to hash the registry passwords; install it")
    done = subprocess.run(  # noqa: S603 - fixed argv, the password on stdin, never on the command line
        [openssl, "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ServiceError("registry proxy", f"openssl passwd failed: {done.stderr.strip()}")
    return done.stdout.strip()


def add_user(layout: ProxyLayout, principal: str) -> None:
    """One more principal (an institution added later): its password, the users file, nginx reloaded."""
    ensure_password(layout.password_file(principal))
    known = [path.stem for path in layout.secrets_dir.glob("*.password")]
    write_users(layout, known)
    nginx = _nginx()
    if pid_from_file(layout.pid_path) is not None:
        subprocess.run([nginx, "-c", str(layout.config_path), "-s", "reload"], check=True)  # noqa: S603
        time.sleep(0.5)  # the master re-reads its configuration; new workers read the users per request


def _nginx() -> str:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise ServiceError("registry proxy", "nginx is needed in front of the schema registry; install it")
    return nginx


def write_users(layout: ProxyLayout, principals: Iterable[str]) -> None:
    """The htpasswd file of every principal (each password made once, kept under secrets)."""
    lines = [
        f"{name}:{_crypt(ensure_password(layout.password_file(name)))}" for name in sorted(set(principals))
    ]
    write_private(layout.home / "htpasswd", ("\n".join(lines) + "\n").encode())


def _config(layout: ProxyLayout, cert: Path, key: Path) -> str:
    home = layout.home
    return nginx_config(
        listen=f"127.0.0.1:{layout.port}",
        upstream=f"http://127.0.0.1:{layout.upstream_port}",
        cert=cert,
        key=key,
        users=home / "htpasswd",
        pid=layout.pid_path,
        error_log=str(layout.log_path),
        temp=home / "tmp",
        # nginx's workers read the password hashes per request; as root they would run as nobody, which
        # may not read a file only its owner reads
        user="root" if os.geteuid() == 0 else None,
    )


def nginx_config(
    *,
    listen: str,
    upstream: str,
    cert: Path,
    key: Path,
    users: Path,
    pid: Path,
    error_log: str,
    temp: Path,
    user: str | None = None,
) -> str:
    """The proxy's nginx.conf, the local stack's (`start`) and docker-compose.yml's
    (`clinhub/infra/compose_secrets.py`): TLS on `listen`, basic authentication against the `users`
    htpasswd file, reads for every principal and changes for the admin only, proxied to `upstream`
    (http://host:port); nginx's temporary files under `temp`, its workers run as `user` when given."""
    user_line = f"user {user};\n" if user else ""
    return f"""\
{user_line}worker_processes 1;
pid {pid};
error_log {error_log} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    client_max_body_size 4m;
    # reads, and looking a schema up, for every principal; every other change for the admin only
    map "$request_method $uri" $needs_admin {{
        "~^(GET|HEAD) " 0;
        "~^POST {CCOMPAT}/subjects/[^/]+/?$" 0;
        "~^POST {CCOMPAT}/compatibility/" 0;
        default 1;
    }}
    map "$needs_admin:$remote_user" $refused {{
        "1:{ADMIN}" 0;
        "~^1:" 1;
        default 0;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        auth_basic "clinhub schema registry";
        auth_basic_user_file {users};
        location / {{
            if ($refused) {{
                return 403 '{{"error_code":40301,"message":"only the admin registers schemas"}}';
            }}
            proxy_pass {upstream};
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def start(
    layout: ProxyLayout, principals: Iterable[str], answers: Callable[[], bool], timeout: float = 30.0
) -> ServiceProcess:
    """Write the users, certificate and configuration; start nginx (or reload it), wait until it serves."""
    nginx = _nginx()
    for part in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (layout.home / "tmp" / part).mkdir(parents=True, exist_ok=True)
    write_users(layout, principals)
    ca = ensure_ca(layout.tls_dir)
    served = issue_certificate(ca, layout.tls_dir, "registry", ["127.0.0.1", "localhost"])
    layout.config_path.write_text(_config(layout, served.cert, served.key))
    running = pid_from_file(layout.pid_path)
    if running is not None:
        subprocess.run([nginx, "-c", str(layout.config_path), "-s", "reload"], check=False)  # noqa: S603
        proc = ServiceProcess("registry proxy", running, layout.log_path)
    else:
        argv = [nginx, "-c", str(layout.config_path), "-p", str(layout.home), "-g", "daemon off;"]
        proc = spawn("registry proxy", argv, layout.log_path, None)
        layout.pid_path.write_text(f"{proc.pid}\n")
    wait_until(proc, answers, timeout, "serving the registry over TLS")
    return proc


def stop(layout: ProxyLayout) -> bool:
    return stop_recorded(layout.pid_path)
