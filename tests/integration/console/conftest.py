"""The console on the real stack: a uvicorn server (a real socket, as browsers and EventSource need)
over one test's HubEnv, with a standard set of accounts."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from clinhub.console_service import ConsoleParts, build_console
from core.settings import ConsoleSettings, StreamSettings
from tests.integration.conftest import HubEnv

PASSWORD = "correct horse battery staple"  # noqa: S105 - the test accounts

# username: (role, institution, wards, chain level)
USERS: dict[str, tuple[str, str | None, str | None, int | None]] = {
    "dr.icu": ("clinician", "H001", "ICU", 0),
    "dr.attending": ("clinician", "H001", "ICU", 1),
    "dr.ward7": ("clinician", "H001", "WARD7", 0),
    "dr.h2": ("clinician", "H002", None, 0),
    "integ.h1": ("integration", "H001", None, None),
    "integ.h2": ("integration", "H002", None, None),
    "operator": ("operator", None, None, None),
    "admin": ("admin", None, None, None),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ConsoleServer:
    url: str
    parts: ConsoleParts
    hub: HubEnv

    def token(self, username: str) -> str:
        response = httpx.post(f"{self.url}/api/v1/tokens", json={"username": username, "password": PASSWORD})
        response.raise_for_status()
        return str(response.json()["token"])

    def api(self, username: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token(username)}"}, timeout=30
        )

    def audit(self, **where: Any) -> list[Any]:
        return [
            entry
            for entry in self.parts.console.audit_log.query(limit=500)
            if all(getattr(entry, key) == value for key, value in where.items())
        ]


def add_users(parts: ConsoleParts) -> None:
    now = dt.datetime.now(dt.UTC)
    for username, (role, institution, wards, level) in USERS.items():
        parts.console.accounts.add(
            username,
            PASSWORD,
            role,
            display_name=f"Dr {username}" if role == "clinician" else username,
            institution_id=institution,
            wards=wards,
            chain_level=level,
            now=now,
        )


@contextmanager
def console_server(hub: HubEnv, reference_dir: Path | None = None, **console: Any) -> Iterator[ConsoleServer]:
    port = free_port()
    stream: StreamSettings = hub.settings.stream
    if reference_dir is not None:
        stream = stream.model_copy(update={"reference_dir": reference_dir})
    settings = hub.settings.model_copy(
        update={
            "console": ConsoleSettings(host="127.0.0.1", port=port, feed_poll_seconds=0.2, **console),
            "stream": stream,
        }
    )
    parts = build_console(settings, CollectorRegistry())
    add_users(parts)
    server = uvicorn.Server(uvicorn.Config(parts.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the console did not start")
        time.sleep(0.05)
    try:
        yield ConsoleServer(f"http://127.0.0.1:{port}", parts, hub)
    finally:
        server.should_exit = True
        thread.join(30)
        parts.engine.dispose()


@pytest.fixture()
def console(hub: HubEnv) -> Iterator[ConsoleServer]:
    with console_server(hub) as server:
        yield server
