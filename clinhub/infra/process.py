"""Small helpers shared by the service launchers: free ports, detached processes, waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clinhub.exceptions import ServiceError


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class ServiceProcess:
    """A service started in its own session, with its log file and pid file on disk."""

    name: str
    pid: int
    log_path: Path

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        stop_pid(self.pid, timeout)

    def kill(self) -> None:
        """SIGKILL, for fault tests that need an abrupt stop."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _reap(self.pid, 10.0)


def pid_alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within the timeout."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _reap(pid, timeout):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _reap(pid, 10.0)


def pid_from_file(pid_path: Path) -> int | None:
    """The pid a launcher recorded, if that process is still alive."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def stop_recorded(pid_path: Path) -> bool:
    """Stop the process recorded in `pid_path`; False when nothing was running."""
    pid = pid_from_file(pid_path)
    if pid is None:
        return False
    stop_pid(pid)
    pid_path.unlink(missing_ok=True)
    return True


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    pid_path: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> ServiceProcess:
    """Start a process detached in its own session so that stopping it takes its children too."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv is built by the project, never from user input
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    if pid_path is not None:
        pid_path.write_text(str(proc.pid))
    return ServiceProcess(name=name, pid=proc.pid, log_path=log_path)


def wait_until(service: ServiceProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `ready` until it is true; fail loudly with the service's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceError(service.name, f"exited before {what}; log tail:\n{service.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001,S110 - any failure of a readiness probe just means "not yet"
            pass
        time.sleep(0.5)
    raise ServiceError(service.name, f"not {what} within {timeout:.0f}s; log tail:\n{service.log_tail()}")


def run_checked(
    argv: Sequence[str],
    what: str,
    cwd: Path | None = None,
    timeout: float = 1800,
    secrets: Sequence[str] = (),
) -> str:
    """Run a set-up command to completion; its output goes into the error if it fails, with each of
    `secrets` (passwords on its command line) masked."""
    try:
        done = subprocess.run(  # noqa: S603 - argv is built by the project
            list(argv), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise ServiceError(what, f"command not found: {argv[0]}") from exc
    if done.returncode != 0:
        output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        message = f"`{' '.join(argv)}` exited {done.returncode}:\n{output}"
        for secret in secrets:
            message = message.replace(secret, "***")
        raise ServiceError(what, message)
    return done.stdout
