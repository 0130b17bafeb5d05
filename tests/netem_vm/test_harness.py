"""The VM harness itself, seen from the host: exit codes, output and artifacts come back; limits hold.

Boots real VMs (a few seconds each under TCG), so it is marked netem_vm and runs from `make test-netem-vm`,
after scripts/netem_vm/setup.sh has filled the cache. Skipped inside the guest (no nested VMs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "scripts" / "netem_vm" / "run_in_vm.sh"
CACHE = Path(os.environ.get("NETEM_VM_CACHE", REPO / ".cache" / "netem_vm"))

pytestmark = [
    pytest.mark.netem_vm,
    pytest.mark.skipif(os.environ.get("NETEM_VM_GUEST") == "1", reason="host-side test; no nested VMs"),
]
needs_cache = pytest.mark.skipif(not (CACHE / "kernel" / "READY").is_file(),
                                 reason="no kernel cache: run scripts/netem_vm/setup.sh first")


def runner(*argv: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    env = {"NETEM_VM_KEEP": "0", **env}  # these runs fail on purpose; leave no run directories behind
    return subprocess.run([str(RUNNER), *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **env})


@needs_cache
def test_guest_exit_code_output_and_artifacts_reach_the_host(tmp_path: Path) -> None:
    script = ('echo "kernel=$(uname -r) cwd=$PWD guest=$NETEM_VM_GUEST"; '
              '/usr/sbin/tc qdisc add dev lo root netem delay 1ms && echo netem-ok; '
              'mkdir -p "$NETEM_VM_RUN_DIR/artifacts" && echo payload > "$NETEM_VM_RUN_DIR/artifacts/a.txt"; '
              'exit 7')
    proc = runner("bash", "-c", script, NETEM_VM_COLLECT=str(tmp_path / "out"))
    assert proc.returncode == 7, proc.stderr[-2000:]
    host_kernel = os.uname().release
    assert "guest=1" in proc.stdout and f"cwd={REPO}" in proc.stdout
    assert "kernel=" in proc.stdout and f"kernel={host_kernel}" not in proc.stdout, "ran on the host kernel?"
    assert "netem-ok" in proc.stdout
    assert (tmp_path / "out" / "a.txt").read_text() == "payload\n"
    assert "netem-ok" in (tmp_path / "out" / "output.log").read_text()
    assert "timing: kernel boot to init" in proc.stderr


@needs_cache
def test_a_hung_guest_is_killed_at_the_timeout() -> None:
    proc = runner("sleep", "600", NETEM_VM_TIMEOUT="25", timeout=120)
    assert proc.returncode == 125
    assert "timeout" in proc.stderr


@pytest.mark.parametrize(("argv", "env"), [((), {}), (("true",), {"NETEM_VM_TIMEOUT": "soon"}),
                                           (("true",), {"NETEM_VM_MEM": "-1"})])
def test_bad_usage_is_refused_before_booting(argv: tuple[str, ...], env: dict[str, str]) -> None:
    proc = runner(*argv, timeout=30, **env)
    assert proc.returncode == 2, proc.stderr
    assert "booting" not in proc.stderr
