#!/usr/bin/env bash
# Put the stack's images on other Docker engines without any image registry: `docker save | docker -H T load`.
#   swarm_images.sh TARGET...   TARGET is any `docker -H` address: ssh://user@host, tcp://host:2376,
#                               unix:///path/to/docker.sock
#   swarm_images.sh --nodes     every other node of this swarm, as ssh://$DLT_SSH_USER@<node address>
#                               (DLT_SSH_USER default root; the docker CLI's ssh transport, so key-based ssh)
# Images: dlt-{controller,paramserver,worker,prometheus}:$DLT_TAG (default latest); DLT_IMAGES="a:b c:d" overrides.
# A target that already has an image with the same id is skipped for that image. Exit 1 if any transfer failed.
set -euo pipefail
tag=${DLT_TAG:-latest}
read -r -a images <<<"${DLT_IMAGES:-dlt-controller:$tag dlt-paramserver:$tag dlt-worker:$tag dlt-prometheus:$tag}"
say() { echo "swarm_images: $*" >&2; }

targets=()
if [ "${1:-}" = --nodes ]; then
  [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] || { say "--nodes needs a swarm manager"; exit 2; }
  self=$(docker info --format '{{.Swarm.NodeID}}')
  for id in $(docker node ls -q); do
    [ "$id" = "$self" ] && continue
    targets+=("ssh://${DLT_SSH_USER:-root}@$(docker node inspect -f '{{.Status.Addr}}' "$id")")
  done
  [ ${#targets[@]} -gt 0 ] || { say "this swarm has no other node"; exit 0; }
else
  [ $# -gt 0 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
  targets=("$@")
fi

for img in "${images[@]}"; do
  docker image inspect "$img" >/dev/null 2>&1 || { say "$img is not on this engine: make images first"; exit 2; }
done
failed=0
for t in "${targets[@]}"; do
  todo=()
  for img in "${images[@]}"; do
    here_id=$(docker image inspect -f '{{.Id}}' "$img")
    there_id=$(docker -H "$t" image inspect -f '{{.Id}}' "$img" 2>/dev/null || true)
    [ "$here_id" = "$there_id" ] || todo+=("$img")
  done
  if [ ${#todo[@]} -eq 0 ]; then say "$t: all images present"; continue; fi
  say "$t: loading ${todo[*]}"
  t0=$(date +%s)
  # One save of every missing image: layers they share cross the wire once.
  if docker save "${todo[@]}" | docker -H "$t" load >/dev/null; then
    say "$t: done in $(( $(date +%s) - t0 ))s"
  else
    say "$t: transfer failed"; failed=1
  fi
done
exit "$failed"
