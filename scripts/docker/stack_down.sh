#!/usr/bin/env bash
# `make stack-down`: remove the Swarm stack and everything it made — services, its networks, and its volumes
# (`docker stack rm` keeps volumes; their containers must be gone before they can be removed). Bounded waits.
# The swarm itself stays (DLT_SWARM_LEAVE=1 also leaves it: `docker swarm leave --force`).
set -euo pipefail
stack=${DLT_STACK:-dlt-swarm}
wait_s=${DLT_STACK_WAIT:-120}
say() { echo "stack_down: $*" >&2; }
label="label=com.docker.stack.namespace=$stack"

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then
  docker stack rm "$stack" >&2 || true
fi
leftovers() {
  { docker service ls -q --filter "$label" 2>/dev/null || true
    docker ps -aq --filter "$label"
    docker network ls -q --filter "$label"; } | grep -c . || true
}
deadline=$(( $(date +%s) + wait_s ))
while [ "$(leftovers)" -gt 0 ]; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "still present after ${wait_s}s:"; docker ps -a --filter "$label" >&2; docker network ls --filter "$label" >&2
    exit 1
  fi
  sleep 1
done
vols=$(docker volume ls -q --filter "$label")
[ -z "$vols" ] || docker volume rm $vols >/dev/null
if [ "${DLT_SWARM_LEAVE:-0}" = 1 ] && [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then
  docker swarm leave --force >&2
fi
say "stack $stack removed (services, containers, networks, volumes)"
