"""Supervised restarts in `dist-llm-train run`: kill -9 of the parameter server and of the controller mid-job.

The run must finish with its JSON summary; the PS resumes from its newest checkpoint, so a restart loses at most
one checkpoint interval of versions; the workers pull again instead of failing their tasks (no task attempt is
spent); nothing outlives the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

Marked = Callable[[str], list[int]]  # tests/conftest.py's `marked_processes`
pytestmark = pytest.mark.timeout(420)

CHECKPOINT_EVERY = 5


def _launch(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm_train", "run", "--runs-dir", str(tmp_path / "runs"), "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "DLT_TEST_MARKER": marker},
    )
    return proc, marker


def _service_pid(marked: Marked, marker: str, service: str) -> int | None:
    for pid in marked(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and service.encode() in cmd:
            return pid
    return None


def _wait_for(what: str, ready: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _log(tmp_path: Path, name: str) -> str:
    logs = list((tmp_path / "runs").glob(f"*/logs/{name}.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def _kill(marked: Marked, marker: str, service: str) -> int:
    pid = _service_pid(marked, marker, service)
    assert pid is not None, f"no {service} process"
    os.kill(pid, signal.SIGKILL)
    return pid


def test_kill_9_of_ps_and_controller_the_run_completes_with_its_summary(tmp_path: Path, marked_processes: Marked
                                                                       ) -> None:
    proc, marker = _launch(tmp_path, "--workers", "2", "--steps", "300", "--checkpoint-every", str(CHECKPOINT_EVERY))
    _wait_for("training", lambda: "training job" in _log(tmp_path, "worker-0"))
    _wait_for("a few checkpoints", lambda: "resumed" not in _log(tmp_path, "paramserver")
              and any((tmp_path / "runs").glob("*/checkpoints/*.ckpt.npz")))
    time.sleep(2.0)
    old_ps = _kill(marked_processes, marker, "paramserver")
    _wait_for("the PS back", lambda: "resumed job" in _log(tmp_path, "paramserver"))
    assert _service_pid(marked_processes, marker, "paramserver") not in (None, old_ps)
    time.sleep(1.0)
    _kill(marked_processes, marker, "controller")
    out, err = proc.communicate(timeout=360)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["job_state"] == "completed" and summary["steps"] >= 300
    assert summary["final_loss"] < summary["initial_loss"]
    restarts = summary["restarts"]
    assert restarts["counts"] == {"paramserver": 1, "controller": 1}
    assert restarts["checkpoint_every"] == CHECKPOINT_EVERY
    ps_event = next(e for e in restarts["events"] if e["service"] == "paramserver")
    assert ps_event["exit_code"] == -signal.SIGKILL and ps_event["ready_s"] is not None
    # Resumed from a checkpoint (a multiple of the interval), at most one interval behind what was seen.
    assert ps_event["version_resumed"] % CHECKPOINT_EVERY == 0
    assert ps_event["version_seen_before"] >= ps_event["version_resumed"] > 0
    assert 0 <= ps_event["versions_lost"] <= CHECKPOINT_EVERY
    assert restarts["max_versions_lost"] <= CHECKPOINT_EVERY
    # Neither restart spent a task attempt, and no worker was declared dead by the controller's restart.
    assert restarts["task_attempts_failed"] == 0
    assert summary["dead_workers"] == [] and summary["reassignments"] == 0
    run_dir = Path(summary["run_dir"])
    assert "## Supervised restarts" in (run_dir / "summary.md").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["restarts"]["counts"] == restarts["counts"]
    assert marked_processes(marker) == []


def test_without_restarts_a_dead_ps_fails_the_run_with_a_reason(tmp_path: Path, marked_processes: Marked) -> None:
    proc, marker = _launch(tmp_path, "--workers", "1", "--steps", "100000", "--max-restarts", "0")
    _wait_for("training", lambda: "training job" in _log(tmp_path, "worker-0"))
    _kill(marked_processes, marker, "paramserver")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "paramserver exited (code -9) after 0 restart(s); the limit is 0" in out + err
    assert "Traceback" not in out + err
    deadline = time.monotonic() + 15
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(marker) == []
