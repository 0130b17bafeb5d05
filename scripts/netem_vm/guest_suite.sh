#!/usr/bin/env bash
# What `make test-netem-vm` runs inside the VM, in one boot: the raw netem smoke check, then the pytest suite.
#
# Why one script: a boot costs seconds, so both stages share it; the smoke check comes first because if the
# kernel cannot do netem at all, the suite's failures would only be noise. Extra arguments go to pytest.
set -euo pipefail

[[ "${NETEM_VM_GUEST:-0}" == 1 ]] || { echo "guest_suite: run me inside the VM (run_in_vm.sh)" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${NETEM_VM_PYTHON:-$REPO/.venv/bin/python}"
ART="${NETEM_VM_RUN_DIR:?}/artifacts"
mkdir -p "$ART"

echo "== guest_check_netem.sh"
"$HERE/guest_check_netem.sh"
echo "== pytest tests/netem_vm/test_tc_netem_backend.py"
cd "$REPO"
# -p no:cacheprovider: the host tree is mounted read-only here. -m netem_vm overrides the default deselection.
exec "$PY" -m pytest tests/netem_vm/test_tc_netem_backend.py -m netem_vm -p no:cacheprovider \
  --junitxml="$ART/junit.xml" --durations=8 -q -rs "$@"
