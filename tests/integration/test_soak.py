"""`make soak`, shortened to a 2.5-minute job: brownout links, worker kills, one PS and one controller kill.

Shorter leaves no process a steady state long enough to judge its growth (measured: a one-minute job on an
idle machine ends before any process has one, and that check fails).

Every check of benchmarks/soak.py must pass (completion, restarts, versions lost, no task attempt failed, nothing
left running, fd and RSS growth bounds); `make soak` runs the same for 20 minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_short_soak_passes_every_check(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "2.5", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=840)
    result = json.loads((tmp_path / "soak.json").read_text())
    failed = [r for r in result["checks"] if not r["ok"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], result["stderr_tail"])
    assert result["summary"]["restarts"]["counts"] == {"paramserver": 1, "controller": 1}
    assert (tmp_path / "soak.md").read_text().startswith("# Soak: 2.5 min planned, `brownout` profile")
