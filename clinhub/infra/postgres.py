"""A local PostgreSQL cluster from Debian's packages, for tests and local runs, secured as production is.

Clients connect over TCP on loopback only, with TLS (a certificate from the local CA) and scram-sha-256
passwords; a plain connection is refused. One login role per component (sinks/privileges.py), each with a
random password under the infra home's `secrets/postgres/`; the owner role runs the migrations and owns
the tables. The Unix socket, in a directory only the server's user may enter, is the set-up tooling's.

PostgreSQL refuses to run as root, so when we are root the cluster is initialised and run as the
`postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
from clinhub.infra.secrets import LocalCredentials, ensure_password
from clinhub.infra.tls import ensure_ca, issue_certificate, write_private
from core.settings import DatabaseSettings
from sinks.privileges import APPLICATION_ROLES, OWNER

SEARCH_ROOT = Path("/usr/lib/postgresql")


def find_bindir() -> Path:
    """The newest installed server's bin directory (Debian installs one folder per major version)."""
    candidates = sorted(
        (p for p in SEARCH_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise ServiceError(
            "postgresql", "no server found under /usr/lib/postgresql; run `apt-get install -y postgresql`"
        )
    return candidates[-1]


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceError("postgresql", "running as root needs `runuser` to drop to the postgres user")
    return [runuser, "-u", "postgres", "--", *argv]


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServiceError("postgresql", "no `postgres` user; install Debian's postgresql package") from exc
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


ROLES = (OWNER, *APPLICATION_ROLES)
SCRAM_ITERATIONS = 4096

# Loopback TCP with TLS and scram-sha-256 only; the socket for the server's own user (set-up tooling).
HBA = """\
local    all  postgres                 trust
hostssl  all  all       127.0.0.1/32   scram-sha-256
hostssl  all  all       ::1/128        scram-sha-256
host     all  all       all            reject
"""


@dataclass(frozen=True)
class PostgresLayout(LocalCredentials):
    SECRETS_KIND: ClassVar[str] = "postgres"
    home: Path
    port: int = 5432
    database: str = "clinhub"
    tls_home: Path | None = None  # the local CA and service certificates; default beside home
    secrets_home: Path | None = None  # the roles' password files; default beside home

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_path(self) -> Path:
        return self.home / "postgres.log"

    @property
    def pid_path(self) -> Path:
        return self.home / "postgres.pid"

    def url(self, database: str | None = None) -> str:
        """Without credentials: the settings carry the role and its password file."""
        return f"postgresql+psycopg://127.0.0.1:{self.port}/{database or self.database}"

    def settings_for(self, role: str = OWNER, database: str | None = None) -> DatabaseSettings:
        """Settings of one role on one database of this cluster, with every role's secrets beside them
        so components switch to their own (`DatabaseSettings.for_role`)."""
        return DatabaseSettings(
            url=self.url(database),  # type: ignore[arg-type]  # pydantic makes the SecretStr
            username=role,
            password_file=self.password_file(role),
            ssl_mode="verify-full",
            ssl_ca_location=self.ca_file,
            role_secrets_dir=self.secrets_dir,
        )


def _psql(layout: PostgresLayout, bindir: Path, sql: str, database: str = "postgres") -> str:
    return run_checked(
        _as_server_user(
            [
                str(bindir / "psql"),
                "-h",
                str(layout.socket_dir),
                "-p",
                str(layout.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-Atc",
                sql,
            ]
        ),
        "postgresql (psql)",
    )


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, PostgreSQL's text form).
    Sent instead of the password, so the password never reaches the server, its log or a command line."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _server_tls(layout: PostgresLayout) -> tuple[Path, Path]:
    """The server's certificate and key, copied into its home: PostgreSQL wants its key owned by the
    server's user and readable by no one else."""
    ca = ensure_ca(layout.tls_dir)
    issued = issue_certificate(ca, layout.tls_dir, "postgres", ["127.0.0.1", "localhost"])
    cert, key = layout.home / "server.crt", layout.home / "server.key"
    cert.write_bytes(issued.cert.read_bytes())
    write_private(key, issued.key.read_bytes())
    return cert, key


def _ensure_roles(layout: PostgresLayout, bindir: Path) -> None:
    """Every component's login role with its password (made once); no role is a superuser."""
    for role in ROLES:
        verifier = scram_verifier(ensure_password(layout.password_file(role)))
        _psql(
            layout,
            bindir,
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; END IF; END $$; '
            f"ALTER ROLE \"{role}\" WITH LOGIN PASSWORD '{verifier}'",
        )


def start(layout: PostgresLayout, timeout: float = 60.0) -> ServiceProcess:
    """Initialise (once), start, and create the components' roles and the hub's database."""
    bindir = find_bindir()
    pid = running_pid(layout)
    if pid is not None:
        return ServiceProcess("postgresql", pid, layout.log_path)
    layout.home.mkdir(parents=True, exist_ok=True)
    layout.socket_dir.mkdir(parents=True, exist_ok=True)
    layout.socket_dir.chmod(0o700)
    marker = layout.home / ".clinhub-secure"  # made with the roles of sinks/privileges.py
    fresh = not (layout.data_dir / "PG_VERSION").exists()
    if not fresh and not marker.exists():
        raise ServiceError(
            "postgresql",
            f"{layout.data_dir} was made before the database was secured (trust authentication, one "
            "superuser role); stop it (`clinhub infra down`), remove that directory (local data only), "
            "then start again",
        )
    if fresh:
        layout.data_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_server_user(layout.home)
        run_checked(
            _as_server_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(layout.data_dir),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=reject",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            "postgresql (initdb)",
        )
    hba = layout.home / "pg_hba.conf"
    hba.write_text(HBA)
    cert, key = _server_tls(layout)
    _chown_to_server_user(layout.home)
    proc = spawn(
        "postgresql",
        _as_server_user(
            [
                str(bindir / "postgres"),
                "-D",
                str(layout.data_dir),
                "-p",
                str(layout.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={layout.socket_dir}",
                "-c",
                f"hba_file={hba}",
                "-c",
                "ssl=on",
                "-c",
                f"ssl_cert_file={cert}",
                "-c",
                f"ssl_key_file={key}",
                "-c",
                "ssl_min_protocol_version=TLSv1.2",
                "-c",
                "password_encryption=scram-sha-256",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=100",
            ]
        ),
        layout.log_path,
        layout.pid_path,
    )
    wait_until(
        proc,
        lambda: port_open(layout.port) and _psql(layout, bindir, "select 1") == "1\n",
        timeout,
        "accepting connections",
    )
    _ensure_roles(layout, bindir)
    if fresh:
        _create(layout, bindir, layout.database)
        marker.touch()
    return proc


def _create(layout: PostgresLayout, bindir: Path, name: str) -> None:
    _psql(layout, bindir, f'CREATE DATABASE "{name}" OWNER "{OWNER}"')
    # the database's public schema belongs to its owner (PostgreSQL 15+: pg_database_owner)
    _psql(layout, bindir, f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC', database=name)


def create_database(layout: PostgresLayout, name: str) -> DatabaseSettings:
    """A fresh database on the running cluster, owned by the owner role; returns the owner's settings."""
    _create(layout, find_bindir(), name)
    return layout.settings_for(OWNER, name)


def running_pid(layout: PostgresLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: PostgresLayout) -> bool:
    return stop_recorded(layout.pid_path)
