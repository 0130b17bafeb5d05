"""The tc_netem backend on a real netem kernel: apply a profile, measure the link it makes, clear it.

Runs INSIDE the qemu guest (`make test-netem-vm`, or scripts/netem_vm/run_in_vm.sh …); on any other kernel it
skips. Two namespaces joined by a veth pair stand for two nodes; each node shapes its own egress through the
project's CLI (`python -m dist_llm_train.netem apply --backend tc_netem`, under `ip netns exec`), exactly as a
user would. The meters (vm_probes.py) are independent of the project's own probe code, so a bug there cannot hide
a bug here.

What is asserted, against the profile file's own round-trip figures:
  * median RTT of 2000 UDP probes (kernel timestamps, see vm_probes) — within max(3 ms, 5 %) after subtracting
    the unshaped baseline RTT; re-measured (at most 3 times) only while the guest was visibly starved of CPU, and
    if it was starved every time, the last attempt may run late by a further max(7 ms, 5 %) (never early);
  * round-trip loss over those probes — inside the two-sided 1e-6 binomial interval (the rare false alarm is a
    one-in-a-million event, not a tolerance chosen to pass);
  * rate of a paced UDP flood offered at 1.3x the configured rate — between -20 % and +10 % of it (the floor was
    widened from 10 % after measuring htb's timer sensitivity under TCG: vm_stats.RATE_FLOOR); above 20 Mbit/s,
    or if the emulated CPU cannot even offer 1.15x, only "never faster than configured" is asserted and the
    report says so (vm_stats.VM_RATE_LIMIT_MBIT);
  * per-class shaping via DSCP (cellular's prioritised heartbeat class), and IFB ingress shaping (straggler);
  * `clear` leaves the device exactly as before: same qdiscs, no ingress, no IFB, no state left.
Measured figures are printed at the end and written to $NETEM_VM_RUN_DIR/artifacts/netem_vm_results.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vm_netlab import TC, LabError, VethLab, reap, run
from vm_stats import delay_problem, expected_round_trip, loss_problem, one_way, rate_verdict, starved

IN_GUEST = os.environ.get("NETEM_VM_GUEST") == "1"
pytestmark = [
    pytest.mark.netem_vm,
    pytest.mark.skipif(not IN_GUEST, reason="runs inside the netem VM only (make test-netem-vm)"),
]

ECHO_PORT, SINK_PORT = 9000, 9100
PROBES = 2000
FLOOD_BYTES = 8900  # UDP payload that fits the lab's 9000-byte MTU unfragmented
ATTEMPTS = 3  # per delay measurement, used only while the guest is visibly starved of CPU (see vm_stats.starved)
RESULTS: list[dict[str, Any]] = []


def backend_missing() -> str | None:
    """Why the project's tc_netem backend cannot be exercised (None when it can)."""
    for mod in ("dist_llm_train.netem.kernel.tc_netem", "dist_llm_train.netem.__main__"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} does not exist yet"
        except ImportError as err:
            return f"{mod} cannot be imported: {err}"
    return None


