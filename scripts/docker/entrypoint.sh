#!/usr/bin/env bash
# Container entry point for every service image: shape this container's link, run the service, unshape on stop.
#
#   dlt-entrypoint CMD [ARGS...]     @NODE@ in any argument is replaced by this container's node name (so a
#                                    sharded PS replica checkpoints under /data/shard-N, not a shared /data/@NODE@).
#
# Environment:
#   PROFILE            netem profile name (deploy/netem/$PROFILE.yaml, mounted at $DLT_NETEM_PROFILE_DIR);
#                      empty or "none" runs unshaped.
#   DLT_NODE           node name; default: derived from the compose container name, so replica N of service
#                      `worker` is `worker-N` (per-node profile overrides then hit exactly one worker).
#   DLT_WORKERS        number of worker replicas; lets profiles address `$last_worker` (= worker-$DLT_WORKERS).
#   DLT_NETEM_DEV      device to shape (eth0);  DLT_NETEM_BACKEND  backend name (auto).
#   DLT_PROBE_LISTEN   HOST:PORT: run a `netem probe --listen` responder beside the service (the peer end of
#                      the fidelity probes).
#   DLT_PROBE_TARGET   HOST:PORT of a responder, with DLT_PROBE_PEER (its node name) and DLT_PROBE_METRICS_PORT:
#                      run the link exporter (configured vs measured RTT/loss as dlt_link_* metrics, and as
#                      `links` records in $DLT_LINK_REPORT_FILE, which the worker sends with its telemetry).
#   DLT_PROBE_TARGETS  NODE=HOST:PORT,NODE=HOST:PORT,...: several responders (every PS shard's, set by
#                      compose_up.sh / stack_up.sh for PS_SHARDS > 1); when set it replaces DLT_PROBE_TARGET and
#                      DLT_PROBE_PEER, and the exporter reports one path per peer.
#
# Why a script and not the service itself: shaping needs NET_ADMIN-time setup before the first packet, and must be
# undone even when the service crashes. Bash stays PID 1, forwards SIGTERM/SIGINT to the service, then clears.
set -uo pipefail

dev=${DLT_NETEM_DEV:-eth0}
backend=${DLT_NETEM_BACKEND:-auto}
state_dir=${DLT_STATE_DIR:-/run/dlt}  # overridable for the script's own tests only
mkdir -p "$state_dir"
log() { echo "dlt-entrypoint: $*" >&2; }

derive_node() {
  # The compose container name is <project>-<service>-<index>; Docker's embedded DNS answers a reverse lookup of
  # our own address with it (the `files` source would only give the container id, hence `-s hosts:dns`).
  local ip fq short
  ip=$(ip -4 -o addr show dev "$dev" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1)
  if [ -n "$ip" ]; then
    fq=$(getent -s hosts:dns hosts "$ip" 2>/dev/null | awk '{print $2}' | head -n1)
    short=${fq%%.*}
    if [[ "$short" =~ -([a-z0-9_]+)-([0-9]+)$ ]]; then
      echo "${BASH_REMATCH[1]}-${BASH_REMATCH[2]}"
      return
    fi
  fi
  hostname
}

node=${DLT_NODE:-}
[ -n "$node" ] || node=$(derive_node)
export DLT_NODE=$node
echo "$node" >"$state_dir/node"

args=()
for a in "$@"; do
  args+=("${a//@NODE@/$node}")
