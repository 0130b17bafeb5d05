#!/usr/bin/env bash
# Guest-side smoke check: prove the running kernel really has netem, before anything project-specific runs.
#
# Two network namespaces joined by a veth pair; `netem delay 50ms` on BOTH ends (netem shapes egress only, so one
# end delays only one direction); then ping across: the round trip must be ~100 ms. Run it through the harness:
#   scripts/netem_vm/run_in_vm.sh scripts/netem_vm/guest_check_netem.sh
# It refuses to run outside the VM (it would fail on the host kernel anyway, and it creates namespaces).
set -euo pipefail

[[ "${NETEM_VM_GUEST:-0}" == 1 ]] || { echo "guest_check_netem: run me inside the VM (run_in_vm.sh)" >&2; exit 2; }
TC=/usr/sbin/tc   # full path: busybox has a tc applet of its own
IP=/usr/sbin/ip
PING=(busybox ping)
A=nvmchkA B=nvmchkB
COUNT="${CHECK_PINGS:-20}"

cleanup() { "$IP" netns del "$A" 2>/dev/null || true; "$IP" netns del "$B" 2>/dev/null || true; }
trap cleanup EXIT
cleanup

"$IP" netns add "$A"
"$IP" netns add "$B"
"$IP" link add vchkA netns "$A" type veth peer name vchkB netns "$B"
"$IP" -n "$A" addr add 10.99.0.1/24 dev vchkA
"$IP" -n "$B" addr add 10.99.0.2/24 dev vchkB
for ns in "$A" "$B"; do "$IP" -n "$ns" link set lo up; done
"$IP" -n "$A" link set vchkA up
"$IP" -n "$B" link set vchkB up

"$TC" -n "$A" qdisc add dev vchkA root netem delay 50ms
"$TC" -n "$B" qdisc add dev vchkB root netem delay 50ms
"$TC" -n "$A" qdisc show dev vchkA

out="$("$IP" netns exec "$A" "${PING[@]}" -q -c "$COUNT" -i 0.2 -W 2 10.99.0.2)"
echo "$out"
# busybox prints: round-trip min/avg/max = 100.123/100.456/101.789 ms
avg="$(sed -n 's#.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*#\1#p' <<<"$out")"
received="$(sed -n 's#.* \([0-9]*\) packets received.*#\1#p' <<<"$out")"
[[ -n "$avg" && -n "$received" ]] || { echo "guest_check_netem: FAIL: could not parse ping output"; exit 1; }
# Lower bound is physics (netem never releases early); the upper bound leaves room for TCG's slow emulation.
if awk -v a="$avg" 'BEGIN { exit !(a >= 99.0 && a <= 160.0) }' && [[ "$received" -ge $((COUNT - 1)) ]]; then
  echo "guest_check_netem: OK: netem delay 50ms on both ends gives avg RTT ${avg} ms (${received}/${COUNT} replies)"
else
  echo "guest_check_netem: FAIL: avg RTT ${avg} ms, ${received}/${COUNT} replies (want 99..160 ms, >= $((COUNT - 1)))"
  exit 1
fi