@pytest.fixture(scope="module")
def lab() -> Iterator[VethLab]:
    lab = VethLab()
    lab.create()
    try:
        yield lab
    finally:
        lab.delete()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: print every measured figure and save them for the CI artifact."""
    yield
    if not RESULTS:
        return
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{r['case']:<34} " + " ".join(f"{k}={v}" for k, v in r.items() if k != "case") for r in RESULTS]
    if tr is not None:
        tr.write_line("")
        tr.write_line("measured inside the netem VM:")
        for line in lines:
            tr.write_line("  " + line)
    run_dir = os.environ.get("NETEM_VM_RUN_DIR")
    if run_dir:
        out = Path(run_dir, "artifacts")
        out.mkdir(exist_ok=True)
        (out / "netem_vm_results.json").write_text(json.dumps(RESULTS, indent=1))


@pytest.fixture(scope="module")
def baseline(lab: VethLab) -> dict[str, float]:
    """Unshaped RTT and the flood rate the emulated CPU can send: the floor under every measurement."""
    probe = measure_probes(lab, count=400)
    sink = lab.start(lab.ns_b, ["sink", "--bind", lab.ip_b, "--port", str(SINK_PORT)])
    sent = lab.probes(lab.ns_a, ["blast", "--host", lab.ip_b, "--port", str(SINK_PORT), "--seconds", "2",
                                 "--mbit", "1000", "--size", str(FLOOD_BYTES)])
    got = reap(sink)
    base = {"rtt_ms": round(probe["median_ms"], 3), "send_mbit": round(sent["sent_mbit"], 1),
            "recv_mbit": round(got["mbit_s"], 1)}
    RESULTS.append({"case": "baseline (no shaping)", **base})
    return base


def measure_probes(lab: VethLab, count: int = PROBES, tos: int = 0, rtt_ms: float = 100.0) -> dict[str, Any]:
    """`count` UDP probes A→B→A, 2 ms apart; the echo server in B reflects each probe's DSCP.

    Lost probes never come back, so the client waits 1 s plus twice the expected RTT after the last one.
    """
    echo = lab.start(lab.ns_b, ["echo", "--bind", lab.ip_b, "--port", str(ECHO_PORT)])
    try:
        return lab.probes(lab.ns_a, ["probe", "--host", lab.ip_b, "--port", str(ECHO_PORT), "--count", str(count),
                                     "--interval-ms", "2", "--tos", str(tos), "--drain-s",
                                     f"{1.0 + 2 * rtt_ms / 1000:.2f}", "--stop"], timeout=180)
    finally:
        reap(echo, timeout=30)


def measure_rate(lab: VethLab, src: str, dst_ns: str, dst_ip: str, mbit: float) -> tuple[float, float]:
    """Flood src→dst at `mbit` for 3 s; returns (offered Mbit/s, received Mbit/s)."""
    sink = lab.start(dst_ns, ["sink", "--bind", dst_ip, "--port", str(SINK_PORT)])
    sent = lab.probes(src, ["blast", "--host", dst_ip, "--port", str(SINK_PORT), "--seconds", "3",
                            "--mbit", f"{mbit:g}", "--size", str(FLOOD_BYTES)])
    got = reap(sink, timeout=60)
    return sent["offered_mbit"], got["mbit_s"]


def netem_cli(lab: VethLab, ns: str, *args: str) -> str:
    """The project's CLI, run inside `ns` the way a user runs it."""
    return lab.python(ns, ["-m", "dist_llm_train.netem", *args], timeout=180)


def assert_clean(lab: VethLab, ns: str, dev: str, before: list[dict[str, Any]]) -> None:
    assert lab.qdiscs(ns, dev) == before, f"{dev} qdiscs after clear differ from before apply"
    assert not [name for name in lab.links(ns) if name.startswith("ifb")], f"IFB device left behind in {ns}"
    shown = json.loads(netem_cli(lab, ns, "show", "--dev", dev, "--json"))
    assert shown["applied"] is False, shown


