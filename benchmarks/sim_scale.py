"""How the simulator's wall-clock time grows with the number of virtual workers.

Runs `dist-llm-train simulate`'s engine in-process for each worker count at a fixed number of rounds, fits
time ∝ workers^k by least squares on log-log, and writes results/sim_scale.json and results/sim_scale.md
with the machine it ran on. The issue's target: 10,000 workers × 1,000 rounds in ≤ 60 s on a 2-core machine.

    python benchmarks/sim_scale.py                       # 100, 1k, 10k workers × 1000 rounds, sync, cellular
    python benchmarks/sim_scale.py --quick               # 100, 1k workers × 100 rounds (CI)
    python benchmarks/sim_scale.py --mode async --rounds 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.experiments.machine import machine_info
from dist_llm_train.sim.config import build_sim_config
from dist_llm_train.sim.runner import simulate, summary

TARGET_S = 60.0


def machine() -> dict[str, Any]:
    info = machine_info()
    return {**info, "cpu": info["cpu_model"], "nproc": info["cores"], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def measure(
    workers: int, rounds: int, mode: str, profile: str, seed: int, timeout_s: float
) -> dict[str, Any]:
    cfg = build_sim_config(
        {
            "workers": workers,
            "rounds": rounds,
            "mode": mode,
            "profile": profile,
            "seed": seed,
            "straggler_timeout_s": timeout_s,
        }
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    result = simulate(cfg)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    s = summary(result)
    sim = s["simulation"]
    return {
        "workers": workers,
        "rounds": rounds,
        "mode": mode,
        "engine": result.engine,
        "job_state": s["job_state"],
        "wall_s": wall,
        "cpu_s": cpu,
        "events": result.events,
        "virtual_s": result.virtual_s,
        "round_time_mean_s": sim["round_time_s"]["mean"],
        "updates_per_round": sim["updates_per_round"]["mean"],
        "timed_out_rounds": sim["timed_out_rounds"],
        "measured_over_bound": sim["physics_bound"]["measured_over_bound"],
        "acceptance_rate": sim["acceptance_rate"],
    }


def fit_exponent(rows: list[dict[str, Any]], key: str = "wall_s") -> float | None:
    """k in time ∝ workers^k, least squares on log-log."""
    if len(rows) < 2:
        return None
    x = np.log([r["workers"] for r in rows])
    y = np.log([r[key] for r in rows])
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# Simulator scale",
        "",
        f"{data['mode']} training on `{data['profile']}`, {data['rounds']:,} rounds per run, "
        f"straggler timeout {data['straggler_timeout_s']:g} s; "
        f"machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']}, {m['date']}.",
        "",
        "| workers | engine | wall clock | CPU | events | virtual time | mean round | updates / round "
        "| timed out | measured / bound | acceptance |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in data["runs"]:
        lines.append(
            f"| {r['workers']:,} | {r['engine']} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | "
            f"{r['events']:,} | {r['virtual_s']:,.1f} s | {f(r['round_time_mean_s'], ',.3f')} s | "
            f"{f(r['updates_per_round'], ',.1f')} | {r['timed_out_rounds']:,} | "
            f"{f(r['measured_over_bound'], '.3f')} | {f(r['acceptance_rate'], '.4f')} |"
        )
    k = data["fitted_exponent"]
    lines += [
        "",
        f"Fitted scaling: wall clock ∝ workers^{k:.2f}, CPU time ∝ workers^{data['fitted_exponent_cpu']:.2f}."
        if k is not None
        else "Too few points to fit.",
    ]
    tgt = data.get("target")
    if tgt:
        verdict = "meets" if tgt["met"] else "misses"
        lines.append(
            f"Target: {tgt['workers']:,} workers × {tgt['rounds']:,} rounds in ≤ {TARGET_S:.0f} s: "
            f"{tgt['wall_s']:.1f} s wall ({tgt['cpu_s']:.1f} s CPU; "
            f"load average at the end {data['load_average']}), "
            f"{verdict} it."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="100,1000,10000", help="comma-separated worker counts")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--mode", default="sync", choices=["sync", "async"])
    ap.add_argument("--profile", default="cellular")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--straggler-timeout",
        type=float,
        default=1e6,
        help="sync round timeout, s (default: never, so every round waits for every member)",
    )
    ap.add_argument("--quick", action="store_true", help="100 and 1000 workers × 100 rounds")
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    counts = [100, 1000] if args.quick else [int(w) for w in args.workers.split(",") if w]
    rounds = 100 if args.quick else args.rounds
    runs = []
    for n in counts:
        row = measure(n, rounds, args.mode, args.profile, args.seed, args.straggler_timeout)
        runs.append(row)
        print(
            f"{n:>7,} workers × {rounds:,} rounds: {row['wall_s']:7.2f} s wall, {row['events']:,} events, "
            f"{row['virtual_s']:,.0f} s virtual",
            flush=True,
        )
    data: dict[str, Any] = {
        "benchmark": "sim_scale",
        "mode": args.mode,
        "profile": args.profile,
        "rounds": rounds,
        "straggler_timeout_s": args.straggler_timeout,
        "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "machine": machine(),
        "runs": runs,
        "fitted_exponent": fit_exponent(runs),
        "fitted_exponent_cpu": fit_exponent(runs, "cpu_s"),
    }
    big = [r for r in runs if r["workers"] >= 10_000 and r["rounds"] >= 1000]
    if big:
        b = big[0]
        data["target"] = {
            "cpu_s": b["cpu_s"],
            "workers": b["workers"],
            "rounds": b["rounds"],
            "wall_s": b["wall_s"],
            "met": b["wall_s"] <= TARGET_S,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sim_scale" if args.mode == "sync" else f"sim_scale_{args.mode}"
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
