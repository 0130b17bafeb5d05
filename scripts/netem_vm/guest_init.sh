#!/bin/busybox sh
# shellcheck shell=dash
# PID 1 of the netem VM (copied into the initramfs as /init by run_in_vm.sh).
#
# Why it exists: the guest kernel is Debian's stock one, which has sch_netem; everything else (python, the project's
# .venv, iproute2's tc) is the HOST's, reached through a read-only virtio-9p share of the host root and a chroot.
# Results go back through a second, writable 9p share ("out") holding job.sh; we write rc, output.log and timing there.
# Whatever happens, we power off so qemu exits (-no-reboot turns a panic into an exit as well).

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /host /out
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

fail() {
  echo "netem-vm guest: FATAL: $*"
  echo 125 >/out/rc 2>/dev/null
  sync
  poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1

# Load modules in modules.dep order (dependencies first), as resolved by setup.sh.
while read -r mod; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod" 2>/tmp_insmod_err || echo "netem-vm guest: warning: insmod $mod: $(cat /tmp_insmod_err)"
done </lib/modules/load_order

P9="trans=virtio,version=9p2000.L,msize=524288"
mount -t 9p -o "$P9" out /out || fail "cannot mount the output share"
if [ ! -f /out/job.sh ] || [ ! -f /out/job.path ]; then fail "output share has no job.sh/job.path"; fi
OUT="$(cat /out/job.path)"
cut -d' ' -f1 /proc/uptime >/out/boot_seconds

# cache=loose: the host root is read-only for the VM's lifetime, so caching pages and metadata is safe and makes
# python imports over 9p several times faster.
CWD="$(cat /out/job.cwd)"
mount -t 9p -o "$P9,ro,cache=loose" hostroot /host || fail "cannot mount the host root share"
[ -d "/host$OUT" ] || fail "output dir $OUT is not visible in the host root share"

# A checkout under /tmp (CI clones can live there) would vanish under the tmpfs mounts below: hold the job's
# working directory aside first and put it back on top of them.
KEEP=""
case "$CWD" in
  /tmp/*|/var/tmp/*) { mkdir -p /keep && mount -o bind "/host$CWD" /keep; } || fail "cannot hold $CWD aside"; KEEP=1 ;;
esac

mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm 2>/dev/null
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs -o mode=755 tmpfs /host/run       # ip netns keeps its handles in /run/netns
[ -d /host/var/tmp ] && mount -t tmpfs -o mode=1777 tmpfs /host/var/tmp
if [ -n "$KEEP" ]; then
  { mkdir -p "/host$CWD" && mount --move /keep "/host$CWD"; } || fail "cannot re-expose $CWD"
fi
# Only now does the writable output share go in place: it may live inside the working directory.
mount --move /out "/host$OUT" || fail "cannot move the output share to $OUT"
ip link set lo up
hostname netem-vm

echo "netem-vm guest: kernel $(uname -r), booted in $(cat /host"$OUT"/boot_seconds) s (guest clock); running job"
cut -d' ' -f1 /proc/uptime >"/host$OUT/start_seconds"
{
  chroot /host /bin/bash "$OUT/job.sh"
  echo $? >"/host$OUT/rc"
} 2>&1 | tee "/host$OUT/output.log"
cut -d' ' -f1 /proc/uptime >"/host$OUT/end_seconds"
sync
poweroff -f
