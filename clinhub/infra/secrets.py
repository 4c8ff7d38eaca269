"""Passwords of the local stack's principals, made once under the git-ignored `.infra/secrets/`.

Each in its own file, readable by its owner only; a file others may read is refused, not used.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from clinhub.infra.tls import write_private
from core.settings import read_secret_file


def ensure_password(path: Path) -> str:
    """The password kept in `path`, made (random, 256 bits) on the first call."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode())
    return read_secret_file(path, str(path)).get_secret_value()
