"""Churn of transient workers in a real embedded run: a worker is SIGKILLed and started again (same name) at the
trace's times, the run still completes, and its summary records what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

Marked = Callable[[str], list[int]]  # tests/conftest.py's `marked_processes`
# 23-33 s on two cores: start-up, ~11 s of job (a round stalls until the leaver is declared dead), evaluation.
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_a_worker_leaves_and_rejoins_and_the_run_completes(tmp_path: Path, marked_processes: Marked) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("worker,join_s,leave_s\n1,0,1.0\nworker-1,2.0,\n")
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "run", "--workers", "3", "--steps", "120", "--json",
         "--runs-dir", str(tmp_path / "runs"), "--availability", str(trace)],
        capture_output=True, text=True, timeout=280, env={**os.environ, "DLT_TEST_MARKER": marker},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job_state"] == "completed" and summary["steps"] >= 120
    assert summary["final_loss"] < summary["initial_loss"]
    av = summary["availability"]
    assert [(e["worker"], e["action"], e["scheduled_s"]) for e in av["events"]] == [
        ("worker-1", "leave", 1.0), ("worker-1", "join", 2.0)]
    assert all(e["error"] is None and 0 <= e["applied_s"] - e["scheduled_s"] < 1.0 for e in av["events"])
    assert (av["leaves"], av["joins"], av["events_not_reached"]) == (1, 1, 0)
    assert av["events"][0]["was_training"] is True and av["updates_lost_to_leaves"] == 1
    # the round worker-1 never finished closed short once the controller declared it dead and told the PS
    assert av["rounds_closed_by_departure"] == 1 and summary["reassignments"] >= 1
    assert 0 < av["goodput"] < 1 and av["updates_accepted"] >= 2 * 120
    assert av["offered_worker_s"] > 0 and av["accepted_compute_s"] > 0
    run_dir = Path(summary["run_dir"])
    # the restarted process registered again under its name (same worker id: registration is by name)
    registrations = [line for line in (run_dir / "logs" / "worker-1.log").read_text().splitlines()
                     if "registered as worker-1" in line]
    assert len(registrations) == 2 and len({line.split("(")[-1] for line in registrations}) == 1
    assert (run_dir / "availability.csv").read_text().splitlines()[1:] == ["1,0.0,1.0", "1,2.0,"]
    assert "## Availability (transient workers)" in (run_dir / "summary.md").read_text()
    assert marked_processes(marker) == []
