#!/usr/bin/env bash
# `make stack-up`: deploy the stack (deploy/swarm/stack.yml) to Docker Swarm for PROFILE with WORKERS replicas and
# wait until every task is running and healthy.
#   stack_up.sh PROFILE WORKERS
# Environment: DLT_STACK (stack name, default dlt-swarm), DLT_SWARM_ADVERTISE_ADDR (address `docker swarm init`
# advertises when this engine is in no swarm yet; default 127.0.0.1, i.e. a single-node swarm — give a reachable
# address to add nodes later), DLT_STACK_WAIT (seconds, default 300), DLT_SECRETS_DIR, DLT_CLI, and the port
# variables of deploy/swarm/stack.yml; DLT_TAG (image tag, default latest) or DLT_<SERVICE>_IMAGE (an image);
# PS_SHARDS (P parameter servers, default 1) and DLT_PS_SHARD_CONSTRAINT (where shards 1..P-1 may run; default
# `node.role == manager`, beside `paramserver`, because each checkpoints to a volume of the node it runs on).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=${1:?profile}
workers=${2:?workers}
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "WORKERS must be a positive integer, got '$workers'" >&2; exit 2; }
shards=${PS_SHARDS:-1}
[[ "$shards" =~ ^[1-9][0-9]*$ ]] && [ "$shards" -le 64 ] \
  || { echo "PS_SHARDS must be an integer in 1..64, got '$shards'" >&2; exit 2; }
stack=${DLT_STACK:-dlt-swarm}
wait_s=${DLT_STACK_WAIT:-300}
say() { echo "stack_up: $*" >&2; }

# 1. A swarm to deploy to: a single-node one when this engine is in none.
state=$(docker info --format '{{.Swarm.LocalNodeState}}')
case "$state" in
  active) ;;
  inactive)
    addr=${DLT_SWARM_ADVERTISE_ADDR:-127.0.0.1}
    say "this engine is in no swarm; initialising a single-node swarm (advertise address $addr)"
    docker swarm init --advertise-addr "$addr" >/dev/null ;;
  *) say "swarm state is '$state'; expected active or inactive"; exit 1 ;;
esac
[ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] \
  || { say "this engine is a swarm worker, not a manager: run stack-up on a manager node"; exit 1; }

# 2. Auth without a user step: the same secret and tokens as Compose (docs/security.md).
export DLT_SECRETS_DIR=${DLT_SECRETS_DIR:-$root/deploy/.secrets}
"$here/secrets.sh" "$DLT_SECRETS_DIR" "${DLT_CLI:-$root/.venv/bin/dist-llm-train}"

# 3. Deploy. Interpolation happens here, from this environment. Images go by id: Swarm's agent then starts tasks
#    from the node's own copy instead of trying to pull (no registry), and --resolve-image never keeps the CLI
#    from asking one for a digest.
export PROFILE="$profile" WORKERS="$workers"
tag=${DLT_TAG:-latest}
for svc in controller paramserver worker prometheus; do
  var="DLT_$(echo "$svc" | tr a-z A-Z)_IMAGE"
  id=$(docker image inspect -f '{{.Id}}' "${!var:-dlt-$svc:$tag}") \
    || { say "image ${!var:-dlt-$svc:$tag} is missing: make images"; exit 1; }
  export "$var=$id"
done
# PS_SHARDS=P (docs/architecture.md, "Sharded parameter servers"): `paramserver` is shard 0; shards 1..P-1 are
# services `paramserver-shard-N` of one replica each (a service name is the only per-task name Swarm's DNS
# gives, and the controller must list the shards in order), written to a second stack file deployed with the
# first. They share the network alias `paramserver-shards`, by which Prometheus finds them all. Each runs a probe
# responder like `paramserver`, and every worker's link exporter probes them all (DLT_PROBE_TARGETS).
files=(-c "$root/deploy/swarm/stack.yml")
DLT_PS_ADDRESS=paramserver:50051
DLT_PROBE_TARGETS=""
if [ "$shards" -gt 1 ]; then
  DLT_PROBE_TARGETS=paramserver=paramserver:9199
  shard_file=$(mktemp "${TMPDIR:-/tmp}/dlt-stack-shards.XXXXXX.yml")
  trap 'rm -f "$shard_file"' EXIT
  {
    echo 'version: "3.8"'
    echo 'services:'
    for ((i = 1; i < shards; i++)); do
      DLT_PS_ADDRESS+=",paramserver-shard-$i:50051"
      DLT_PROBE_TARGETS+=",shard-$i=paramserver-shard-$i:9199"
      cat <<YAML
  paramserver-shard-$i:
    image: \${DLT_PARAMSERVER_IMAGE}
    cap_add: [NET_ADMIN]
    networks:
      dlt: {aliases: [paramserver-shards]}
    stop_grace_period: 15s
    environment:
      PROFILE: \${PROFILE}
      DLT_WORKERS: \${WORKERS}
      DLT_NODE: shard-$i
      DLT_PROBE_LISTEN: 0.0.0.0:9199
      DLT_CLUSTER_SECRET_FILE: /run/secrets/cluster_secret
    volumes: ["ps-shard-$i-data:/data"]
    secrets: [cluster_secret]
    deploy:
      endpoint_mode: dnsrr
      restart_policy: {condition: any, delay: 2s}
      placement: {constraints: ["\${DLT_PS_SHARD_CONSTRAINT:-node.role == manager}"]}
YAML
    done
    echo 'volumes:'
    for ((i = 1; i < shards; i++)); do echo "  ps-shard-$i-data: {}"; done
  } >"$shard_file"
  files+=(-c "$shard_file")
fi
export DLT_PS_ADDRESS DLT_PROBE_TARGETS
docker stack deploy --prune --resolve-image never "${files[@]}" "$stack" >&2

# 4. Wait until every service has all its replicas running, on whichever node. A task whose image has a
#    healthcheck counts as running only once it is healthy (Swarm keeps it `starting` until then), so the
#    replica counts of `docker service ls` say it all, for tasks on every node.
expected() { case "$1" in worker) echo "$workers" ;; *) echo 1 ;; esac; }
shard_services=()
for ((i = 1; i < shards; i++)); do shard_services+=("paramserver-shard-$i"); done
healthy() {
  local svc want have
  for svc in paramserver "${shard_services[@]}" controller worker prometheus; do
    want=$(expected "$svc")
    have=$(docker service ls --filter "name=${stack}_$svc" --format '{{.Name}} {{.Replicas}}' \
      | awk -v n="${stack}_$svc" '$1 == n {print $2}')
    [ "$have" = "$want/$want" ] || { pending="$svc ${have:-0/$want} running"; return 1; }
  done
}
pending=""
deadline=$(( $(date +%s) + wait_s ))
until healthy; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "not healthy within ${wait_s}s ($pending):"
    docker stack ps --no-trunc "$stack" >&2 || true
    for svc in paramserver controller worker; do docker service logs --tail 20 "${stack}_$svc" >&2 2>&1 || true; done
    say "\`make stack-down\` removes it"
    exit 1
  fi
  sleep 2
done
docker stack services "$stack"
