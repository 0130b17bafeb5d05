#!/usr/bin/env bash
# Prepare everything needed to boot a real netem kernel under qemu (see README.md in this folder).
#
# Why: the CI machine's own kernel has no sch_netem, so the project's tc_netem backend can only be exercised for real
# inside a VM running Debian's stock kernel, which ships sch_netem.ko. This script is idempotent: a second run with
# a complete cache does no network I/O and returns in well under a second.
#
# Exit codes: 0 ready · 3 something could not be installed (callers treat this as "skip", with the printed reason)
#             anything else: a bug in this script.
#
# Environment: NETEM_VM_CACHE (default <repo>/.cache/netem_vm) · NETEM_VM_REFRESH=1 to rebuild the kernel cache.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${NETEM_VM_CACHE:-$REPO/.cache/netem_vm}"
KDIR="$CACHE/kernel"
STAMP="$KDIR/READY"

# Host tools (command -> Debian package). kmod provides depmod, used to resolve module dependencies.
declare -A TOOL_PKG=(
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [cpio]=cpio
  [depmod]=kmod
  [dpkg-deb]=dpkg
)
# The kernel meta-package; it depends on exactly one versioned image package, which is what we download.
KERNEL_META=linux-image-amd64

# Modules the harness cannot work without (netem itself, the virtio-9p host share, veth between namespaces).
REQUIRED_MODULES=(sch_netem 9p 9pnet_virtio virtio_pci veth)
# Modules a shaping backend may reasonably use: classful qdiscs, classifiers, ingress redirection via IFB,
# and the netfilter pieces a DSCP/port-marking backend might need. Missing ones are reported, not fatal.
OPTIONAL_MODULES=(
  ifb sch_htb sch_tbf sch_prio sch_ingress sch_sfq sch_fq sch_drr sch_hfsc
  cls_u32 cls_fw cls_matchall cls_flower cls_basic em_u32 em_cmp em_meta
  crc32c_generic   # libcrc32c (act_csum, nf_tables) softdep-needs it; modules.dep does not list softdeps
  act_mirred act_skbedit act_gact act_pedit act_csum
  ip_tables iptable_mangle iptable_filter ip6_tables ip6table_mangle
  nf_tables nft_compat xt_statistic xt_DSCP xt_dscp xt_mark xt_tcpudp xt_multiport
)

say() { printf 'netem-vm setup: %s\n' "$*"; }
give_up() { say "SKIP: $*" >&2; exit 3; }

missing_tools() {
  local t bb out=()
  for t in "${!TOOL_PKG[@]}"; do
    command -v "$t" >/dev/null 2>&1 || [[ -x "/sbin/$t" || -x "/usr/sbin/$t" ]] || out+=("${TOOL_PKG[$t]}")
  done
  # The initramfs has no libc: a dynamically linked busybox (Debian's plain `busybox`) cannot be PID 1 there.
  bb="$(command -v busybox 2>/dev/null || true)"
  if [[ -n "$bb" ]] && [[ "$(LC_ALL=C ldd "$bb" 2>&1 || true)" != *"not a dynamic executable"* ]]; then
    out+=(busybox-static)
  fi
  printf '%s\n' "${out[@]}" | sort -u | grep -v '^$' || true
}

apt_updated=0
apt_update_once() {
  if [[ $apt_updated -eq 0 ]]; then
    say "running apt-get update (package lists may be stale)" >&2
    apt-get update -qq || give_up "apt-get update failed"
    apt_updated=1
  fi
}

