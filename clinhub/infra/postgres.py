"""A throwaway PostgreSQL cluster from Debian's packages, for tests and local runs.

PostgreSQL refuses to run as root, so when we are root the cluster is initialised and run as the
`postgres` system user that Debian's package creates.
"""

from __future__ import annotations

import os
import shutil
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
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class PostgresLayout:
    home: Path
    port: int = 5432
    user: str = "clinhub"
    database: str = "clinhub"

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
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database or self.database}"


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


def start(layout: PostgresLayout, timeout: float = 60.0) -> ServiceProcess:
    """Initialise (once), start, and create the hub's role and database; trust auth on loopback only."""
    bindir = find_bindir()
    pid = running_pid(layout)
    if pid is not None:
        return ServiceProcess("postgresql", pid, layout.log_path)
    layout.home.mkdir(parents=True, exist_ok=True)
    layout.socket_dir.mkdir(parents=True, exist_ok=True)
    fresh = not (layout.data_dir / "PG_VERSION").exists()
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
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            "postgresql (initdb)",
        )
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
    if fresh:
        _psql(layout, bindir, f"CREATE ROLE {layout.user} LOGIN SUPERUSER")
        _psql(layout, bindir, f"CREATE DATABASE {layout.database} OWNER {layout.user}")
    return proc


def create_database(layout: PostgresLayout, name: str) -> str:
    """A fresh database on the running cluster; returns its SQLAlchemy URL."""
    _psql(layout, find_bindir(), f"CREATE DATABASE {name} OWNER {layout.user}")
    return layout.url(name)


def running_pid(layout: PostgresLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: PostgresLayout) -> bool:
    return stop_recorded(layout.pid_path)
