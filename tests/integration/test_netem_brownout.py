"""Brownout (5 Mbit/s for 5 s, 0.5 Mbit/s for 2 s, repeating): throughput drops follow the schedule ±0.5 s.

Userspace always (no root needed); kernel_fallback too where it works (root, NetfilterQueue, tc, iptables): a
paced UDP flood at 1.5× the up rate leaves namespace a, and the bytes leaving a's veth are sampled inside the
namespace, so the figure is the shaper's, not TCP's. Change points are fitted on the cumulative-bytes curve.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.netem.measure.stats import change_point
from dist_llm_train.netem.measure.userspace_fidelity import schedule_timeline

pytestmark = pytest.mark.timeout(120)
BOUNDARIES = (5.0, 7.0, 12.0)  # down, up, down (seconds after the schedule started)
SAMPLER = """
import json, sys, time
path, end, out = f"/sys/class/net/{sys.argv[1]}/statistics/tx_bytes", time.time() + float(sys.argv[2]), []
while time.time() < end:
    with open(path) as f:
        out.append((time.time(), int(f.read())))
    time.sleep(0.02)
print(json.dumps(out))
"""


def _check_schedule(ts: np.ndarray, cum: np.ndarray) -> None:
    for i, t in enumerate(BOUNDARIES):
        tau, before, after = change_point(ts, cum, t - 1.0, t + 1.0)
        assert abs(tau - t) <= 0.5, f"change expected at {t}s, seen at {tau:.2f}s"
        high, low = (before, after) if i % 2 == 0 else (after, before)
        assert high > 4.0 and low < 1.0, f"around {t}s: {before:.2f} -> {after:.2f} Mbit/s"


def test_brownout_userspace() -> None:
    ts, cum, _ = asyncio.run(schedule_timeline("brownout", 13.0))
    _check_schedule(ts, cum)


def _fallback_ok() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root"
    from dist_llm_train.netem.kernel.fallback import KernelFallbackBackend

    return KernelFallbackBackend.available()


@pytest.mark.root
def test_brownout_kernel_fallback(tmp_path: Path) -> None:
    ok, why = _fallback_ok()
    if not ok:
        pytest.skip(f"kernel_fallback unavailable: {why}")
    from dist_llm_train.netem.measure.kernel_fidelity import PY, NetnsPair

    with NetnsPair(
        prefix=f"dltb{os.getpid() % 10000}",
        subnet=f"10.251.{os.getpid() % 250}",
        env={"DLT_NETEM_STATE_DIR": str(tmp_path / "state")},
    ) as pair:
        pair.netem(
            pair.ns[0],
            "apply",
            "-p",
            "brownout",
            "--dev",
            pair.dev[0],
            "--node",
            "a",
            "-b",
            "kernel_fallback",
        )
        flood = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                pair.ns[0],
                PY,
                "-c",
                f"from dist_llm_train.netem.measure.probe import udp_flood; udp_flood({pair.ip[1]!r}, 7778, 7.5, 14)",
            ]
        )
        pair.procs.append(flood)
        sampled = pair.exec(pair.ns[0], PY, "-c", SAMPLER, pair.dev[0], "14")
        flood.wait(30)
        shown = json.loads(pair.netem(pair.ns[0], "show", "--dev", pair.dev[0], "--json"))
    started = shown["schedule"]["started_at"]
    pts = json.loads(sampled)
    ts = np.array([t - started for t, _ in pts])
    _check_schedule(ts, np.array([b for _, b in pts], dtype=float))
