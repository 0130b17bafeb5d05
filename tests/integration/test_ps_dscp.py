"""PS traffic carries the ps_sync DSCP mark in both directions, so the kernel backends can shape it by class.

Runs the PS and a client inside a network namespace the test creates (root only) and counts marked
packets with iptables there; the host's own rules are never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="needs root, iproute2 and iptables (network namespace + mangle counters)",
)

SCRIPT = """
import numpy as np, sys
from dist_llm_train.config import ParamServerConfig
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport.client import connect
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, TensorSpec
transport = sys.argv[1]
with BackgroundServer(ParamServerConfig(port=0, metrics_port=0, transport=transport), with_metrics=False) as ps:
    c = connect(transport, ps.address, timeout_s=10)
    c.init_job(JobSpec.from_wire(WireJobSpec(job_id="j", mode="async", total_steps=5)), [TensorSpec("w", (1024,), 0)],
               np.zeros(1024, np.float32), ["w0"])
    header = PushHeader(job_id="j", worker_id="w0", step=1, base_version=0, payload_bytes=4096)
    c.push(header, np.ones(1024, np.float32).tobytes())
    c.pull("j", "w0")
    c.close()
    print(ps.address.rsplit(":", 1)[1])
"""


def _ns(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_ps_traffic_is_marked_ps_sync(transport: str) -> None:
    ns = f"dltdscp{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        _ns(ns, "ip", "link", "set", "lo", "up")
        # Count every TCP packet on lo, and separately those marked DSCP 10 (ps_sync).
        _ns(ns, "iptables", "-t", "mangle", "-A", "OUTPUT", "-o", "lo", "-p", "tcp")
        _ns(ns, "iptables", "-t", "mangle", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-m", "dscp", "--dscp", "10")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, transport],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.stdout.strip().isdigit()
        counters = _ns(ns, "iptables", "-t", "mangle", "-L", "OUTPUT", "-v", "-x", "-n")
        rows = [line.split() for line in counters.splitlines() if line.strip().startswith(tuple("0123456789"))]
        total, marked = int(rows[0][0]), int(rows[1][0])
        assert total > 10
        # Every packet the PS and its client send is marked (the only TCP traffic in this namespace).
        assert marked == total, f"{marked} of {total} packets carry DSCP 10"
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
