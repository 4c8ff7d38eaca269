#!/usr/bin/env bash
# Validates a compose file with Docker Compose's own loader: `docker compose config`, no engine needed.
#
#   bash scripts/validate-compose.sh [--json] [FILE]   # FILE defaults to docker-compose.yml at the repo root
#   bash scripts/validate-compose.sh --install-only    # make sure Compose v2 is there, then exit
#
# Compose v2 is used as found (`docker compose` plugin or a standalone `docker-compose`, version 2 or later);
# otherwise it is built once from the Go module proxy (github.com/docker/compose/v2 at $CLINHUB_COMPOSE_VERSION,
# about 2-3 minutes on 2 cores) and installed as a Docker CLI plugin, so `docker compose` works afterwards too.
# Debian's `docker-compose` package is Compose v1 (1.29): it rejects current Compose files (top-level `name`,
# secrets from `environment`), so it is never used.
#
# Variables the file requires (`${VAR:?...}`) and that are unset get a placeholder; `.env` is not read, so
# the result does not depend on local secrets. Every profile is enabled, so profiled services are checked too.
# --json prints the resolved model (`config --format json`) on stdout.
#
# Exit status: 0 valid, 1 (Compose's own status) invalid, 3 Compose v2 could not be found or installed.
set -euo pipefail

COMPOSE_VERSION="${CLINHUB_COMPOSE_VERSION:-v2.40.3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

install_only=0
json=0
file=""
for arg in "$@"; do
  case "$arg" in
    --install-only) install_only=1 ;;
    --json) json=1 ;;
    -h | --help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "validate-compose: unknown option $arg" >&2; exit 2 ;;
    *) file="$arg" ;;
  esac
done
file="${file:-$ROOT/docker-compose.yml}"

log() { echo "validate-compose: $*" >&2; }
die_install() { log "$*"; exit 3; }

# Major version of a Compose binary (`version --short` prints e.g. 2.40.3, v2.40.3 or 1.29.2), or nothing.
compose_major() {
  local short
  short="$("$@" version --short 2>/dev/null | head -n 1)" || return 0
  short="${short#v}"
  [[ "$short" =~ ^[0-9]+\. ]] && echo "${short%%.*}"
  return 0
}

# Where a built Compose goes: a directory the Docker CLI searches for plugins.
if [[ -n "${CLINHUB_COMPOSE_PLUGIN_DIR:-}" ]]; then
  PLUGIN_DIR="$CLINHUB_COMPOSE_PLUGIN_DIR"
elif [[ $(id -u) -eq 0 ]]; then
  PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
else
  PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
fi
PLUGIN="$PLUGIN_DIR/docker-compose"

COMPOSE=()
find_compose() {
  local major
  if [[ -n "${CLINHUB_COMPOSE_BIN:-}" ]]; then
    COMPOSE=("$CLINHUB_COMPOSE_BIN")
    return 0
  fi
  if command -v docker >/dev/null 2>&1; then
    major="$(compose_major docker compose)"
    if [[ -n "$major" && "$major" -ge 2 ]]; then COMPOSE=(docker compose); return 0; fi
  fi
  if command -v docker-compose >/dev/null 2>&1; then
    major="$(compose_major docker-compose)"
    if [[ -n "$major" && "$major" -ge 2 ]]; then COMPOSE=(docker-compose); return 0; fi
  fi
  if [[ -x "$PLUGIN" ]]; then
    major="$(compose_major "$PLUGIN")"
    if [[ -n "$major" && "$major" -ge 2 ]]; then COMPOSE=("$PLUGIN"); return 0; fi
  fi
  return 1
}

# Builds Compose from the Go module proxy. `go install module/cmd@version` refuses modules whose go.mod has
# exclude/replace directives (Compose's does), so the module is downloaded and built in place, read-only.
build_compose() {
  local go_bin major module dir tmp started
  go_bin="$(command -v go || true)"
  [[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
  [[ -n "$go_bin" ]] || die_install "Compose v2 is missing and Go (needed to build it from the Go module proxy) is not installed"
  major="${COMPOSE_VERSION#v}"
  major="${major%%.*}"
  module="github.com/docker/compose/v$major"
  started=$SECONDS
  log "building $module@$COMPOSE_VERSION with $("$go_bin" env GOVERSION) (first time only, a few minutes)"
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  # -json reports a failure in its "Error" field, on stdout.
  (cd / && GOFLAGS=-mod=mod "$go_bin" mod download -json "$module@$COMPOSE_VERSION") >"$tmp/module.json" \
    2>"$tmp/build.log" || true
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' "$tmp/module.json")"
  if [[ -z "$dir" || ! -d "$dir/cmd" ]]; then
    cat "$tmp/build.log" >&2
    grep '"Error"' "$tmp/module.json" >&2 || true
    die_install "go mod download $module@$COMPOSE_VERSION failed"
  fi
  if ! (cd "$dir" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$go_bin" build -trimpath \
    -ldflags "-s -w -X $module/internal.Version=$COMPOSE_VERSION" -o "$tmp/docker-compose" ./cmd) \
    >>"$tmp/build.log" 2>&1; then
    grep -v '^go: downloading' "$tmp/build.log" | tail -n 30 >&2
    die_install "building $module@$COMPOSE_VERSION failed (its go.mod asks for $(grep -m1 '^go ' "$dir/go.mod"))"
  fi
  mkdir -p "$PLUGIN_DIR" || die_install "cannot create $PLUGIN_DIR"
  install -m 0755 "$tmp/docker-compose" "$PLUGIN" || die_install "cannot install $PLUGIN"
  log "installed $PLUGIN ($(( SECONDS - started ))s)"
}

if ! find_compose; then
  build_compose
  find_compose || die_install "Compose v2 was built but does not run: $PLUGIN"
fi
log "using ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')"
if ((install_only)); then exit 0; fi

[[ -f "$file" ]] || { log "no such file: $file"; exit 1; }

# Placeholders for the required variables that are unset (secrets come from .env on a real host).
while IFS= read -r var; do
  if [[ -n "$var" && -z "${!var:-}" ]]; then export "$var=validate-compose-placeholder"; fi
done < <(grep -oE '\$\{[A-Za-z_][A-Za-z0-9_]*:?\?' "$file" | sed -E 's/^\$\{([A-Za-z0-9_]+).*/\1/' | sort -u)

compose=("${COMPOSE[@]}" --env-file /dev/null --project-directory "$(dirname "$file")" -f "$file")
profiles=()
while IFS= read -r profile; do
  if [[ -n "$profile" ]]; then profiles+=(--profile "$profile"); fi
done < <("${compose[@]}" config --profiles 2>/dev/null || true)

if ((json)); then
  "${compose[@]}" "${profiles[@]}" config --format json
else
  "${compose[@]}" "${profiles[@]}" config --quiet
  log "$file is valid"
fi
