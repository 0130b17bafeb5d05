#!/usr/bin/env bash
# System packages the WAN-emulation backends need (iproute2's tc, iptables with the statistic match and NFQUEUE,
# and the libnetfilter_queue headers the NetfilterQueue wheel is built against), and gcc for that wheel and the
# codecs' native kernels (core/_kernels.c). Idempotent: installs only what is
# missing, and does nothing when everything is present or when not root (prints why instead).
set -euo pipefail
need=()
command -v tc >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
dpkg -s libnetfilter-queue-dev >/dev/null 2>&1 || need+=(libnetfilter-queue-dev)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
dpkg -s python3-dev >/dev/null 2>&1 || need+=(python3-dev)
if [ ${#need[@]} -eq 0 ]; then
  echo "install_system_deps: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: missing ${need[*]} but not root; the kernel shaping backends will be unavailable" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
echo "install_system_deps: installed ${need[*]}"
