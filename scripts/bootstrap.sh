#!/usr/bin/env bash
# Installs everything the hub needs on a fresh Debian machine, idempotently:
# system packages (JDK, Maven, PostgreSQL server for tests), the virtualenv with the project and its
# dev tools, and Kafka + the schema registry from Maven Central. Safe to run again; it skips what is there.
# The virtualenv is (re)installed when pyproject.toml changes: .venv/.installed-<hash of pyproject.toml>.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
command -v runuser >/dev/null 2>&1 || need_apt+=(util-linux)
# the console's browser tests drive Debian's chromium through Playwright (its own download is not used)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# the authenticating TLS proxy in front of the schema registry, and the hashes of its passwords
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: please install: ${need_apt[*]} (apt-get install -y ...)" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: Python 3.11+ is needed, found {sys.version.split()[0]}")
PY

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

.venv/bin/clinhub infra fetch
# Compose v2, which only the test suite needs (to check docker-compose.yml), is not installed here:
# `make test` runs `make compose` (scripts/validate-compose.sh --install-only) as well.
