#!/usr/bin/env bash
# A docker-compose.yml broker's command (bind-mounted into the apache/kafka image): formats this node's
# storage on its first start with the admin's SCRAM credentials, then runs the image's own entrypoint.
#
# The image's entrypoint formats the storage itself, without `--add-scram`, and no SCRAM credential can
# be created after that (nobody could authenticate to create it). So this script formats first, with the
# configuration the image builds from the KAFKA_* variables (the same translation as its
# kafka.docker.KafkaDockerWrapper: KAFKA_ dropped, lower case, `_` -> `.`, `__` -> `_`, `___` -> `-`) and
# the admin's credentials read from a file (`kafka-storage.sh @file`: never on a command line, never in
# the environment). The image's entrypoint then finds the storage formatted ("already formatted") and
# starts the broker. The credentials file is written by the `secrets` service (clinhub infra secrets).
set -euo pipefail

scram_args="${CLINHUB_KAFKA_SCRAM_ARGS:-/run/clinhub/scram.args}"
kafka_home="${CLINHUB_KAFKA_HOME:-/opt/kafka}"
entrypoint="${CLINHUB_KAFKA_ENTRYPOINT:-/etc/kafka/docker/run}"
# The image's own list of KAFKA_* variables that are not broker settings
not_settings=" KAFKA_VERSION KAFKA_HEAP_OPTS KAFKA_LOG4J_OPTS KAFKA_OPTS KAFKA_JMX_OPTS KAFKA_JVM_PERFORMANCE_OPTS \
KAFKA_GC_LOG_OPTS KAFKA_LOG4J_ROOT_LOGLEVEL KAFKA_LOG4J_LOGGERS KAFKA_TOOLS_LOG4J_LOGLEVEL KAFKA_JMX_HOSTNAME "

# The broker settings the image makes of the environment, one `key=value` per line.
settings_from_environment() {
  local name key
  while IFS= read -r name; do
    [[ "$not_settings" == *" $name "* ]] && continue
    key="${name#KAFKA_}"
    key="${key,,}"
    key="${key//_/.}"
    key="${key//.../-}"
    key="${key//../_}"
    printf '%s=%s\n' "$key" "${!name}"
  done < <(compgen -e | grep '^KAFKA_' || true)
}

if [[ "${1:-}" == "--print-settings" ]]; then
  settings_from_environment
  exit 0
fi

: "${CLUSTER_ID:?CLUSTER_ID is the KRaft cluster id}"
: "${KAFKA_LOG_DIRS:?KAFKA_LOG_DIRS is where the storage is formatted}"
data="${KAFKA_LOG_DIRS%%,*}"
if [[ ! -e "$data/meta.properties" ]]; then
  [[ -r "$scram_args" ]] || { echo "start.sh: no admin credentials in $scram_args" >&2; exit 1; }
  config="$(mktemp)"
  trap 'rm -f "$config"' EXIT
  settings_from_environment >"$config"
  echo "===> Formatting $data with the admin's SCRAM credentials"
  "$kafka_home/bin/kafka-storage.sh" format --cluster-id "$CLUSTER_ID" --config "$config" "@$scram_args"
  rm -f "$config"
  trap - EXIT
fi
exec "$entrypoint" "$@"