def delay_and_loss_case(lab: VethLab, case: str, rtt_ms: float, loss_pct: float, base_rtt: float,
                        tos: int = 0) -> None:
    """Probe A→B→A and judge median RTT and round-trip loss; re-measure (bounded) only if the VM was starved."""
    for attempt in range(1, ATTEMPTS + 1):
        m = measure_probes(lab, tos=tos, rtt_ms=rtt_ms)
        was_starved = starved(m["user_rtt_median_ms"], m["median_ms"])
        # Judged strictly while attempts remain; the starvation allowance only on the last, starved attempt.
        problem = delay_problem(m["median_ms"], base_rtt, rtt_ms, starved=was_starved and attempt == ATTEMPTS)
        RESULTS.append({"case": case, "attempt": attempt, "starved": was_starved, "rtt_cfg_ms": round(rtt_ms, 3),
                        "rtt_median_ms": round(m["median_ms"], 2), "p10_ms": round(m["p10_ms"], 1),
                        "p90_ms": round(m["p90_ms"], 1), "forward_median_ms": round(m["forward_median_ms"], 2),
                        "user_rtt_median_ms": round(m["user_rtt_median_ms"], 2), "loss_cfg_pct": round(loss_pct, 4),
                        "lost": f"{m['lost']}/{m['sent']}", "loss_pct": round(m["loss_pct"], 3),
                        "ok": problem is None})
        if problem is None or not was_starved:
            break
    assert m["sent"] == PROBES, f"{case}: only {m['sent']} probes sent"
    assert problem is None, f"{case}: {problem}" + (" (the VM was starved of CPU in every attempt)"
                                                    if was_starved else "")
    lp = loss_problem(m["lost"], m["sent"], loss_pct)
    assert lp is None, f"{case}: {lp}"


def rate_case(lab: VethLab, case: str, src: str, dst_ns: str, dst_ip: str, rate: float) -> None:
    """Flood at 1.3x `rate`; judge what arrives. Re-measured (at most 3 times) while the result is a failure or
    sender-limited, since both happen when the host starves the VM; every attempt is reported."""
    for attempt in range(1, ATTEMPTS + 1):
        offered, got = measure_rate(lab, src, dst_ns, dst_ip, 1.3 * rate)
        verdict = rate_verdict(offered, got, rate)
        RESULTS.append({"case": case, "attempt": attempt, "rate_cfg_mbit": rate, "offered_mbit": round(offered, 2),
                        "recv_mbit": round(got, 2), "verdict": verdict.kind})
        if verdict.ok and verdict.kind != "sender-limited":
            break
    assert verdict.ok, f"{case}: {verdict.reason}"


def test_kernel_has_netem(lab: VethLab, baseline: dict[str, float]) -> None:
    """Raw tc, no project code: netem delay 50ms on both veth ends makes a ~100 ms round trip."""
    before_a, before_b = lab.qdiscs(lab.ns_a, lab.dev_a), lab.qdiscs(lab.ns_b, lab.dev_b)
    run([TC, "-n", lab.ns_a, "qdisc", "add", "dev", lab.dev_a, "root", "netem", "delay", "50ms"])
    run([TC, "-n", lab.ns_b, "qdisc", "add", "dev", lab.dev_b, "root", "netem", "delay", "50ms"])
    try:
        delay_and_loss_case(lab, "raw netem delay 50ms x2", 100.0, 0.0, baseline["rtt_ms"])
    finally:
        run([TC, "-n", lab.ns_a, "qdisc", "del", "dev", lab.dev_a, "root"])
        run([TC, "-n", lab.ns_b, "qdisc", "del", "dev", lab.dev_b, "root"])
    assert lab.qdiscs(lab.ns_a, lab.dev_a) == before_a and lab.qdiscs(lab.ns_b, lab.dev_b) == before_b


needs_backend = pytest.mark.skipif(backend_missing() is not None, reason=f"backend part skipped: {backend_missing()}")


