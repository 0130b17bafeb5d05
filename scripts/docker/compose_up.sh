#!/usr/bin/env bash
# `make up`: start the stack for PROFILE with WORKERS replicas and wait until every service is healthy.
# Grafana (upstream image) is started too when the image is present or can be pulled; otherwise the reason is
# printed and the rest of the stack runs without it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=${1:?profile}
workers=${2:?workers}
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "WORKERS must be a positive integer, got '$workers'" >&2; exit 2; }
# PS_SHARDS=P: P parameter servers, each holding one slice of the parameters (docs/architecture.md). Shard 0 is
# `paramserver`, shard N replica N of `paramserver-shard` (node shard-N), reached by its container name
# (<project>-paramserver-shard-N). Workers' link exporters probe every shard's responder (DLT_PROBE_TARGETS).
shards=${PS_SHARDS:-1}
[[ "$shards" =~ ^[1-9][0-9]*$ ]] && [ "$shards" -le 64 ] \
  || { echo "PS_SHARDS must be an integer in 1..64, got '$shards'" >&2; exit 2; }
DLT_PS_ADDRESS=paramserver:50051
DLT_PROBE_TARGETS=""
if [ "$shards" -gt 1 ]; then DLT_PROBE_TARGETS=paramserver=paramserver:9199; fi
for ((i = 1; i < shards; i++)); do
  DLT_PS_ADDRESS+=",${COMPOSE_PROJECT_NAME:-dlt}-paramserver-shard-$i:50051"
  DLT_PROBE_TARGETS+=",shard-$i=${COMPOSE_PROJECT_NAME:-dlt}-paramserver-shard-$i:9199"
done
export DLT_PS_ADDRESS DLT_PROBE_TARGETS DLT_PS_SHARD_REPLICAS=$((shards - 1))
compose=(docker compose -f "$root/deploy/docker-compose.yml")
# Auth without a user step: the stack's secret and tokens, made once (docs/security.md).
export DLT_SECRETS_DIR=${DLT_SECRETS_DIR:-$root/deploy/.secrets}
cli=${DLT_CLI:-$root/.venv/bin/dist-llm-train}
"$here/secrets.sh" "$DLT_SECRETS_DIR" "$cli"
# TLS=1: mutual TLS on the PS's gRPC (deploy/docker-compose.tls.yml), certificates made once.
if [ "${TLS:-0}" = 1 ]; then
  if [ ! -s "$DLT_SECRETS_DIR/certs/ca.pem" ]; then
    "$cli" certs --out "$DLT_SECRETS_DIR/certs" --host paramserver --host localhost --host 127.0.0.1 \
      --client controller --client worker >&2
  fi
  compose+=(-f "$root/deploy/docker-compose.tls.yml")
fi
grafana_image=$(PROFILE="$profile" WORKERS="$workers" "${compose[@]}" --profile grafana config --images 2>/dev/null \
  | grep -i grafana || true)
profiles=()
if [ -n "$grafana_image" ] && { docker image inspect "$grafana_image" >/dev/null 2>&1 \
     || timeout 120 docker pull -q "$grafana_image" >/dev/null 2>&1; }; then
  profiles=(--profile grafana)
else
  echo "compose_up: Grafana image ${grafana_image:-?} not available here; starting without it" >&2
fi
export PROFILE="$profile" WORKERS="$workers"
# --wait: returns once every service's healthcheck passes (non-zero, with the failing service, otherwise).
if ! "${compose[@]}" "${profiles[@]}" up --detach --wait --remove-orphans; then
  "${compose[@]}" ps -a >&2
  "${compose[@]}" logs --tail 30 >&2
  echo "compose_up: the stack did not become healthy (logs above); \`make down\` removes it" >&2
  exit 1
fi
"${compose[@]}" ps
