"""scripts/cpu_hog.py: runs the command beside busy loops, returns its status, and leaves no loop behind."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "cpu_hog", Path(__file__).resolve().parents[2] / "scripts" / "cpu_hog.py"
)
assert _spec is not None and _spec.loader is not None
cpu_hog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_hog)


def test_runs_the_command_under_load_and_returns_its_status() -> None:
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}
    t0 = time.monotonic()
    status = cpu_hog.main(["--procs", "2", "--max-seconds", "30", "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert status == 3
    assert time.monotonic() - t0 < 20  # the hogs stop with the command, not at their deadline
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_a_busy_loop_stops_by_itself_at_its_deadline() -> None:
    t0 = time.monotonic()
    cpu_hog.burn(time.monotonic() + 0.2)
    assert 0.2 <= time.monotonic() - t0 < 5


def test_refuses_a_missing_command() -> None:
    with pytest.raises(SystemExit):
        cpu_hog.main(["--procs", "1"])
