#!/usr/bin/env bash
# Build the wheels each service image installs from, on the host.
# Why: pip inside containers cannot verify TLS here, and a wheelhouse also makes image builds offline and repeatable.
# Layout (all under .cache/wheelhouse/):
#   deps-<extra>/   third-party wheels of `dist-llm-train[<extra>]` (+ the netem extra when pyproject defines one);
#                   rebuilt only when pyproject.toml changes (stamp = its sha256).
#   project/        the project's own wheel, rebuilt every call (source changes often, and it takes seconds).
# Usage: wheelhouse.sh [EXTRA...]   (default: controller paramserver worker). Torch comes from pip's configured
# find-links (the local CPU wheel); never from an index.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=${DLT_WHEELHOUSE:-$root/.cache/wheelhouse}
extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(controller paramserver worker)
log() { echo "wheelhouse: $*" >&2; }

[ -x "$py" ] || { log "no python at $py (run make install)"; exit 3; }
mkdir -p "$out"
sum=$(sha256sum "$root/pyproject.toml" | cut -c1-16)
# An optional [netem] extra (e.g. NetfilterQueue for the NFQUEUE delay backend) goes into every image: every
# container shapes its own links.
extra_netem=""
if grep -qE '^netem[[:space:]]*=' "$root/pyproject.toml"; then extra_netem=",netem"; fi

for extra in "${extras[@]}"; do
  grep -qE "^${extra}[[:space:]]*=" "$root/pyproject.toml" || { log "pyproject has no [$extra] extra"; exit 2; }
  dir="$out/deps-$extra"
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$sum$extra_netem" ]; then
    log "deps-$extra up to date"
    continue
  fi
  log "building deps-$extra (dist-llm-train[$extra$extra_netem])"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  # --prefer-binary: never compile what exists as a wheel; sdists (if any) are built here on the host.
  "$py" -m pip wheel -q --prefer-binary -w "$dir.tmp" "$root[$extra$extra_netem]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  ls "$dir.tmp"/dist_llm_train-*.whl >/dev/null 2>&1 || { log "pip wheel failed for [$extra]"; exit 1; }
  rm -f "$dir.tmp"/dist_llm_train-*.whl   # the project wheel lives in project/
  if [ "$extra" != worker ] && ls "$dir.tmp"/torch-*.whl >/dev/null 2>&1; then
    log "[$extra] pulled in torch; controller/paramserver images must stay torch-free"; exit 1
  fi
  echo "$sum$extra_netem" >"$dir.tmp/.stamp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
done

log "building the project wheel"
rm -rf "$out/project.tmp" && mkdir -p "$out/project.tmp"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out/project.tmp" "$root" >&2
rm -rf "$out/project" && mv "$out/project.tmp" "$out/project"
# pip leaves a build/ folder behind for in-tree builds with setuptools; it is not ours to keep.
log "ready in $out"