install_tools() {
  local pkgs
  mapfile -t pkgs < <(missing_tools)
  [[ ${#pkgs[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null 2>&1 || give_up "need ${pkgs[*]} but apt-get is not available"
  [[ $(id -u) -eq 0 ]] || give_up "need ${pkgs[*]} installed; run this script as root (apt-get install)"
  say "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; then
    apt_update_once
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
      || give_up "apt-get install ${pkgs[*]} failed"
  fi
  mapfile -t pkgs < <(missing_tools)
  [[ ${#pkgs[@]} -eq 0 ]] || give_up "still missing after install: ${pkgs[*]}"
}

# Name of the versioned image package the meta-package points at, e.g. linux-image-6.1.0-50-amd64.
kernel_image_package() {
  local dep
  dep="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  if [[ -z "$dep" ]]; then
    apt_update_once
    dep="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  fi
  [[ -n "$dep" ]] || give_up "apt knows no package $KERNEL_META (is a Debian main source configured?)"
  printf '%s\n' "$dep"
}

# Print modules.dep-resolved load order for the given module names (dependencies first), one path per line.
resolve_modules() {
  local moddir="$1"; shift
  awk -v want="$*" '
    BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) wanted[w[i]] = i }
    function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); gsub(/-/, "_", b); return b }
    {
      mod = $1; sub(/:$/, "", mod); name = base(mod)
      deps[name] = ""; path[name] = mod
      for (i = NF; i >= 2; i--) deps[name] = deps[name] " " $i   # modules.dep lists deps so that reverse = load order
    }
    function emit(name,   k, d, m) {
      if (name in done) return
      done[name] = 1
      k = split(deps[name], d, " ")
      for (m = 1; m <= k; m++) emit(base(d[m]))
      print path[name]
    }
    END {
      for (i = 1; i <= n; i++) if (w[i] in path) emit(w[i]); else print "MISSING " w[i]
    }' "$moddir/modules.dep"
}

build_kernel_cache() {
  local pkg tmp ver moddir line name spec kept=0
  pkg="$(kernel_image_package)"
  # The cache is keyed on the image package and the module lists, so editing either rebuilds it.
  spec="$(printf '%s\n' "${REQUIRED_MODULES[@]}" "${OPTIONAL_MODULES[@]}" | md5sum | cut -c1-12)"
  if [[ "${NETEM_VM_REFRESH:-0}" != 1 && -f "$KDIR/vmlinuz" && -f "$KDIR/modules/load_order" ]] \
      && [[ "$(cut -d' ' -f1,3 "$STAMP" 2>/dev/null)" == "$pkg $spec" ]]; then
    say "kernel cache ready: $(cut -d' ' -f1,2 "$STAMP") ($KDIR)"
    return 0
  fi
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/netem_vm_setup.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  say "downloading $pkg with apt-get download"
  chmod 755 "$tmp"   # apt's _apt sandbox user must be able to write the .deb
  if ! (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1); then
    apt_update_once
    (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null 2>&1) || give_up "apt-get download $pkg failed"
  fi
  say "extracting $(basename "$tmp"/*.deb)"
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  ver="$(ls "$tmp/root/lib/modules")"
  [[ -n "$ver" && -f "$tmp/root/boot/vmlinuz-$ver" ]] || give_up "$pkg has no vmlinuz-$ver"
  moddir="$tmp/root/lib/modules/$ver"
  [[ -f "$moddir/modules.dep" ]] || depmod -b "$tmp/root" "$ver"

  rm -rf "$KDIR.new"
  mkdir -p "$KDIR.new/modules"
  install -m 0644 "$tmp/root/boot/vmlinuz-$ver" "$KDIR.new/vmlinuz"
  : >"$KDIR.new/modules/load_order"
  while read -r line; do
    if [[ "$line" == MISSING* ]]; then
      name="${line#MISSING }"
      if grep -qE "/${name//_/[-_]}\.ko" "$moddir/modules.builtin"; then
        continue   # built into this kernel: nothing to load
      fi
      for r in "${REQUIRED_MODULES[@]}"; do
        [[ "$r" == "$name" ]] && give_up "$pkg lacks required module $name"
      done
      say "note: optional module $name not in $pkg"
      continue
    fi
    name="$(basename "$line")"
    install -m 0644 "$moddir/$line" "$KDIR.new/modules/$name"
    printf '%s\n' "$name" >>"$KDIR.new/modules/load_order"
    kept=$((kept + 1))
  done < <(resolve_modules "$moddir" "${REQUIRED_MODULES[@]}" "${OPTIONAL_MODULES[@]}")
  printf '%s %s %s\n' "$pkg" "$ver" "$spec" >"$KDIR.new/READY"
  rm -rf "$KDIR"
  mv "$KDIR.new" "$KDIR"
  say "kernel cache ready: $pkg $ver, $kept modules ($KDIR)"
}

main() {
  mkdir -p "$CACHE"
  install_tools
  build_kernel_cache
  [[ -e /dev/kvm ]] && say "note: /dev/kvm exists but the runner uses TCG on purpose (KVM hangs in the BIOS here)"
  return 0
}

main "$@"
