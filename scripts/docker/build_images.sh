#!/usr/bin/env bash
# Build the stack's images: dlt-controller, dlt-paramserver, dlt-worker, dlt-prometheus (tag $DLT_TAG, default latest).
#   build_images.sh            build all (Docker's layer cache makes unchanged ones quick)
#   build_images.sh --missing  build only images that do not exist yet (what `make up` uses)
# Steps, all automatic: engine ready -> base image (pull, else local debootstrap) -> host wheelhouse -> a staged build
# context per service (wheels/ + docker/), so the daemon never receives the repo's .venv or .cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=${DLT_TAG:-latest}
services=(controller paramserver worker prometheus)
log() { echo "build_images: $*" >&2; }

if [ "${1:-}" = "--missing" ]; then
  todo=()
  for s in "${services[@]}"; do docker image inspect "dlt-$s:$tag" >/dev/null 2>&1 || todo+=("$s"); done
  if [ ${#todo[@]} -eq 0 ]; then log "all images present"; exit 0; fi
  services=("${todo[@]}")
elif [ $# -gt 0 ]; then
  echo "usage: build_images.sh [--missing]" >&2; exit 2
fi

"$here/setup_engine.sh" >&2
base=$("$here/base_image.sh")
py_services=()
for s in "${services[@]}"; do [ "$s" = prometheus ] || py_services+=("$s"); done
[ ${#py_services[@]} -eq 0 ] || "$here/wheelhouse.sh" "${py_services[@]}"

wh=${DLT_WHEELHOUSE:-$root/.cache/wheelhouse}
ctx_root=$root/.cache/docker/ctx
start=$(date +%s)
for s in "${services[@]}"; do
  ctx=$ctx_root/$s
  rm -rf "$ctx" && mkdir -p "$ctx/docker"
  cp "$here/entrypoint.sh" "$here/healthcheck.py" "$here/link_exporter.py" "$ctx/docker/"
  if [ "$s" != prometheus ]; then
    mkdir -p "$ctx/wheels/deps" "$ctx/wheels/project"
    # Hard links: no copy of the (large) torch wheel, and the daemon hashes the same content as before.
    cp -al "$wh/deps-$s/." "$ctx/wheels/deps/"
    cp -al "$wh/project/." "$ctx/wheels/project/"
    rm -f "$ctx/wheels/deps/.stamp"
  fi
  log "building dlt-$s:$tag FROM $base"
  t0=$(date +%s)
  blog=$root/.cache/docker/build-$s.log
  if ! docker build --build-arg "BASE_IMAGE=$base" -t "dlt-$s:$tag" -f "$root/services/$s/Dockerfile" "$ctx" \
       >"$blog" 2>&1; then
    tail -n 40 "$blog" >&2
    log "building dlt-$s failed; full log: $blog"
    exit 1
  fi
  log "dlt-$s:$tag built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "dlt-$s:$tag" \
        | awk '{printf "%.0f MB", $1/1e6}'))"
done
log "done in $(( $(date +%s) - start ))s"
