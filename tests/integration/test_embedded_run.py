"""`dist-llm-train run` end to end: real processes on loopback, real training."""

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




def _launch(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    marker = uuid.uuid4().hex
    env = {**os.environ, "DLT_TEST_MARKER": marker}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm_train", "run", "--runs-dir", str(tmp_path / "runs"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return proc, marker


def _wait_for_training(tmp_path: Path, worker: str, timeout_s: float = 120) -> Path:
    """Wait until the worker has started training on its shard."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = list((tmp_path / "runs").glob(f"*/logs/{worker}.log"))
        if logs and "training job" in logs[0].read_text(errors="replace"):
            return logs[0].parents[1]
        time.sleep(0.2)
    raise AssertionError(f"{worker} never started training")


def _worker_pid(pids: list[int], name: str) -> int:
    """The worker process called `name` among `pids`."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmd and name.encode() in cmd:
            return pid
    raise AssertionError(f"no process for {name}")


def test_run_json_trains_and_writes_report(tmp_path: Path, marked_processes: Marked) -> None:
    proc, marker = _launch(tmp_path, "--workers", "3", "--steps", "60", "--json")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("initial_loss", "final_loss", "loss_floor", "steps", "workers", "bytes_sent", "wall_seconds",
                "run_dir"):
        assert key in summary
    assert summary["workers"] == 3
    assert summary["steps"] >= 60
    assert summary["final_loss"] < summary["initial_loss"] - 0.3
    assert summary["loss_floor"] < summary["final_loss"]
    # Sync mode: every worker pushes one full fp32 gradient per global step (plus its InitJob upload).
    from dist_llm_train.config import Config
    from dist_llm_train.training.models import build_model

    cfg = Config()
    n_params = sum(p.numel() for p in build_model(cfg.model, cfg.training.vocab_size, 32, 0).parameters())
    assert summary["bytes_sent"] >= 3 * 60 * 4 * n_params
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "metrics.csv", "summary.json", "summary.md", "loss.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert len((run_dir / "metrics.csv").read_text().splitlines()) > 30
    assert marked_processes(marker) == []


def test_kill_9_worker_run_finishes_on_the_others(tmp_path: Path, marked_processes: Marked) -> None:
    proc, marker = _launch(tmp_path, "--workers", "3", "--steps", "300", "--json")
    _wait_for_training(tmp_path, "worker-1")
    time.sleep(1.5)
    os.kill(_worker_pid(marked_processes(marker), "worker-1"), signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] >= 300
    assert summary["job_state"] == "completed"
    assert "worker-1" in summary["dead_workers"]
    assert summary["reassignments"] >= 1
    assert summary["final_loss"] < summary["initial_loss"]
    assert marked_processes(marker) == []


def test_ctrl_c_leaves_no_orphans(tmp_path: Path, marked_processes: Marked) -> None:
    proc, marker = _launch(tmp_path, "--workers", "2", "--steps", "100000")
    _wait_for_training(tmp_path, "worker-0")
    assert len(marked_processes(marker)) >= 4  # launcher + PS + controller + workers
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    deadline = time.monotonic() + 15
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(marker) == []


def test_kill_9_launcher_takes_children_down(tmp_path: Path, marked_processes: Marked) -> None:
    proc, marker = _launch(tmp_path, "--workers", "1", "--steps", "100000")
    _wait_for_training(tmp_path, "worker-0")
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(marker) == []
