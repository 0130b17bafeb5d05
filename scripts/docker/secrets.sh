#!/usr/bin/env bash
# The stack's credentials, made once and kept (idempotent), so `make up` enables auth without any user step:
#
#   scripts/docker/secrets.sh DIR CLI      DIR/cluster_secret   the cluster secret (controller + PS only)
#                                          DIR/join_token       what workers register with (any worker name)
#                                          DIR/admin_token      the operator's: submit-job, status, metrics
# CLI is the host's `dist-llm-train`. Files are 0600 in a 0700 folder; `make down` keeps them, delete the folder
# to rotate (every service must then restart). See docs/security.md.
set -euo pipefail
dir=${1:?usage: secrets.sh DIR CLI}
cli=${2:?usage: secrets.sh DIR CLI}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
if [ ! -s "$dir/cluster_secret" ]; then
  "$cli" secret >"$dir/cluster_secret.tmp"
  mv "$dir/cluster_secret.tmp" "$dir/cluster_secret"
  rm -f "$dir/join_token" "$dir/admin_token"  # minted from the old secret: no longer valid
  echo "secrets: made a new cluster secret in $dir" >&2
fi
for role in join admin; do
  if [ ! -s "$dir/${role}_token" ]; then
    DLT_CLUSTER_SECRET_FILE="$dir/cluster_secret" DLT_CLUSTER_SECRET="" "$cli" token --role "$role" \
      >"$dir/${role}_token.tmp"
    mv "$dir/${role}_token.tmp" "$dir/${role}_token"
  fi
done
