"""WAN emulation: what shaping costs, and how closely each backend delivers what a profile configures.

Part 1 — uncapped throughput (one TCP bulk stream, namespace a → b over a veth pair the benchmark creates and
deletes) through: the bare veth (the baseline), the userspace relay (shaper in a, on loopback, forwarding over
the veth) with an empty link and with 1 ms of delay, and the kernel fallback with an empty link (htb only) and
with 1 ms of delay (every packet through the NFQUEUE delayer). Rows are interleaved across repeats so every
ratio compares runs that saw the same machine load; the median of the repeats is reported.

Part 2 — fidelity for every profile × backend: median one-way delay (±5 % + 1 ms), loss (99 % binomial
interval; *modelled* for userspace), rate (±5 %, rates ≥ 1 Mbit/s). Userspace is measured on loopback through
a real shaper process (netem/measure/userspace_fidelity.py); kernel_fallback across a veth pair
(netem/measure/kernel_fidelity.py), like the tests; tc_netem only where the kernel has sch_netem (it is verified
under qemu: `make test-netem-vm`).

    sudo .venv/bin/python benchmarks/shaping.py [--repeats 3] [--seconds 3] [--profiles good,cellular]

Needs root for the namespaces and the kernel backend (without root only the userspace rows are measured).
Writes results/fidelity.md and results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_llm_train.netem.kernel.fallback import KernelFallbackBackend
from dist_llm_train.netem.kernel.tc_netem import probe_netem
from dist_llm_train.netem.measure.kernel_fidelity import PY, RT, NetnsPair
from dist_llm_train.netem.measure.stats import binomial_interval, delay_ok
from dist_llm_train.netem.measure.userspace_fidelity import measure
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link
from dist_llm_train.netem.userspace.topology import in_series

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ["lan", "good", "cellular", "degraded", "satellite", "intercontinental", "brownout", "straggler"]
TARGETS = {"userspace": 0.5, "kernel_fallback": 0.8}
EMPTY = json.dumps({"name": "uncapped", "figures": "one_way", "link": {}})
ONE_MS = json.dumps({"name": "uncapped-1ms", "figures": "one_way", "link": {"delay_ms": 1}})
RATE_CMD = "from dist_llm_train.netem.measure.probe import measure_tcp_rate as m; print(m({host!r}, {port}, {s}))"


# -- part 1: uncapped throughput ----------------------------------------------------------------------------
def _tcp_rate(pair: NetnsPair, host: str, port: int, seconds: float) -> float:
    return float(pair.exec(pair.ns[0], PY, "-c", RATE_CMD.format(host=host, port=port, s=seconds)).strip())


def _with_relay(pair: NetnsPair, profile: str, seconds: float, tmp: Path) -> float:
    """Start the shaper inside namespace a (relay on a's loopback → b over the veth), measure through it."""
    topo = {
        "workers": ["a"],
        "targets": {"b": f"{pair.ip[1]}:7777"},
        "links": [{"src": "a", "dst": "b", "classes": ["ps_sync"]}],
    }
    (tmp / "topo.json").write_text(json.dumps(topo))
    ports = tmp / "ports.json"
    ports.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pair.ns[0],
            PY,
            "-m",
            "dist_llm_train.netem.userspace.shaper",
            "--profile",
            profile,
            "--topology",
            str(tmp / "topo.json"),
            "--ports-out",
            str(ports),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if ports.exists():
                break
            time.sleep(0.05)
        listen = json.loads(ports.read_text())["relays"][0]["listen"]
        host, port = listen.rsplit(":", 1)
        return _tcp_rate(pair, host, int(port), seconds)
    finally:
        proc.terminate()
        proc.wait(10)


def _with_fallback(pair: NetnsPair, profile: str, seconds: float) -> float:
    for ns, dev in zip(pair.ns, pair.dev, strict=True):
        pair.netem(ns, "apply", "-p", profile, "--dev", dev, "-b", "kernel_fallback")
    try:
        return _tcp_rate(pair, pair.ip[1], 7777, seconds)
    finally:
        for ns, dev in zip(pair.ns, pair.dev, strict=True):
            pair.netem(ns, "clear", "--dev", dev)


def throughput(repeats: int, seconds: float, fallback: bool) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"veth": [], "userspace": [], "userspace_1ms": []}
    if fallback:
        rows |= {"kernel_fallback": [], "kernel_fallback_1ms": []}
    with (
        tempfile.TemporaryDirectory() as d,
        NetnsPair(prefix="dltbench", subnet="10.252.1", env={"DLT_NETEM_STATE_DIR": d + "/state"}) as pair,
    ):
        pair.responder(7777, seconds=3600)
        for _ in range(repeats):
            rows["veth"].append(_tcp_rate(pair, pair.ip[1], 7777, seconds))
            rows["userspace"].append(_with_relay(pair, EMPTY, seconds, Path(d)))
            rows["userspace_1ms"].append(_with_relay(pair, ONE_MS, seconds, Path(d)))
            if fallback:
                rows["kernel_fallback"].append(_with_fallback(pair, EMPTY, seconds))
                rows["kernel_fallback_1ms"].append(_with_fallback(pair, ONE_MS, seconds))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "runs_mbit": rows,
        "median_mbit": med,
        "ratio": {k: med[k] / med["veth"] for k in med if k != "veth"},
    }


