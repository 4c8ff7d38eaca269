#!/usr/bin/env bash
# Fetches the Apicurio Registry server (Confluent-compatible schema registry) from Maven Central
# via infra/registry/pom.xml and installs it into OUTDIR.
#
#   bash infra/registry/build.sh OUTDIR      e.g. OUTDIR=/work/main/.infra/registry/app
#
# Idempotent: skips all work when OUTDIR already holds a build of the same pom.xml (sha256 stamp).
# Offline-safe: tries Maven offline first (warm ~/.m2), then online.
# Prints one line on success; on failure prints Maven's output and exits non-zero.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTDIR="${1:?usage: build.sh OUTDIR}"
mkdir -p "$(dirname "$OUTDIR")"
OUTDIR="$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR")"

POM="$HERE/pom.xml"
HASH="$(sha256sum "$POM" | cut -d' ' -f1)"
STAMP="$OUTDIR/.build-stamp"

runner_jar() { compgen -G "$1/apicurio-registry-app-*-runner.jar" | head -n1; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -n "$(runner_jar "$OUTDIR")" ]]; then
  echo "registry: up to date in $OUTDIR ($(basename "$(runner_jar "$OUTDIR")"))"
  exit 0
fi

STAGE="$OUTDIR.tmp.$$"
LOG="$(mktemp)"
trap 'rm -rf "$STAGE" "$LOG"' EXIT

mvn_package() {
  mvn -B -q "$@" -f "$POM" package -Dregistry.app.dir="$STAGE" >"$LOG" 2>&1
}

rm -rf "$STAGE"
if ! mvn_package -o; then
  rm -rf "$STAGE"
  if ! mvn_package; then
    cat "$LOG" >&2
    echo "registry: maven build failed" >&2
    exit 1
  fi
fi

JAR="$(runner_jar "$STAGE")"
if [[ -z "$JAR" || ! -d "$STAGE/lib" ]]; then
  echo "registry: unpacked distribution has no runner jar / lib dir in $STAGE" >&2
  exit 1
fi

echo "$HASH" >"$STAGE/.build-stamp"
rm -rf "$OUTDIR"
mv "$STAGE" "$OUTDIR"
echo "registry: built $(basename "$JAR") into $OUTDIR"
