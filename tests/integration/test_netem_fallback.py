"""kernel_fallback across a veth pair between two namespaces this test creates and deletes.

Tolerances are the issue's: median one-way delay within ±5 % + 1 ms (≥ 200 samples), rate within ±5 %, loss
inside a binomial interval (≥ 2,000 packets), and per-class overrides observed.

Loss: 10,000 probes, accepted inside the exact binomial interval with 1e-4 total tail mass. The former check
(2,000 probes, normal-approximation "99 %" interval) failed about 1 run in 100 by construction, and once in
CI with 6 lost where 20 were expected (P = 2.3e-4). No fault behind it was found: in 98 sessions checked one
by one under CPU load, probes sent minus probes counted equalled the kernel's DROP-rule counter (less dropped
stats requests), and 99 sessions had mean 20.0 and variance 16.9 lost (binomial: 19.9). For cellular's
1.005 % the new band is 0.64-1.42 %, inside the old 0.43-1.58 %: stricter, and a false alarm ~1 run in 10,000.
Rate is sampled by the flooding process itself (`NetnsPair.flood_rate`): timed from the test process, a loaded
machine once read good's 100 Mbit/s as 85.

Delay and rate pass through the userspace NFQUEUE delayer and the probes through a Python responder, so they
need the CPU: when the virtual machine's host takes it away (CPU steal, seen at 9-40 % on 2026-12-03, when this
test read 53 Mbit/s for 100, a 44.5 ms median for 40 and 0.56 % loss for 0.1 %, old code and new alike), nothing
here can be judged, and the test skips saying how much was stolen and what it read (`cpu_steal`, tests/conftest.py).
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.netem.kernel.fallback import KernelFallbackBackend
from dist_llm_train.netem.measure.kernel_fidelity import NetnsPair, sh
from dist_llm_train.netem.measure.stats import binomial_interval
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.resolve import egress_links

ok, why = KernelFallbackBackend.available() if os.geteuid() == 0 else (False, "needs root")
pytestmark = [pytest.mark.root, pytest.mark.skipif(not ok, reason=f"kernel_fallback unavailable: {why}")]
_ids = itertools.count()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[NetnsPair]:
    n = next(_ids)
    with NetnsPair(prefix=f"dlt{os.getpid() % 10000}{n}", subnet=f"10.{200 + n % 50}.{os.getpid() % 250}",
                   env={"DLT_NETEM_STATE_DIR": str(tmp_path / "state")}) as p:
        yield p
    assert p.ns[0] not in sh("ip", "netns", "list")


def _apply(pair: NetnsPair, profile: str) -> None:
    for ns, dev, node in zip(pair.ns, pair.dev, ("a", "b"), strict=True):
        pair.netem(ns, "apply", "-p", profile, "--dev", dev, "--node", node, "-b", "kernel_fallback")


PROBES, PROBE_INTERVAL_S = 10_000, 0.0003
LOSS_TAIL = 5e-5  # per side


def _check_delay(samples: list[float], expected_ms: float) -> None:
    assert len(samples) >= 200
    med = statistics.median(samples)
    assert abs(med - expected_ms) <= 0.05 * expected_ms + 1.0, f"median {med:.2f} ms vs {expected_ms} ms"


@pytest.mark.parametrize("profile", ["cellular", "good"])
def test_fallback_fidelity(pair: NetnsPair, profile: str, cpu_steal: Any) -> None:
    links = egress_links(load_profile(profile), "b")
    _apply(pair, profile)
    pair.responder()
    r = pair.udp(PROBES, PROBE_INTERVAL_S)  # the responder's first session: its count is this stream's alone
    lo, hi = binomial_interval(r["sent"], links[None].loss_pct / 100, LOSS_TAIL)
    loss = 1 - r["forward_received"] / r["sent"]
    timed = [(r["one_way_ms"], links[None].delay_ms)]
    if profile == "cellular":  # per-class override: heartbeat sees half the delay of ps_sync
        hb, ps = pair.udp(300, 0.002, "heartbeat"), pair.udp(300, 0.002, "ps_sync")
        timed += [(hb["one_way_ms"], links["heartbeat"].delay_ms), (ps["one_way_ms"], links["ps_sync"].delay_ms)]
    rate = links[None].rate_mbit
    assert rate is not None
    measured = pair.flood_rate(rate)
    cpu_steal.skip_if_stolen(f"loss {loss:.2%} for {links[None].loss_pct}%, {measured:.1f} Mbit/s for {rate}")
    assert lo <= loss <= hi, f"loss {loss:.4f} outside [{lo:.4f}, {hi:.4f}]"
    for samples, expected in timed:
        _check_delay(samples, expected)
    offered = pair.offered_mbit
    assert offered is not None
    # Never above the configured rate; at least 95 % of it, or of what the sender managed to offer when a busy
    # CPU held the Python flood below the rate (then the shaper can only be judged on what reached it).
    assert measured <= 1.05 * rate, f"rate {measured:.2f} vs {rate} Mbit/s (offered {offered:.1f})"
    assert measured >= 0.95 * min(rate, offered), f"rate {measured:.2f} vs {rate} Mbit/s (offered {offered:.1f})"


def test_clear_removes_everything(pair: NetnsPair) -> None:
    ns, dev = pair.ns[1], pair.dev[1]
    before_q = pair.exec(ns, "tc", "qdisc", "show", "dev", dev)
    before_ipt = pair.exec(ns, "iptables", "-t", "mangle", "-S")
    pair.netem(ns, "apply", "-p", "cellular", "--dev", dev, "-b", "kernel_fallback")
    state = Path(pair.env["DLT_NETEM_STATE_DIR"])
    pid = int(next(state.glob("*.pid")).read_text())
    assert "DLT-" in pair.exec(ns, "iptables", "-t", "mangle", "-S")
    pair.netem(ns, "clear", "--dev", dev)
    assert pair.exec(ns, "tc", "qdisc", "show", "dev", dev) == before_q
    assert pair.exec(ns, "iptables", "-t", "mangle", "-S") == before_ipt
    assert not Path(f"/proc/{pid}").exists() or b"delayer" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert list(state.iterdir()) == []
    assert "nothing to clear" in pair.netem(ns, "clear", "--dev", dev)  # idempotent


def test_failed_apply_leaves_interface_clean(pair: NetnsPair) -> None:
    """tc_netem on a kernel without sch_netem fails half-way: everything before the failure is rolled back."""
    from dist_llm_train.netem.kernel.tc_netem import probe_netem

    if probe_netem()[0]:
        pytest.skip("this kernel has netem, so tc_netem does not fail here")
    ns, dev = pair.ns[0], pair.dev[0]
    before = pair.exec(ns, "tc", "qdisc", "show", "dev", dev)
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "dist_llm_train.netem", "apply",
                           "-p", "good", "--dev", dev, "-b", "tc_netem"], capture_output=True, text=True,
                          env={**os.environ, **pair.env}, timeout=60)
    assert proc.returncode == 2 and "netem" in proc.stderr
    assert pair.exec(ns, "tc", "qdisc", "show", "dev", dev) == before
    assert "nothing to clear" in pair.netem(ns, "clear", "--dev", dev)


def test_missing_interface_and_foreign_qdisc_are_clear_errors(pair: NetnsPair) -> None:
    ns, dev = pair.ns[0], pair.dev[0]
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "dist_llm_train.netem", "apply",
                           "-p", "good", "--dev", "nosuchdev0", "-b", "kernel_fallback"], capture_output=True,
                          text=True, env={**os.environ, **pair.env}, timeout=60)
    assert proc.returncode == 2 and "no such network interface 'nosuchdev0'" in proc.stderr
    pair.exec(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1mbit", "burst", "10k", "latency", "50ms")
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "dist_llm_train.netem", "apply",
                           "-p", "good", "--dev", dev, "-b", "kernel_fallback"], capture_output=True, text=True,
                          env={**os.environ, **pair.env}, timeout=60)
    assert proc.returncode == 2 and "did not add" in proc.stderr
    assert "tbf" in pair.exec(ns, "tc", "qdisc", "show", "dev", dev)  # untouched
