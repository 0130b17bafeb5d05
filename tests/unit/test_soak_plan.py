"""benchmarks/soak.py: the plan it runs and how it judges resource growth (the soak itself: tests/integration)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("minutes", "workers", "seed"), [(1, 2, 0), (3, 3, 1), (20, 3, 0), (20, 5, 7)])
def test_plan_kills_one_worker_at_a_time_and_the_services_in_order(soak: ModuleType, minutes: float, workers: int,
                                                                     seed: int) -> None:
    from dist_llm_train.config import AvailabilityConfig

    plan = soak.make_plan(minutes, workers, seed)
    duration = minutes * 60
    assert plan.worker_kills == max(2, round(duration / 90))
    assert 0 < plan.ps_kill_s < plan.controller_kill_s < duration
    trace = AvailabilityConfig(sessions=plan.sessions).resolve(workers)  # the launcher's own validation
    assert all(trace.present_at_start(i) for i in range(workers))
    # At no time is more than one worker away: the job always has workers to train.
    away = sorted((s["leave_s"], +1) for s in plan.sessions if s["leave_s"] is not None)
    away += sorted((s["join_s"], -1) for s in plan.sessions if s["join_s"] > 0)
    out = 0
    for _, delta in sorted(away, key=lambda e: (e[0], e[1])):
        out += delta
        assert 0 <= out <= 1
    assert soak.make_plan(minutes, workers, seed) == plan  # seeded


def test_growth_is_judged_between_warmup_and_wind_down(soak: ModuleType) -> None:
    inc = soak.Incarnation("paramserver", 1)
    # Start-up: 30 -> 50 fds and 40 -> 90 MB in the first 20 s; then flat but for one more socket.
    inc.samples = [(0.0, 30, 40.0, 0), (10.0, 50, 90.0, 4)] + [(t, 50, 90.0, 4) for t in range(20, 90, 10)]
    inc.samples.append((90.0, 51, 91.0, 4))
    # Wind-down: the launcher's final evaluation, sockets closing.
    inc.samples += [(95.0, 40, 120.0, 2), (100.0, 3, 130.0, 0)]
    g = inc.growth()
    assert g is not None and g["fd_growth"] == 1 and g["rss_growth_mb"] == 1.0 and g["judged_s"] == 60.0
    assert g["fd_growth_beyond_connections"] == 1
    assert soak.Incarnation("worker-0", 2, [(0.0, 10, 1.0, 0), (2.0, 11, 1.0, 0), (4.0, 12, 1.0, 0)]).growth() is None
    # Killed 80 s after it started: 30 s warm-up, 10 s wind-down leave 40 s, just enough; at 70 s, not enough.
    short = [(float(t), 10, 1.0, 0) for t in range(0, 81, 2)]
    assert soak.Incarnation("worker-1", 3, short).growth() is not None
    assert soak.Incarnation("worker-1", 3, short[:-5]).growth() is None


def test_live_connections_are_not_counted_as_growth_but_leaked_descriptors_are(soak: ModuleType) -> None:
    """The shaper holds two descriptors per client connection; clients holding 9 more connections at the end of the
    window (+18 descriptors, once measured) is no leak, 5 descriptors that are not live connections are."""
    steady = [(float(t), 42, 70.0, 24) for t in range(0, 100, 2)]
    more_clients = steady[:-10] + [(float(t), 60, 70.0, 42) for t in range(80, 100, 2)]
    g = soak.Incarnation("shaper", 4, more_clients).growth()
    assert g is not None and g["fd_growth"] == 18 and g["fd_growth_beyond_connections"] == 0
    leaking = steady[:-10] + [(float(t), 47, 70.0, 24) for t in range(80, 100, 2)]
    g = soak.Incarnation("shaper", 4, leaking).growth()
    assert g is not None and g["fd_growth_beyond_connections"] == 5


def test_connected_sockets_counts_this_process_established_tcp(soak: ModuleType) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    before = soak.connected_sockets(os.getpid(), os.listdir("/proc/self/fd"))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert soak.connected_sockets(os.getpid(), os.listdir("/proc/self/fd")) == before + 2  # both ends
        client.close()  # the peer went away; the accepted end, never closed, is CLOSE-WAIT: not a live connection
        deadline = time.monotonic() + 5
        while soak.connected_sockets(os.getpid(), os.listdir("/proc/self/fd")) != before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert soak.sample(os.getpid()) is not None
    finally:
        accepted.close()
        server.close()
