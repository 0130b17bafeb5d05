"""The simulator's scale targets (issue 11), both in one run, each against 60 s of wall clock on this machine.

* sync: 100,000 workers × 100 rounds, the vectorised engine: `dist-llm-train simulate --workers 100000 --steps 100
  --profile cellular` (the CLI's defaults: the default run config's sync strategy, 30 s straggler timeout);
* async: 10,000 workers × 1,000 versions, the per-event engine: `dist-llm-train simulate --workers 10000
  --steps 1000 --profile cellular --strategy async --max-staleness 5` (5 is the async strategy's own default;
  without the flag the simulator keeps the default run config's sync bound, 0: see docs/simulation.md).

Each simulation is built exactly as that command builds it (`sim.request.build_config`) and run in-process;
wall clock and CPU time are taken around `simulate`. Writes results/sim_scale.json and results/sim_scale.md
with the machine and its load.

    python benchmarks/sim_scale.py                  # both targets (about 70 s here)
    python benchmarks/sim_scale.py --quick          # 2,000 × 20 sync and 1,000 × 100 async (CI; not the targets)
    python benchmarks/sim_scale.py --only async
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.machine import machine_info
from dist_llm_train.sim.request import build_config
from dist_llm_train.sim.runner import simulate, summary

TARGET_S = 60.0


@dataclass(frozen=True)
class Target:
    name: str
    workers: int
    rounds: int
    flags: tuple[str, ...] = ()  # beyond --workers, --steps and --profile
    overrides: tuple[tuple[str, Any], ...] = ()  # what those flags set

    def command(self, profile: str) -> str:
        return " ".join(
            ["dist-llm-train simulate", f"--workers {self.workers}", f"--steps {self.rounds}", f"--profile {profile}"]
            + list(self.flags)
        )


ASYNC = (("--strategy async", "--max-staleness 5"), (("mode", "async"), ("max_staleness", 5)))
FULL = [Target("sync", 100_000, 100), Target("async", 10_000, 1_000, *ASYNC)]
QUICK = [Target("sync", 2_000, 20), Target("async", 1_000, 100, *ASYNC)]


def machine() -> dict[str, Any]:
    info = machine_info()
    return {**info, "cpu": info["cpu_model"], "nproc": info["cores"], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(target: Target, profile: str, seed: int | None, full: bool) -> dict[str, Any]:
    overrides: dict[str, Any] = {"workers": target.workers, "rounds": target.rounds, "profile": profile}
    overrides.update(dict(target.overrides))
    if seed is not None:
        overrides["seed"] = seed
    cfg = build_config(None, None, overrides)
    gc.collect()
    load_before = load_average()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = simulate(cfg)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    sim = summary(result)["simulation"]
    ratio = wall / TARGET_S
    return {
        "name": target.name,
        "command": target.command(profile),
        "mode": cfg.mode,
        "workers": target.workers,
        "rounds": target.rounds,
        "engine": result.engine,
        "outcome": result.outcome,
        "wall_s": wall,
        "cpu_s": cpu,
        "target_s": TARGET_S,
        "ratio_to_target": ratio,
        "met": ratio <= 1.0 if full else None,  # a quick run is not the target's size
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "events": result.events,
        "virtual_s": result.virtual_s,
        "round_time_mean_s": sim["round_time_s"]["mean"],
        "updates_per_round": sim["updates_per_round"]["mean"],
        "timed_out_rounds": sim["timed_out_rounds"],
        "acceptance_rate": sim["acceptance_rate"],
        "pushes": int(sum(result.stats.outcomes.values())),
        "false_suspicions": result.control.false_suspicions,
    }


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    size = "quick (CI) sizes, not the targets'" if data["quick"] else "the issue's sizes"
    lines = [
        "# Simulator scale",
        "",
        f"Both targets of issue 11 in one run ({size}), profile `{data['profile']}`, target ≤ {TARGET_S:.0f} s wall "
        f"clock each; machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']}, {m['date']}.",
        "",
        "| target | command | engine | wall clock | ratio to 60 s | CPU | load average (1/5/15 min) before → after "
        "| events | pushes | virtual time | mean round | acceptance |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in data["runs"]:
        verdict = "" if r["met"] is None else (" (met)" if r["met"] else " (**missed**)")
        lines.append(
            f"| {r['name']} {r['workers']:,} × {r['rounds']:,} | `{r['command']}` | {r['engine']} | "
            f"{r['wall_s']:.1f} s | {r['ratio_to_target']:.2f}{verdict} | {r['cpu_s']:.1f} s | "
            f"{r['load_average_before']} → {r['load_average_after']} | {r['events']:,} | {r['pushes']:,} | "
            f"{r['virtual_s']:,.0f} s | {f(r['round_time_mean_s'], ',.2f')} s | {f(r['acceptance_rate'], '.4f')} |"
        )
    lines += [
        "",
        "Wall clock is what the target is about; on a shared machine it also counts other jobs' CPU, so CPU time "
        "(this process alone) is given beside it.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small versions of both (CI): 2k × 20 sync, 1k × 100 async")
    ap.add_argument("--only", choices=["sync", "async"], help="run one target")
    ap.add_argument("--profile", default="cellular")
    ap.add_argument("--seed", type=int, default=None, help="simulation seed (default: the run config's)")
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    targets = [t for t in (QUICK if args.quick else FULL) if args.only in (None, t.name)]
    runs = []
    for target in targets:
        row = measure(target, args.profile, args.seed, full=not args.quick)
        runs.append(row)
        print(
            f"{row['name']:>5}: {row['workers']:,} workers × {row['rounds']:,} rounds: {row['wall_s']:.1f} s wall "
            f"({row['ratio_to_target']:.2f} × the {TARGET_S:.0f} s target), {row['cpu_s']:.1f} s CPU, "
            f"{row['events']:,} events",
            flush=True,
        )
    data: dict[str, Any] = {
        "benchmark": "sim_scale",
        "quick": args.quick,
        "profile": args.profile,
        "target_s": TARGET_S,
        "load_average": load_average(),
        "machine": machine(),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_scale.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "sim_scale.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
