#!/usr/bin/env bash
# Make sure a Docker engine and Compose v2 are usable, and change nothing on machines that already have them.
#   1. dockerd missing        -> apt-get install docker.io (Debian's engine; no registry needed)
#   2. `docker compose` missing -> Debian trixie's docker-compose (v2) installs alone on bookworm: add a deb822 source
#      for suite trixie with the *same* URI as this machine's bookworm entry, pin it low, install, remove the source.
#   3. daemon not answering   -> start dockerd in the background (no systemd here) and wait for `docker info`.
# Exit codes: 0 ready, 3 cannot be made ready here (the reason is printed). Called by `make images/up/e2e` and CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log=${DLT_DOCKERD_LOG:-/var/log/dlt-dockerd.log}
wait_s=${DLT_DOCKERD_WAIT:-60}

die() { echo "setup_engine: $*" >&2; exit 3; }
say() { echo "setup_engine: $*"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
apt_updated=0
apt_update() { if [ "$apt_updated" -eq 0 ]; then apt-get update -qq || die "apt-get update failed"; apt_updated=1; fi; }

export DEBIAN_FRONTEND=noninteractive

# 1. Engine binaries.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
  is_root || die "docker engine missing and not root: install docker.io (or any Docker engine) first"
  say "installing docker.io (engine) and iptables"
  apt_update
  apt-get install -y -qq --no-install-recommends docker.io iptables >/dev/null || die "apt-get install docker.io failed"
fi

# 2. Compose v2 (the `docker compose` plugin).
if ! docker compose version >/dev/null 2>&1; then
  is_root || die "compose v2 missing and not root: install the docker compose plugin first"
  uri=$("$here/apt_source.sh" bookworm) || die "cannot derive the Debian archive URI from apt's sources"
  src=/etc/apt/sources.list.d/dlt-trixie.sources
  pin=/etc/apt/preferences.d/dlt-trixie.pref
  say "installing compose v2 from Debian trixie (source derived from apt config)"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
    "$uri" /usr/share/keyrings/debian-archive-keyring.gpg >"$src"
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' >"$pin"
  cleanup_trixie() { rm -f "$src" "$pin"; apt-get update -qq >/dev/null 2>&1 || true; }
  if ! { apt-get update -qq && apt-get install -y -qq -t trixie --no-install-recommends docker-compose >/dev/null; }; then
    cleanup_trixie
    die "installing docker-compose from trixie failed"
  fi
  cleanup_trixie
  docker compose version >/dev/null 2>&1 || die "docker-compose installed but \`docker compose\` does not answer"
fi

# 3. Daemon.
if ! docker info >/dev/null 2>&1; then
  is_root || die "dockerd is not running and not root: start the docker service"
  if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is starting; waiting for it"
  else
    say "starting dockerd (log: $log)"
    # setsid: the daemon must outlive this script and the make that called it.
    setsid nohup dockerd >>"$log" 2>&1 </dev/null &
  fi
  for _ in $(seq 1 "$wait_s"); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within ${wait_s}s; last log lines: $(tail -n 5 "$log" 2>/dev/null)"
fi
say "ready: $(docker version --format 'engine {{.Server.Version}}' 2>/dev/null), $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
