"""Passwords of the local stack's principals, made once under the git-ignored `.infra/secrets/`.

Each in its own file, readable by its owner only; a file others may read is refused, not used.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import ClassVar

from clinhub.infra.tls import write_private
from core.settings import read_secret_file


def ensure_password(path: Path) -> str:
    """The password kept in `path`, made (random, 256 bits) on the first call."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode())
    return read_secret_file(path, str(path)).get_secret_value()


class LocalCredentials:
    """Where a local service's CA and its clients' password files are: `tls/` and `secrets/<kind>/`
    beside its home, unless its layout names others. A mixin of the services' frozen layouts."""

    SECRETS_KIND: ClassVar[str]
    home: Path
    tls_home: Path | None
    secrets_home: Path | None

    @property
    def tls_dir(self) -> Path:
        return self.tls_home or self.home.parent / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def secrets_dir(self) -> Path:
        return self.secrets_home or self.home.parent / "secrets" / self.SECRETS_KIND

    def password_file(self, name: str) -> Path:
        return self.secrets_dir / f"{name}.password"