# -- part 2: fidelity --------------------------------------------------------------------------------------
def _row(
    profile: str,
    backend: str,
    delay: tuple[float, float] | None,
    loss: tuple[float, float, int] | None,
    loss_kind: str,
    rate: tuple[float | None, float | None],
    note: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {"profile": profile, "backend": backend, "loss_kind": loss_kind, "note": note}
    if delay:
        out |= {"delay_ms": delay[0], "measured_delay_ms": delay[1], "delay_ok": delay_ok(delay[1], delay[0])}
    if loss:
        lo, hi = binomial_interval(loss[2], loss[0])
        out |= {"loss": loss[0], "measured_loss": loss[1], "loss_ok": lo <= loss[1] <= hi}
    if rate[0] is not None and rate[1] is not None and rate[0] >= 1:
        out |= {
            "rate_mbit": rate[0],
            "measured_rate_mbit": rate[1],
            "rate_ok": abs(rate[1] - rate[0]) <= 0.05 * rate[0],
        }
    return out


def userspace_row(profile: str, seconds: float) -> dict[str, Any]:
    src = "b" if profile == "straggler" else "a"
    (d,) = measure("delay", "--profile", profile, "--src", src, timeout_s=300)
    r = measure("rate", "--profile", profile, "--src", src, "--seconds", str(seconds), timeout_s=300)
    return _row(
        profile,
        "userspace",
        (d["configured_ms"], d["median_ms"]),
        (d["configured_loss"], d["measured_loss"], d["samples"]),
        "modelled",
        (r["configured_mbit"], r["measured_mbit"]),
        f"node {src}; rate with loss off",
    )


def fallback_row(profile: str, seconds: float) -> dict[str, Any]:
    p = load_profile(profile)
    workers = ["a", "b"]
    received = KernelFallbackBackend().receiver_links(p, "b", workers)[None]  # delay sits on b's ingress
    # a's egress, then b's ingress extra (the straggler's slow downlink): the path's rate is the slower one.
    rate = in_series(egress_links(p, "a", workers)[None], ingress_link(p, "b", workers)).rate_mbit
    with (
        tempfile.TemporaryDirectory() as d,
        NetnsPair(prefix="dltfid", subnet="10.252.2", env={"DLT_NETEM_STATE_DIR": d}) as pair,
    ):
        for ns, dev, node in zip(pair.ns, pair.dev, ("a", "b"), strict=True):
            pair.netem(
                ns,
                "apply",
                "-p",
                profile,
                "--dev",
                dev,
                "--node",
                node,
                "--workers",
                "a,b",
                "-b",
                "kernel_fallback",
            )
        pair.responder()
        u = pair.udp(2000, 0.001)
        if rate and p.schedule is not None:
            _wait_for_cycle_start(pair, sum(seg.duration_s for seg in p.schedule.segments))
        measured_rate = pair.flood_rate(rate, seconds) if rate else None
    delays = sorted(u["one_way_ms"])
    loss = 1 - u["forward_received"] / u["sent"]
    return _row(
        profile,
        "kernel_fallback",
        (received.delay_ms, statistics.median(delays)),
        (received.loss_pct / 100, loss, u["sent"]),
        "measured",
        (rate, measured_rate),
        "a→b; delay on b's ingress"
        + ("; a Python UDP flood cannot offer 1.5× this rate" if (rate or 0) > 500 else ""),
    )


def _wait_for_cycle_start(pair: NetnsPair, period_s: float) -> None:
    """Sleep until a's schedule starts a cycle, so the rate window lies in its first (full-rate) segment."""
    shown = json.loads(pair.netem(pair.ns[0], "show", "--dev", pair.dev[0], "--json"))
    time.sleep(period_s - (time.time() - shown["schedule"]["started_at"]) % period_s)


def fidelity(profiles: list[str], seconds: float, fallback: bool) -> list[dict[str, Any]]:
    netem_ok, netem_why = probe_netem() if os.geteuid() == 0 else (False, "needs root")
    rows: list[dict[str, Any]] = []
    for name in profiles:
        first = len(rows)
        rows.append(userspace_row(name, seconds))
        if fallback:
            rows.append(fallback_row(name, seconds))
        if not netem_ok:
            rows.append({"profile": name, "backend": "tc_netem", "note": f"not run here: {netem_why[:60]}"})
        for r in rows[first:]:
            print(json.dumps(r), flush=True)
    return rows


# -- report -----------------------------------------------------------------------------------------------
def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    configured, measured, ok = row.get(key), row.get(f"measured_{key}"), row.get(f"{key.split('_')[0]}_ok")
    if configured is None or measured is None:
        return "-"
    return f"{format(configured, fmt)} / {format(measured, fmt)} {'ok' if ok else '**off**'}"


def write_report(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity.json").write_text(json.dumps(result, indent=1))
    t = result["throughput"]
    lines = [
        "# WAN emulation: cost and fidelity",
        "",
        f"Generated by `benchmarks/shaping.py` on {result['machine']} ({time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        "## Uncapped throughput (one TCP stream, namespace a → b over a veth pair)",
        "",
        "| path | Mbit/s (median) | ratio to bare veth | target |",
        "|---|---|---|---|",
        f"| bare veth | {t['median_mbit']['veth']:,.0f} | 1 | |",
    ]
    for k, v in t["ratio"].items():
        target = TARGETS.get(k)
        lines.append(
            f"| {k} | {t['median_mbit'][k]:,.0f} | {v:.2f} | "
            f"{'≥ ' + str(target) + (' met' if v >= target else ' **missed**') if target else ''} |"
        )
    lines += [
        "",
        "`_1ms` rows add 1 ms of one-way delay, so every byte goes through the delay machinery "
        "(the relay's timers; the fallback's NFQUEUE delayer). Rows without it measure the bare mechanism "
        "(relay copy; htb).",
        "",
        "## Fidelity per profile and backend",
        "",
        "Cells are configured / measured. Delay: median one-way, ±5 % + 1 ms. Loss: 99 % binomial "
        "interval; userspace loss is **modelled** (recovery stalls — TCP cannot drop bytes). Rate: ±5 %.",
        "",
        "| profile | backend | delay ms | loss | rate Mbit/s | loss kind | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["fidelity"]:
        lines.append(
            f"| {r['profile']} | {r['backend']} | {_cell(r, 'delay_ms', '.2f')} | "
            f"{_cell(r, 'loss', '.4f')} | {_cell(r, 'rate_mbit', '.2f')} | {r.get('loss_kind', '-')} | "
            f"{r.get('note', '')} |"
        )
    (out_dir / "fidelity.md").write_text("\n".join(lines) + "\n")


# For `make bench-quick` (CI): two profiles, one repeat, shorter transfers; same ratios and tolerances.
QUICK_ARGS = ["--repeats", "1", "--seconds", "1.5", "--profiles", "good,cellular"]
RESULT_STEM = "fidelity"  # the issue names results/fidelity.md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    for p in profiles:
        load_profile(p)  # fail early on a typo
    root = os.geteuid() == 0
    fallback = root and KernelFallbackBackend.available()[0]
    machine = (
        f"{platform.node()} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {platform.release()})"
    )
    result: dict[str, Any] = {"machine": machine, "realtime_probes": bool(RT)}
    if root:
        result["throughput"] = throughput(args.repeats, args.seconds, fallback)
        print(json.dumps(result["throughput"]["ratio"]), flush=True)
    else:
        print("not root: no namespaces, so no throughput comparison", file=sys.stderr)
        result["throughput"] = {"median_mbit": {"veth": float("nan")}, "ratio": {}}
    result["fidelity"] = fidelity(profiles, args.seconds, fallback)
    write_report(result, args.out)
    print(f"wrote {args.out / 'fidelity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
