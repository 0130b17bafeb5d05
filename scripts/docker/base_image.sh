#!/usr/bin/env bash
# Print the base image the service Dockerfiles should build FROM, making it exist first.
#   - If $BASE_IMAGE (default python:3.11-slim) is present or can be pulled, use it: that is what users everywhere get.
#   - Otherwise (no registry reachable) build a Debian bookworm rootfs with debootstrap and `docker import` it as
#     dlt-base:bookworm. The rootfs tarball is cached in .cache/docker/ keyed by the package list, so a later
#     `make images` after `docker system prune` re-imports in seconds instead of re-bootstrapping.
# The Debian mirror is derived from this machine's apt config at run time (scripts/docker/apt_source.sh).
# stdout: the image name only (log lines go to stderr). Exit 3 when no base image can be produced here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
want=${BASE_IMAGE:-python:3.11-slim}
local_tag=${DLT_LOCAL_BASE:-dlt-base:bookworm}
cache=${DLT_DOCKER_CACHE:-$root/.cache/docker}
# Everything the services need at run time from the OS: python + venv, tc/ip (shaping), iptables (loss, NFQUEUE),
# libnetfilter-queue1 (the NFQUEUE delay backend's runtime library), procps (pkill/ps for the entrypoint).
pkgs=python3,python3-venv,iproute2,iptables,ca-certificates,libnetfilter-queue1,procps

log() { echo "base_image: $*" >&2; }

if docker image inspect "$want" >/dev/null 2>&1; then echo "$want"; exit 0; fi
if timeout 60 docker pull -q "$want" >/dev/null 2>&1; then log "pulled $want"; echo "$want"; exit 0; fi
log "cannot pull $want; using a local debootstrap base ($local_tag)"

key=$(printf '%s' "$pkgs" | sha256sum | cut -c1-12)
if docker image inspect "$local_tag" >/dev/null 2>&1 \
   && [ "$(docker image inspect -f '{{ index .Config.Labels "dlt.base.key" }}' "$local_tag" 2>/dev/null)" = "$key" ]; then
  echo "$local_tag"; exit 0
fi

mkdir -p "$cache"
tarball="$cache/base-bookworm-$key.tar"
if [ ! -s "$tarball" ]; then
  [ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 3; }
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             debootstrap >/dev/null; } || { log "cannot install debootstrap"; exit 3; }
  fi
  uri=$("$here/apt_source.sh" bookworm) || exit 3
  dir=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$dir"' EXIT
  log "debootstrap bookworm ($pkgs) - about 40 s"
  debootstrap --variant=minbase --include="$pkgs" bookworm "$dir" "$uri" >"$cache/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $cache/debootstrap.log"; exit 3; }
  # Slim the image: apt caches and docs are never needed at run time.
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/*
  tar -C "$dir" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
fi
docker import \
  -c "LABEL dlt.base.key=$key" \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["/bin/bash"]' \
  "$tarball" "$local_tag" >/dev/null
log "imported $local_tag from $tarball"
echo "$local_tag"