done
[ ${#args[@]} -gt 0 ] || { log "no command given"; exit 64; }

# The netem CLI: `dist-llm-train netem`, or the module form while the main CLI does not register it.
netem=()
if dist-llm-train netem apply --help >/dev/null 2>&1; then
  netem=(dist-llm-train netem)
elif python -m dist_llm_train.netem apply --help >/dev/null 2>&1; then
  netem=(python -m dist_llm_train.netem)
fi

shaped=0
profile=${PROFILE:-}
if [ -n "$profile" ] && [ "$profile" != none ]; then
  if [ ${#netem[@]} -gt 0 ]; then
    extra=()
    workers=""
    # The help text in a variable, not piped into `grep -q`: grep exits at the first match, the CLI then dies of
    # SIGPIPE while still writing, and pipefail turned that into "no --workers" at random — and with it every
    # `$last_worker` override (the straggler) silently missed its node.
    apply_help=$("${netem[@]}" apply --help 2>/dev/null || true)
    if [ -n "${DLT_WORKERS:-}" ] && [[ "$apply_help" == *--workers* ]]; then
      for i in $(seq 1 "$DLT_WORKERS"); do workers+="${workers:+,}worker-$i"; done
      extra=(--workers "$workers")
    fi
    log "shaping $dev: profile=$profile node=$node backend=$backend"
    if ! "${netem[@]}" apply --json --profile "$profile" --node "$node" --dev "$dev" --backend "$backend" \
         "${extra[@]}" >"$state_dir/netem-apply.out" 2>"$state_dir/netem-apply.err"; then
      log "shaping failed (refusing to run unshaped under PROFILE=$profile):"
      cat "$state_dir/netem-apply.err" "$state_dir/netem-apply.out" >&2
      exit 78
    fi
    python - "$state_dir/netem-apply.out" <<'PY' >&2 || cat "$state_dir/netem-apply.out" >&2
import json, sys
d = json.load(open(sys.argv[1]))
print(f"dlt-entrypoint: shaped with backend {d.get('backend')}: " + "; ".join(map(str, d.get("why", []))))
PY
    shaped=1
  else
    log "PROFILE=$profile but this image has no \`dist-llm-train netem\` command; running unshaped"
    echo "unavailable" >"$state_dir/netem-apply.err"
  fi
fi

clear_shaping() {
  if [ "$shaped" -eq 1 ]; then
    log "clearing shaping on $dev"
    "${netem[@]}" clear --dev "$dev" >&2 || log "netem clear failed"
    shaped=0
  fi
}

helpers=()
if [ -n "${DLT_PROBE_LISTEN:-}" ] && [ ${#netem[@]} -gt 0 ]; then
  "${netem[@]}" probe --listen "$DLT_PROBE_LISTEN" --seconds 0 &
  helpers+=($!)
fi
probe_targets=()
if [ -n "${DLT_PROBE_TARGETS:-}" ]; then
  probe_targets=(--target "$DLT_PROBE_TARGETS")
elif [ -n "${DLT_PROBE_TARGET:-}" ]; then
  probe_targets=(--target "$DLT_PROBE_TARGET" --peer-node "${DLT_PROBE_PEER:-paramserver}")
fi
if [ ${#probe_targets[@]} -gt 0 ] && [ -n "$profile" ] && [ "$profile" != none ]; then
  # The exporter also writes each path's configured vs measured figures as telemetry `links` records; the worker
  # finds the file through DLT_LINK_REPORT_FILE and sends them to the controller (/status shows them).
  export DLT_LINK_REPORT_FILE=$state_dir/links.json
  python /usr/local/bin/dlt-link-exporter.py "${probe_targets[@]}" \
    --node "$node" --profile "$profile" --workers "${workers:-}" --dev "$dev" \
    --port "${DLT_PROBE_METRICS_PORT:-9101}" --report-file "$DLT_LINK_REPORT_FILE" &
  helpers+=($!)
fi
stop_helpers() {
  local p
  for p in "${helpers[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${helpers[@]}"; do wait "$p" 2>/dev/null; done
}

child=0
on_signal() {
  log "got $1; stopping ${args[0]} (pid $child)"
  [ "$child" -gt 0 ] && kill -"$1" "$child" 2>/dev/null
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

"${args[@]}" &
child=$!
rc=0
# `wait` returns early when a trapped signal arrives; keep waiting until the service itself has exited.
while kill -0 "$child" 2>/dev/null; do
  wait "$child"
  rc=$?
done
stop_helpers
clear_shaping
log "${args[0]} exited with $rc"
exit "$rc"