@needs_backend
@pytest.mark.parametrize("name", ["good", "cellular", "satellite"])
def test_profile_on_real_netem(lab: VethLab, baseline: dict[str, float], name: str) -> None:
    from dist_llm_train.netem.profile.classes import tos_byte
    from dist_llm_train.netem.profile.loading import load_profile

    profile = load_profile(name)
    before = {lab.ns_a: lab.qdiscs(lab.ns_a, lab.dev_a), lab.ns_b: lab.qdiscs(lab.ns_b, lab.dev_b)}
    sides = ((lab.ns_a, lab.dev_a), (lab.ns_b, lab.dev_b))
    try:
        for ns, dev in sides:  # each node shapes its own egress, so the round trip crosses both
            applied = json.loads(netem_cli(lab, ns, "apply", "--profile", name, "--dev", dev,
                                           "--backend", "tc_netem", "--json"))
            assert applied["applied"] and applied["backend"] == "tc_netem", applied
            kinds = {q["kind"] for q in lab.qdiscs(ns, dev)}
            assert {"htb", "netem"} <= kinds, f"{dev} in {ns}: {kinds}"

        rtt, loss = expected_round_trip(profile.figures, profile.link.delay_ms, profile.link.loss_pct)
        delay_and_loss_case(lab, f"{name} default class", rtt, loss, baseline["rtt_ms"])
        for cls, override in profile.classes.items():
            link = profile.link.merged(override)
            rtt_c, loss_c = expected_round_trip(profile.figures, link.delay_ms, link.loss_pct)
            delay_and_loss_case(lab, f"{name} class {cls} (DSCP)", rtt_c, loss_c, baseline["rtt_ms"],
                                tos=tos_byte(cls))
        if profile.link.rate_mbit:
            rate_case(lab, f"{name} rate A->B", lab.ns_a, lab.ns_b, lab.ip_b, profile.link.rate_mbit)
    finally:
        clear_errors = []
        for ns, dev in sides:  # clear both sides even if one fails; report after
            try:
                netem_cli(lab, ns, "clear", "--dev", dev)
            except LabError as err:
                clear_errors.append(str(err))
    assert not clear_errors, clear_errors
    for ns, dev in sides:
        assert_clean(lab, ns, dev, before[ns])


@needs_backend
def test_straggler_ingress_via_ifb(lab: VethLab, baseline: dict[str, float]) -> None:
    """The straggler's `ingress` block puts an IFB on its device: what it RECEIVES is rate-limited too."""
    from dist_llm_train.netem.profile.loading import load_profile

    profile = load_profile("straggler")
    node = profile.nodes["$last_worker"]
    assert node.ingress is not None and node.ingress.rate_mbit, "straggler.yaml lost its ingress rate"
    slow = profile.link.merged(node.link)  # the straggler's own egress link, round-trip figures
    before = lab.qdiscs(lab.ns_a, lab.dev_a)
    try:
        netem_cli(lab, lab.ns_a, "apply", "--profile", "straggler", "--dev", lab.dev_a, "--node", "w2",
                  "--workers", "w1,w2", "--backend", "tc_netem", "--json")
        assert [n for n in lab.links(lab.ns_a) if n.startswith("ifb")], "no IFB device was created"
        # Only A is shaped: probes cross its egress (one direction of the slow link) and its ingress (rate only).
        delay, loss = one_way(profile.figures, slow.delay_ms, slow.loss_pct)
        delay_and_loss_case(lab, "straggler: A egress only", delay, loss, baseline["rtt_ms"])
        rate_case(lab, "straggler: ingress B->A via IFB", lab.ns_b, lab.ns_a, lab.ip_a, node.ingress.rate_mbit)
    finally:
        netem_cli(lab, lab.ns_a, "clear", "--dev", lab.dev_a)
    assert_clean(lab, lab.ns_a, lab.dev_a, before)


@needs_backend
def test_clear_is_idempotent_and_bad_input_changes_nothing(lab: VethLab) -> None:
    """Clearing a device nobody shaped succeeds and changes nothing; an unknown profile is refused untouched."""
    before = lab.qdiscs(lab.ns_b, lab.dev_b)
    assert "nothing to clear" in netem_cli(lab, lab.ns_b, "clear", "--dev", lab.dev_b)
    assert lab.qdiscs(lab.ns_b, lab.dev_b) == before
    bad = subprocess.run(lab.exec_argv(lab.ns_b, [sys.executable, "-m", "dist_llm_train.netem", "apply",
                                                  "--profile", "no-such-profile", "--dev", lab.dev_b,
                                                  "--backend", "tc_netem"]),
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode != 0 and "no-such-profile" in bad.stderr + bad.stdout
    assert lab.qdiscs(lab.ns_b, lab.dev_b) == before, "a rejected apply changed the device"
